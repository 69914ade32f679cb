"""Atomic writes: a reader sees the old file or folder, or the complete new one, never a part.

Local paths: a temporary sibling renamed over the target; a POSIX rename is atomic.

Object stores (gs://, s3://, ...; see `paths`): a "rename" is a copy then a delete,
and a folder is only a name prefix, so there is no atomic folder rename.
- A file is written to a temporary object beside its name, then copied over it: an
  object appears whole or not at all, and a failed write leaves the old object.
- A folder is built on local disk (libraries such as safetensors and tokenizers
  write only local files anyway), then the target's completion marker
  (`COMPLETE_MARKER`) is deleted, the target's old objects removed, the files
  uploaded one by one, and a new marker written last. A crash part-way leaves a
  folder without a marker: readers of remote folders trust only marked ones
  (`is_complete`), and rerunning the write replaces it.
"""
import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid

from llm_embedder_jax import paths

COMPLETE_MARKER = "_COMPLETE"
_COPY_CHUNK = 16 << 20


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a temporary local folder; on success its content replaces `path` as one unit.

    On failure the temporary folder is removed and `path` is left as it was.
    """
    if paths.is_remote(path):
        with _remote_dir(paths.as_path(path)) as tmp:
            yield tmp
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            # Rename, not delete, first: a crash between the two renames leaves the old copy recoverable.
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Yields an open temporary file beside `path`; on success it is synced and renamed over `path`."""
    if paths.is_remote(path):
        with _remote_file(paths.as_path(path), mode) as f:
            yield f
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_complete(path):
    """Whether `path` holds a whole folder written by `atomic_dir` (remote: its marker is there)."""
    path = paths.as_path(path)
    if paths.is_remote(path):
        return (path / COMPLETE_MARKER).exists()
    return path.is_dir()


@contextlib.contextmanager
def _remote_file(path, mode):
    path.parent.mkdir(parents=True, exist_ok=True)  # no-op on object stores; a real folder on a local mount
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        with tmp.open(mode) as f:
            yield f
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _remote_dir(path):
    with tempfile.TemporaryDirectory(prefix=f"{path.name}.upload-") as local:
        local = pathlib.Path(local)
        yield local
        files = sorted(p for p in local.rglob("*") if p.is_file())
        marker = path / COMPLETE_MARKER
        if marker.exists():
            marker.unlink()  # first: from here on, readers see an incomplete folder
        if path.exists():
            path.rmtree()  # old files the new folder does not have must not survive
        for source in files:
            target = path / source.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            with source.open("rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
        with marker.open("w") as f:
            json.dump({str(p.relative_to(local).as_posix()): p.stat().st_size for p in files}, f, indent=1)
