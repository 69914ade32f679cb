"""Atomic writes: a reader sees the old file or folder, or the complete new one, never a part."""
import contextlib
import os
import pathlib
import shutil
import tempfile


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a temporary folder beside `path`; on success it replaces `path` in one rename.

    On failure the temporary folder is removed and `path` is left as it was.
    """
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
