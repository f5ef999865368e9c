"""Interrupt a run at N points with SIGTERM and with kill -9, rerun each to the end, and check it is bit-exact.

usage: python bench/kill_points.py [--points 10] [--steps 120] [--procs 1|2] [--gcs]

A tiny model on a synthetic corpus (as the tests build it). One uninterrupted run gives the reference: its
per-step losses and the final checkpoint's content checksums (params, optimizer, data state). Each interrupted
run is signalled once metrics.jsonl shows step >= k (k spread over the run), then rerun with the same command;
it counts as exact when every step's loss and the final checksums equal the reference's. kill -9 runs save a
checkpoint every 10 steps (a kill loses the steps after the last one; the rerun redoes them). `--gcs`: every run
folder is `gs://bucket/...` on GCS on localhost (tests/gcs_emulator.py, in this process), as a pod job's would be.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=0", "train.warmup_steps=2", "train.lr=1e-2", "checkpoint.async_save=false",
        "checkpoint.every_steps=10", "checkpoint.keep=3", "eval.tasks=[]", "data.validation=null", "mesh.data=1"]


def corpus(root: pathlib.Path) -> list[str]:
    from mathlm.data import synth
    from mathlm.data.sources import read_examples
    from mathlm.data.store import write_store
    from mathlm.data.tokenizer import train_tokenizer
    paths = synth.write_jsonl(synth.generate(synth.SynthConfig(n=800, seed=0)), root / "jsonl")
    tok = train_tokenizer((e.text for e in read_examples([str(paths["train"])])), 512)
    tok.save(root / "tokenizer.json")
    write_store(str(root / "train"), read_examples([str(paths["train"])]), tok)
    return [f"data.train=[{root / 'train'}]", f"data.tokenizer={root / 'tokenizer.json'}"]


EXTRA_ENV: dict[str, str] = {}  # the emulator's, with --gcs
POLL = 0.005  # seconds between reads of metrics.jsonl


def start(workdir, overrides, procs: int) -> list[subprocess.Popen]:
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **EXTRA_ENV}
    cmd = [sys.executable, "-m", "mathlm.cli.main", "train", "configs/math-tiny.yaml", "--workdir", str(workdir),
           "--no-progress", *overrides]
    if procs == 1:
        return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen(cmd + ["mesh.distributed=auto"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE,
                             env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i))) for i in range(2)]


def wait(ps) -> list[int]:
    return [p.wait(timeout=600) for p in ps]


def logged(workdir) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checksums(workdir, step) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["checksums"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--gcs", action="store_true", help="run folders in a gs:// bucket (GCS on localhost)")
    args = ap.parse_args()
    global POLL
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kill-points-"))
    overrides = TINY + corpus(tmp / "corpus") + [f"train.steps={args.steps}"]
    runs = tmp
    if args.gcs:
        sys.path.insert(0, str(ROOT / "tests"))
        import gcs_emulator

        from mathlm.train.paths import run_path
        EXTRA_ENV.update(gcs_emulator.Emulator().env())
        runs, POLL = run_path("gs://bucket/kill-points"), 0.2  # the emulator serves one request at a time
    if args.procs == 2:
        overrides = [o for o in overrides if o != "mesh.data=1"]
    ref = runs / "reference"
    assert wait(start(ref, overrides, args.procs)) == [0] * args.procs
    want, want_sums = logged(ref), checksums(ref, args.steps)
    results = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for i in range(args.points):
            at = 3 + i * (args.steps - 20) // args.points
            wd = runs / f"{sig.name}-{i}"
            ps = start(wd, overrides, args.procs)
            while max(logged(wd), default=0) < at and all(p.poll() is None for p in ps):
                time.sleep(POLL)
            victims = ps[-1:] if sig == signal.SIGTERM else ps  # SIGTERM to one process; kill -9 to all
            for p in victims:
                p.send_signal(sig)
            codes = wait(ps)
            cut = max(logged(wd), default=0)
            rerun = wait(start(wd, overrides, args.procs))
            exact = logged(wd) == want and checksums(wd, args.steps) == want_sums
            results.append({"signal": sig.name, "at": at, "stopped_at": cut, "exit": codes, "rerun_exit": rerun,
                            "exact": exact})
            print(json.dumps(results[-1]), flush=True)
    for name in ("SIGTERM", "SIGKILL"):
        rs = [r for r in results if r["signal"] == name]
        clean = sum(r["exact"] and (name == "SIGKILL" or set(r["exit"]) == {0}) for r in rs)
        print(f"{name}: {clean}/{len(rs)} exact" + (" with exit 0" if name == "SIGTERM" else ""))


if __name__ == "__main__":
    main()
