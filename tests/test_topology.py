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


def train_cli(*args, timeout=900, command=("train",)):
    env = {k: v for k, v in os.environ.items()  # as a user runs it
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith("TPU_")}
    return subprocess.run([sys.executable, "-m", "mathlm.cli.main", *command, *map(str, args)], env=env, cwd=ROOT,
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
    # the einsum attention: its FLOPs are visible to the compiler (the splash kernel's are not; see below)
    res = train_cli("configs/math-tiny.yaml", "--dry-run", "--topology", "v5e-4", "mesh.fsdp=4",
                    "model.attention=xla")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("fits: yes")
    report = json.loads(lines[-2])
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4 and report["topology"] == "v5e-4"
    assert report["attention"] == "xla" and report["tpu_custom_calls"] == 0
    assert report["fits"] is True and report["libtpu_version"] == topology.libtpu_version()
    assert 0 < report["bytes_step_peak_per_device"] < report["hbm_bytes_per_device"] == int(15.75 * 2**30)
    # the analytic FLOPs split over 4 chips agree with the TPU compiler's count (no Pallas kernels here)
    assert report["flops_per_step_xla_per_device"] == pytest.approx(report["flops_per_step_model_per_device"],
                                                                     rel=0.05)


def test_auto_attention_on_a_tpu_slice_is_the_splash_kernel():
    """`attention: auto` keys off the mesh's platform: on this CPU host the topology step runs splash (its
    forward, dq and dkv Mosaic kernels per layer) and the chunked loss head, and takes less memory."""
    common = ("configs/math-tiny.yaml", "--dry-run", "--topology", "v5e-4", "mesh.fsdp=4", "train.seq_len=1024",
              "model.max_seq_len=1024", "train.batch_size=8")
    reports = {}
    for kind in ("auto", "xla"):
        res = train_cli(*common, f"model.attention={kind}")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        reports[kind] = json.loads(res.stdout.strip().splitlines()[-2])
    auto, xla = reports["auto"], reports["xla"]
    assert auto["attention"] == "splash" and auto["tpu_custom_calls"] >= 3 * 4  # math-tiny has 4 layers
    assert auto["bytes_step_peak_per_device"] < xla["bytes_step_peak_per_device"]


def test_an_oversized_step_reports_fits_no_and_fails():
    # 64k-token rows: the einsum attention's (B, H, T, T) scores alone are terabytes per chip
    res = train_cli("configs/math-tiny.yaml", "--dry-run", "--topology", "v5e-4", "mesh.fsdp=4",
                    "train.seq_len=65536", "model.max_seq_len=65536", "model.attention=xla")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("fits: no (") and "memory" in last.lower(), last
    assert "Traceback" not in res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-2])
    assert report["fits"] is False and report["topology"] == "v5e-4"


def test_w2s_dry_run_compiles_the_recipe_programs_for_a_slice():
    """`mathlm w2s run --dry-run --topology`: each selected program is compiled by libtpu, a line each with its
    per-chip peak, then the JSON, then one verdict for all of them."""
    res = train_cli("configs/w2s-synth-smoke.yaml", "mesh.fsdp=4", "po.train.batch_size=4", "--dry-run",
                    "--topology", "v5e-4", "--only", "strong_orpo_lora", "--only", "weak_sft",
                    command=("w2s", "run"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == f"fits: yes (every program on v5e-4, libtpu {topology.libtpu_version()})"
    reports = json.loads(lines[-2])
    assert list(reports) == ["weak_sft", "strong_orpo_lora"]
    for name, r in reports.items():
        assert r["device_kind"] == "TPU v5 lite" and r["mesh"]["fsdp"] == 4 and r["fits"] is True, name
        assert 0 < r["bytes_step_peak_per_device"] < r["hbm_bytes_per_device"], name
    assert reports["strong_orpo_lora"]["params_trainable"] < reports["strong_orpo_lora"]["params"] / 5  # LoRA
    assert any(line.startswith("strong_orpo_lora") and line.endswith("per chip: fits") for line in lines)
    res = train_cli("configs/w2s-synth-smoke.yaml", "--topology", "v5e-4", command=("w2s", "run"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "needs --dry-run" in res.stderr


def test_an_unknown_slice_lists_the_known_ones():
    res = train_cli("configs/math-tiny.yaml", "--dry-run", "--topology", "v9-8")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "unknown TPU topology 'v9-8'" in res.stderr and "v5e-8" in res.stderr and "v4-4096" in res.stderr
    res = train_cli("configs/math-tiny.yaml", "--topology", "v5e-8")
    assert res.returncode == 2 and "needs --dry-run" in res.stderr


def test_the_attention_choice_keys_off_the_mesh_platform():
    import numpy as np
    from jax.sharding import Mesh

    from mathlm.models import sharding
    from mathlm.models.transformer import ModelConfig, attention_kind
    tpu_mesh = Mesh(np.asarray(topology.devices(topology.parse("v5e-4"))).reshape(1, 4, 1), sharding.MESH_AXES)
    cfg = ModelConfig()
    assert attention_kind(cfg, 1024) == "xla"  # traced for this CPU
    with sharding.activation_sharding(tpu_mesh):
        assert sharding.current_platform() == "tpu"
        assert attention_kind(cfg, 1024) == "splash" and attention_kind(cfg, 4096) == "splash"
        assert attention_kind(cfg, 160) == "xla"  # a block of 160 is not a multiple of splash's 128 lanes
        assert attention_kind(ModelConfig(attention="blocked"), 1024) == "blocked"  # a forced choice stays


def _mesh(devs, **axes):
    from mathlm.train.config import MeshConfig
    from mathlm.train.runtime import make_mesh
    return make_mesh(MeshConfig(**axes), devs)


def test_the_mesh_follows_the_slice_topology():
    """jax's mesh_utils lays the axes on the chips' physical grid (v4-16's 2x2x2 torus is not the listing order)
    and, across two slices, puts the data axis over DCN: every data shard's fsdp x tensor block is inside one slice."""
    import numpy as np
    v4 = topology.devices(topology.parse("v4-16"))
    mesh = _mesh(v4, data=1, fsdp=8)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in v4)
    assert [d.id for d in mesh.devices.flat] != [d.id for d in v4]  # not np.reshape(jax.devices())
    two = topology.devices(topology.parse("v5e-8", slices=2))
    mesh = _mesh(two, data=4, fsdp=4)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert all(len(set(slice_of[i].flat)) == 1 for i in range(4))  # each data row lies in one slice
    assert set(slice_of[:2].flat) == {0} and set(slice_of[2:].flat) == {1}
    # fsdp across the slices when asked (or when data cannot split over them)
    for kw in ({"data": 4, "fsdp": 4, "dcn_data": 1, "dcn_fsdp": 2}, {"data": 1, "fsdp": 16}):
        slice_of = np.vectorize(lambda d: d.slice_index)(_mesh(two, **kw).devices)
        half = slice_of.shape[1] // 2
        assert set(slice_of[:, :half].flat) == {0} and set(slice_of[:, half:].flat) == {1}, kw


def test_a_mesh_that_cannot_be_laid_out_is_one_config_error():
    from mathlm.train.config import ConfigError
    two = topology.devices(topology.parse("v5e-8", slices=2))
    with pytest.raises(ConfigError, match="must equal the 2 slices"):
        _mesh(two, data=4, fsdp=4, dcn_data=2, dcn_fsdp=2)
    import jax
    with pytest.raises(ConfigError, match="must equal the 1 slices"):  # one process, one slice: no DCN
        _mesh(jax.devices(), fsdp=len(jax.devices()), dcn_fsdp=2)


def test_cpu_devices_keep_their_order():
    import jax
    devs = jax.devices()
    mesh = _mesh(devs, fsdp=2, tensor=2)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devs]
