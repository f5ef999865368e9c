"""Google Cloud Storage on localhost for tests: gcp-storage-emulator (the GCS JSON API, in memory, in a process of
its own), reached by both clients a run folder on gs:// uses, unchanged:

- etils.epath -> gcsfs (config.yaml, metrics.jsonl, the lock, orbax's metadata files), via STORAGE_EMULATOR_HOST;
- tensorstore's gcs kvstore (checkpoint arrays, token stores), via TENSORSTORE_GCS_HTTP_URL, which tensorstore
  reads once per process: so one server serves the whole session (`wipe` between tests).

`env()` is the environment a `mathlm` subprocess needs to use the same server. The server runs in a child process
(`python tests/gcs_emulator.py`), not a thread: in a thread it competed for the test process's GIL with whatever
earlier tests left running, and a run in a bucket took 530 s inside the suite against 28 s alone.
"""
from __future__ import annotations

import http.server
import logging
import os
import subprocess
import sys
import urllib.request

BUCKET = "bucket"


def _quiet_errors() -> None:
    """The emulator's server prints a traceback when a client closes a connection early (tensorstore does, after
    a 404); that is noise, not a test failure."""
    http.server.HTTPServer.handle_error = lambda self, request, client_address: None


def _patch_emulator() -> None:
    """What tensorstore relies on and the emulator lacks, added as GCS does it:

    - list: startOffset/endOffset (tensorstore lists, and deletes, a key range with them; ignored, a zarr array's
      `delete_existing` emptied the bucket);
    - preconditions: ifGenerationMatch (0: must not exist) on uploads, reads and deletes -> 412, and
      ifGenerationNotMatch on reads -> 304 (OCDBT's manifest is written compare-and-swap);
    - x-goog-generation on downloads (the generation tensorstore conditions its next write on).

    Done before the emulator's server module is imported: its route table holds the handlers themselves."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    if getattr(objects, "patched_for_tensorstore", False):
        return

    def first(request, key):
        return (request.query.get(key) or [None])[0]

    def generation(storage, bucket, name) -> int:
        try:
            return int(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return 0

    def preconditions(handler, name_of):
        def wrapped(request, response, storage, *args, **kwargs):
            match, not_match = first(request, "ifGenerationMatch"), first(request, "ifGenerationNotMatch")
            if match is not None or not_match is not None:
                gen = generation(storage, request.params["bucket_name"], name_of(request))
                if match is not None and gen != int(match):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    return None
                if not_match is not None and gen == int(not_match):
                    response.status = HTTPStatus.NOT_MODIFIED
                    return None
            return handler(request, response, storage, *args, **kwargs)
        return wrapped

    def with_generation(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            out = handler(request, response, storage, *args, **kwargs)
            if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            return out
        return wrapped

    def in_range(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            start, end = first(request, "startOffset"), first(request, "endOffset")
            answer = response.json

            def filtered(obj: dict):
                items = [o for o in obj.get("items") or []
                         if (start is None or o["name"] >= start) and (end is None or o["name"] < end)]
                return answer({**obj, "items": items})
            response.json = filtered
            return handler(request, response, storage, *args, **kwargs)
        return wrapped

    def object_id(request):
        return request.params["object_id"]

    def upload_name(request):
        return first(request, "name") or request.data["meta"].get("name")

    objects.ls = in_range(objects.ls)
    objects.download = preconditions(with_generation(objects.download), object_id)
    objects.get = preconditions(objects.get, object_id)
    objects.delete = preconditions(objects.delete, object_id)
    objects.insert = preconditions(objects.insert, upload_name)
    objects.patched_for_tensorstore = True


def serve() -> None:
    """The server process: prints its URL, serves until its stdin closes (the test process ended)."""
    _patch_emulator()
    from gcp_storage_emulator.server import create_server
    _quiet_errors()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # "Resource not found": a probe
    server = create_server("localhost", 0, in_memory=True, default_bucket=BUCKET)
    server._api.daemon = True
    server.start()
    print(f"http://localhost:{server._api._httpd.server_address[1]}", flush=True)
    sys.stdin.read()


class Emulator:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the GCS emulator did not start (exit {self.proc.poll()})")
        os.environ.update(self.env())
        logging.getLogger("gcsfs").setLevel(logging.ERROR)

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed token, no metadata server
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # no storage-control RPC to the real GCS

    def reset(self) -> None:
        """An empty bucket, and no cached listings in this process's gcsfs."""
        urllib.request.urlopen(f"{self.url}/wipe?keep-buckets=1").read()
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
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
