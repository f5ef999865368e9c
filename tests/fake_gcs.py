"""An in-process stand-in for Google Cloud Storage behind etils.epath: `gs://` paths go to an fsspec memory store.

epath sends `gs://` to fsspec's "gcs" filesystem when TensorFlow is absent; registering this class under that
name (and "gs") keeps every object in memory. Like GCS, it refuses appends: an object is written whole.
"""
from __future__ import annotations

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, **kwargs):  # epath passes GCS options (finalize_on_close=...)
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        path = path.strip("/")
        return "/" + path if path else ""

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: GCS objects cannot be appended to")
        return super()._open(path, mode, **kwargs)


def install() -> type[FakeGCS]:
    """Route gs:// to a fresh, empty FakeGCS; returns the class (its `store` holds the objects)."""
    FakeGCS.store = {}
    FakeGCS.pseudo_dirs = [""]
    FakeGCS.clear_instance_cache()
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
    return FakeGCS
