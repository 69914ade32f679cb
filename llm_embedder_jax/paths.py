"""Local and remote paths through one API (`etils.epath`).

Workdirs, checkpoints, data files, score outputs and exports may be local paths or
object-store URIs (gs://bucket/run, s3://...). `as_path` gives an `epath.Path` for
either, with the pathlib methods the code uses (/, open, exists, glob, mkdir,
read_text, ...). epath reaches gs:// through TensorFlow's gfile when TensorFlow is
installed and through fsspec otherwise (then `pip install gcsfs`; s3fs for s3://).
orbax reads and writes checkpoints on the same URIs itself.

Writes that must be all-or-nothing go through `atomic` (no folder rename on object
stores: see there).
"""
import os

from etils import epath


def is_remote(path):
    """Whether `path` names an object in a store (scheme://...) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path):
    """An `epath.Path`; local paths are made absolute (what orbax needs, and stable across chdir)."""
    path = epath.Path(path)
    return path if is_remote(path) else path.absolute()
