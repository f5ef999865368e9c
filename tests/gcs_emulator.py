"""Google Cloud Storage on localhost for tests: gcp-storage-emulator (the GCS JSON API, in memory, in a thread of
the test process), reached by both clients a run folder on gs:// uses, unchanged:

- etils.epath -> gcsfs (config.yaml, metrics.jsonl, the lock, orbax's metadata files), via STORAGE_EMULATOR_HOST;
- tensorstore's gcs kvstore (checkpoint arrays, token stores), via TENSORSTORE_GCS_HTTP_URL, which tensorstore
  reads once per process: so one server serves the whole session (`wipe` between tests).

`env()` is the environment a `mathlm` subprocess needs to use the same server.
"""
from __future__ import annotations

import http.server
import logging
import os

BUCKET = "bucket"


def _quiet_errors() -> None:
    """The emulator's server prints a traceback when a client closes a connection early (tensorstore does, after
    a 404); that is noise, not a test failure."""
    http.server.HTTPServer.handle_error = lambda self, request, client_address: None


def _honour_list_offsets() -> None:
    """tensorstore lists (and deletes) a key range with startOffset/endOffset; the emulator ignores both and
    answers with every object under the prefix, so a zarr array's `delete_existing` would empty the bucket. Filter
    its answer by them, as GCS does (start inclusive, end exclusive). Done before its server module is imported:
    the route table holds the handler itself."""
    from gcp_storage_emulator.handlers import objects
    if getattr(objects.ls, "honours_offsets", False):
        return
    original = objects.ls

    def ls(request, response, storage, *args, **kwargs):
        start = (request.query.get("startOffset") or [None])[0]
        end = (request.query.get("endOffset") or [None])[0]
        answer = response.json

        def in_range(obj: dict) -> dict:
            items = [o for o in obj.get("items") or []
                     if (start is None or o["name"] >= start) and (end is None or o["name"] < end)]
            return answer({**obj, "items": items})
        response.json = in_range
        return original(request, response, storage, *args, **kwargs)
    ls.honours_offsets = True
    objects.ls = ls


class Emulator:
    def __init__(self):
        _honour_list_offsets()
        from gcp_storage_emulator.server import create_server
        _quiet_errors()
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # "Resource not found": a probe
        self.server = create_server("localhost", 0, in_memory=True, default_bucket=BUCKET)
        self.server._api.daemon = True  # the test process exits without stopping it
        self.server.start()
        self.url = f"http://localhost:{self.server._api._httpd.server_address[1]}"
        os.environ.update(self.env())
        logging.getLogger("gcsfs").setLevel(logging.ERROR)

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed token, no metadata server
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # no storage-control RPC to the real GCS

    def reset(self) -> None:
        """An empty bucket, and no cached listings in this process's gcsfs."""
        self.server.wipe(keep_buckets=True)
        import gcsfs
        gcsfs.GCSFileSystem.clear_instance_cache()
        from etils.epath import backend
        backend.fsspec_backend._get_filesystem.cache_clear()

    def objects(self, prefix: str = "") -> list[str]:
        """Object names in the bucket (under `prefix`)."""
        import gcsfs
        fs = gcsfs.GCSFileSystem(token="anon")
        fs.invalidate_cache()
        return sorted(p.removeprefix(f"{BUCKET}/") for p in fs.find(f"{BUCKET}/{prefix}"))

    def stop(self) -> None:
        self.server.stop()
