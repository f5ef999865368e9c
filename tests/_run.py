"""Train in a fresh process (used by tests for 1-device baselines and jax.distributed runs).

usage: python _run.py WORKDIR RECORD_FILE override [override ...]
Writes {"losses": [...], "windows": [source indices this process read, in read order]} to RECORD_FILE.
"""
import json
import sys

from mathlm.data import pipeline
from mathlm.train.config import load_config
from mathlm.train.loop import train

read = []
_orig = pipeline.PackedWindows.__getitem__


def _recording(self, i):
    read.append(int(i))
    return _orig(self, i)


pipeline.PackedWindows.__getitem__ = _recording

if __name__ == "__main__":
    workdir, record, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    train(cfg, workdir, show_progress=False)
    import jax
    lines = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")] if jax.process_index() == 0 else []
    json.dump({"losses": [r["loss"] for r in lines if "loss" in r], "windows": list(dict.fromkeys(read)),
               "process": jax.process_index(), "devices": jax.device_count()}, open(record, "w"))
