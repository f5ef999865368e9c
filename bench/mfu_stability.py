"""Is MFU a property of the config and the machine? The same `mathlm train` run N times in fresh processes.

usage: python bench/mfu_stability.py [--runs 3] [--steps 60] [CONFIG]

Each run is `mathlm train CONFIG train.steps=S --no-progress` in a fresh interpreter and a fresh workdir; the
figure per run is the median MFU over its logged intervals after the first (which includes compilation). The
first run measures the CPU peak and caches it (MATHLM_CACHE, a fresh folder per bench); the others read it.
Target (issue 16): every run within ±10% of the runs' median.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def one_run(config: str, steps: int, workdir: pathlib.Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "mathlm.cli.main", "train", config, "--workdir", str(workdir), "--no-progress",
           f"train.steps={steps}", "train.eval_every=0", "eval.tasks=[]", "checkpoint.every_steps=100000"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    mfu = [r["mfu"] for r in rows if "mfu" in r][1:]
    tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]
    return {"mfu": statistics.median(mfu), "tokens_per_sec": statistics.median(tps), "intervals": len(mfu)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/math-tiny.yaml")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mfu-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["MATHLM_CACHE"] = str(tmp / "cache")
    runs = [one_run(args.config, args.steps, tmp / f"run{i}", env) for i in range(args.runs)]
    peak = list(json.loads((tmp / "cache" / "peak_flops.json").read_text()).items())[0]
    mid = statistics.median(r["mfu"] for r in runs)
    out = {"config": args.config, "steps": args.steps, "peak_key": peak[0], "peak_flops": peak[1]["flops"],
           "runs": runs, "max_dev_from_median": max(abs(r["mfu"] / mid - 1) for r in runs)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
