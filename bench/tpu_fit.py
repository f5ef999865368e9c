"""Per-chip memory of the paper-scale configs on TPU slices, from the TPU compiler on this CPU host.

    python bench/tpu_fit.py [--only NAME ...] [--out bench/tpu_fit.jsonl] [overrides ...]
    python bench/tpu_fit.py --table [bench/tpu_fit.jsonl]     # the markdown table of docs/benchmarks.md

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
    "ganita-v5e4-data": (G, "v5e-4", []),  # the smallest v5e slice for the configured batch 64
    "ganita-v5e1-mb8": (G, "v5e-1", ["train.micro_batches=8"]),  # one chip: 8 micro-batches of 8
    "smdm-1028m-v5e16": ("configs/smdm-1028m.yaml", "v5e-16", ["mesh.fsdp=16", "mesh.data=1"]),
    "smdm-1028m-v5e16-mb2": ("configs/smdm-1028m.yaml", "v5e-16", ["mesh.fsdp=16", "mesh.data=1",
                                                                   "train.micro_batches=2"]),
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


def table(path: str) -> str:
    """The markdown table of docs/benchmarks.md from the JSON lines (the last row of each case)."""
    rows = {}
    for line in open(path):
        r = json.loads(line)
        rows[r["case"]] = r
    gib = lambda r, k: f"{r[k] / 2**30:.2f}" if k in r else "-"
    out = ["| case | slice | mesh | batch (per chip) | attention | fits | peak GiB/chip | temp | args | "
           "model TFLOP/step/chip | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cfg, topo, over = CASES[name]
        mesh = r.get("mesh") or {}
        chips = r.get("devices") or 1
        batch = next((o.split("=")[1] for o in over if o.startswith("train.batch_size=")), None)
        mb = next((o.split("=")[1] for o in over if o.startswith("train.micro_batches=")), None)
        size = {"configs/ganita-208m.yaml": 64}.get(cfg, 256) if batch is None else int(batch)
        per_chip = f"{size} ({size // chips}" + (f", {mb} micro-batches" if mb else "") + ")"
        fits = "yes" if r.get("fits") else "**no**: " + str(r.get("reason", r.get("error")))
        flops = f"{r['flops_per_step_model_per_device'] / 1e12:.1f}" if "flops_per_step_model_per_device" in r else "-"
        out.append(f"| {name} | {topo} | {' '.join(f'{k}={v}' for k, v in mesh.items() if v > 1) or '-'} | "
                   f"{per_chip} | {r.get('attention', '-')} | {fits} | {gib(r, 'bytes_step_peak_per_device')} | "
                   f"{gib(r, 'bytes_step_temp_per_device')} | {gib(r, 'bytes_step_args_per_device')} | {flops} | "
                   f"{r.get('compile_seconds', '-')} |")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2] if len(sys.argv) > 2 else "bench/tpu_fit.jsonl"))
        return
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
