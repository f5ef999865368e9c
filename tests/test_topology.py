"""`mathlm train CONFIG --dry-run --topology NAME`: the real step compiled by libtpu for a TPU slice, on this CPU.

Needs the `tpu` extra (libtpu); CI installs it, so these run there rather than skip."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from mathlm.train import topology

ROOT = pathlib.Path(__file__).parent.parent
topology.prepare_environment(topology.parse("v5e-8"))  # this process: quiet libtpu (jax stays on the CPU)


def train_cli(*args, timeout=900):
    env = {k: v for k, v in os.environ.items()  # as a user runs it
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith("TPU_")}
    return subprocess.run([sys.executable, "-m", "mathlm.cli.main", "train", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name,chips,kind", [
    ("v5e-1", 1, "TPU v5 lite"), ("v5e-8", 8, "TPU v5 lite"), ("v5e-256", 256, "TPU v5 lite"),
    ("v4-8", 4, "TPU v4"), ("v4-32", 16, "TPU v4"), ("v5p-8", 4, "TPU v5"), ("v6e-8", 8, "TPU v6 lite"),
])
def test_slice_names_give_the_slice_devices(name, chips, kind):
    devs = topology.devices(topology.parse(name))
    assert len(devs) == chips and {d.device_kind for d in devs} == {kind}
    two = topology.devices(topology.parse(name, slices=2))
    assert len(two) == 2 * chips and {d.slice_index for d in two} == {0, 1}


def test_every_listed_slice_builds():
    for name in topology.TOPOLOGIES:
        topo = topology.parse(name)
        assert len(topology.devices(topo)) == topo.chips, name


def test_math_tiny_compiles_for_v5e_4_and_fits():
    res = train_cli("configs/math-tiny.yaml", "--dry-run", "--topology", "v5e-4", "mesh.fsdp=4")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("fits: yes")
    report = json.loads(lines[-2])
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4 and report["topology"] == "v5e-4"
    assert report["fits"] is True and report["libtpu_version"] == topology.libtpu_version()
    assert 0 < report["bytes_step_peak_per_device"] < report["hbm_bytes_per_device"] == int(15.75 * 2**30)
    # the analytic FLOPs split over 4 chips agree with the TPU compiler's count (no Pallas kernels here)
    assert report["flops_per_step_xla_per_device"] == pytest.approx(report["flops_per_step_model_per_device"],
                                                                     rel=0.05)


def test_an_oversized_step_reports_fits_no_and_fails():
    # 64k-token rows: the einsum attention's (B, H, T, T) scores alone are terabytes per chip
    res = train_cli("configs/math-tiny.yaml", "--dry-run", "--topology", "v5e-4", "mesh.fsdp=4",
                    "train.seq_len=65536", "model.max_seq_len=65536")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("fits: no (") and "memory" in last.lower(), last
    assert "Traceback" not in res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-2])
    assert report["fits"] is False and report["topology"] == "v5e-4"


def test_an_unknown_slice_lists_the_known_ones():
    res = train_cli("configs/math-tiny.yaml", "--dry-run", "--topology", "v9-8")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "unknown TPU topology 'v9-8'" in res.stderr and "v5e-8" in res.stderr and "v4-4096" in res.stderr
    res = train_cli("configs/math-tiny.yaml", "--topology", "v5e-8")
    assert res.returncode == 2 and "needs --dry-run" in res.stderr
