"""Per-chip memory of the paper-scale configs on TPU slices, from the TPU compiler on this CPU host.

    python bench/tpu_fit.py [--only NAME ...] [--out bench/tpu_fit.jsonl]

Each case is `mathlm train CONFIG --dry-run --topology SLICE OVERRIDES...` (needs the `tpu` extra); one JSON line
per case with the dry-run's report (or fits=false and the compiler's reason). docs/benchmarks.md ("Fitting a TPU
slice") holds the table made from it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

G = "configs/ganita-208m.yaml"
CASES = {
    # ganita-208m at its 4096 context: the default mesh (data parallel), FSDP, and the two savings taken apart
    "ganita-v5e8-data": (G, "v5e-8", []),
    "ganita-v5e8-fsdp": (G, "v5e-8", ["mesh.fsdp=8", "mesh.data=1"]),
    "ganita-v5e8-fsdp-einsum": (G, "v5e-8", ["mesh.fsdp=8", "mesh.data=1", "model.attention=xla"]),
    "ganita-v5e8-fsdp-nochunk": (G, "v5e-8", ["mesh.fsdp=8", "mesh.data=1", "model.loss_chunk=4096"]),
    "ganita-v4-8-data": (G, "v4-8", []),
    "ganita-v4-8-fsdp": (G, "v4-8", ["mesh.fsdp=4", "mesh.data=1"]),
    "smdm-1028m-v5e16": ("configs/smdm-1028m.yaml", "v5e-16", ["mesh.fsdp=16", "mesh.data=1"]),
    "arm-1028m-v5e16": ("configs/arm-1028m.yaml", "v5e-16", ["mesh.fsdp=16", "mesh.data=1"]),
    "smdm-1028m-v4-16": ("configs/smdm-1028m.yaml", "v4-16", ["mesh.fsdp=8", "mesh.data=1"]),
    "arm-1028m-v4-16": ("configs/arm-1028m.yaml", "v4-16", ["mesh.fsdp=8", "mesh.data=1"]),
}


def run(name: str, extra: list[str]) -> dict:
    config, topo, overrides = CASES[name]
    cmd = [sys.executable, "-m", "mathlm.cli.main", "train", config, "--dry-run", "--topology", topo,
           *overrides, *extra, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"error": (res.stderr or res.stdout).strip().splitlines()[-1:]}
    return {"case": name, "command": " ".join(["mathlm", *cmd[3:-1]]), **report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(CASES))
    ap.add_argument("--out", default="bench/tpu_fit.jsonl")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every case, e.g. train.batch_size=128")
    args = ap.parse_args()
    with open(args.out, "a") as f:
        for name in args.only:
            row = run(name, args.overrides)
            f.write(json.dumps(row) + "\n")
            f.flush()
            peak = row.get("bytes_step_peak_per_device")
            print(name, "fits" if row.get("fits") else "DOES NOT FIT",
                  f"{peak / 2**30:.2f} GiB" if peak else row.get("reason") or row.get("error"), flush=True)


if __name__ == "__main__":
    main()
