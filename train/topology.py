"""Compile for a TPU pod slice without one: `mathlm train CONFIG --dry-run --topology v5e-8 [--slices N]`.

With libtpu installed (the `tpu` extra), `jax.experimental.topologies` describes a real slice's devices on any
host; the trainer builds its mesh over them and the TPU compiler (libtpu) compiles the real step, reporting
per-chip memory. A step that does not fit fails that compile with RESOURCE_EXHAUSTED. MaxText's
`train_compile.py` works the same way; measurements and caveats in ../shared/research/tpu-aot.md.
Figures belong to the libtpu version: pin the same one on the CPU host as on the TPU VMs.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os

# No jax (or mathlm module that imports it) at import time: prepare_environment must run before jax starts.

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str  # the topology-name prefix libtpu expects ("v5e", "v4", "v5" for v5p, "v6e")
    chip_config: str  # "megacore" (v4, v5p: two TensorCores per chip act as one) or "default"
    hbm_bytes: int  # usable HBM per chip as libtpu reports it in its out-of-memory message
    cores_per_chip: int  # v4-N and v5p-N count TensorCores (2 per chip); v5e-N and v6e-N count chips


CHIPS = {
    "v4": Chip("v4", "megacore", int(30.75 * GIB), 2),
    "v5p": Chip("v5", "megacore", int(95.74 * GIB), 2),
    "v5e": Chip("v5e", "default", int(15.75 * GIB), 1),
    "v6e": Chip("v6e", "default", int(31.25 * GIB), 1),
}

# Chip grid per slice size (MaxText's accelerator_to_spec_map.py): 3-D tori for v4/v5p, 2-D for v5e/v6e.
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def _table() -> dict[str, tuple[str, int]]:
    """Slice name -> (chip type, chips)."""
    out = {}
    for chip_type in ("v4", "v5p"):
        for chips in _GRID_3D:
            out[f"{chip_type}-{chips * 2}"] = (chip_type, chips)
    for chip_type in ("v5e", "v6e"):
        for chips in _GRID_2D:
            out[f"{chip_type}-{chips}"] = (chip_type, chips)
    return out


TOPOLOGIES = _table()


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    slices: int
    chip: Chip
    chips: int  # per slice
    grid: str  # the chip grid, e.g. "2x4"


class TopologyError(ValueError):
    """A bad --topology/--slices or a missing libtpu (a one-line error; not mathlm.train.config's ConfigError,
    whose module imports jax)."""


def parse(name: str, slices: int = 1) -> Topology:
    if name not in TOPOLOGIES:
        raise TopologyError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    if slices < 1:
        raise TopologyError(f"--slices must be >= 1, got {slices}")
    chip_type, chips = TOPOLOGIES[name]
    grid = (_GRID_3D if chip_type in ("v4", "v5p") else _GRID_2D)[chips]
    return Topology(name, slices, CHIPS[chip_type], chips, grid)


def prepare_environment(topo: Topology) -> None:
    """Before jax starts: no attempt to open a TPU backend on this host, and no libtpu start-up noise (the
    accelerator-type variable only silences a warning; the compile target is the topology passed to jax)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile for the chips; compiling touches none, so let several processes load it
    # (two dry-runs at once, or a test process and its CLI children) instead of failing with ABORTED
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    pod = {"v5e": "v5litepod", "v5": "v5p"}.get(topo.chip.family, topo.chip.family)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{pod}-{topo.name.split('-')[1]}")


def libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        raise TopologyError("--topology needs libtpu: pip install -e '.[tpu]' (jax[tpu] at the installed jax "
                          "version)") from None


def devices(topo: Topology) -> list:
    """The slice's devices (no TPU needed), in the order jax lists them."""
    libtpu_version()
    from jax.experimental.topologies import get_topology_desc
    per_host = (1, 1, 1) if topo.chips == 1 else (2, 2, 1)
    desc = get_topology_desc(platform="tpu", topology_name=f"{topo.chip.family}:{topo.grid}",
                             chip_config_name=topo.chip.chip_config, chips_per_host_bounds=per_host,
                             num_slices=topo.slices)
    return list(desc.devices)


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "ran out of memory" in text


def oom_reason(err: BaseException) -> str:
    """The compiler's one-line reason, e.g. 'Ran out of memory on HBM, ... (24.12G) exceeds available HBM ...'."""
    for line in str(err).splitlines():
        if "memory" in line.lower():
            return line.strip()
    return str(err).splitlines()[0].strip()


def dry_run(cfg, topo: Topology) -> dict:
    """Compile the config's step for the slice; the trainer's dry-run report plus the chip's HBM and `fits`.
    A step the compiler refuses for memory comes back as fits=False with its reason instead of raising."""
    from mathlm.train import trainer
    devs = devices(topo)
    head = {"topology": topo.name, "slices": topo.slices, "device_kind": devs[0].device_kind,
            "libtpu_version": libtpu_version(), "hbm_bytes_per_device": topo.chip.hbm_bytes}
    try:
        out = trainer.dry_run(cfg, devs)
    except Exception as e:  # jax.errors.JaxRuntimeError from the TPU compiler
        if not is_out_of_memory(e):
            raise
        return {**head, "devices": len(devs), "fits": False, "reason": oom_reason(e)}
    return {**out, **head, "fits": out["bytes_step_peak_per_device"] <= topo.chip.hbm_bytes}
