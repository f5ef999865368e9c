"""Where the run executes: jax.distributed, the device mesh, FLOP accounting and the hardware peak for MFU."""
from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mathlm.models.transformer import ModelConfig
from mathlm.train.config import ConfigError, MeshConfig

_initialized = False


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Join a multi-process run. Must run before any other JAX call touches a backend.

    "auto" initialises when a cluster is visible: an explicit coordinator (config or JAX_COORDINATOR_ADDRESS),
    a multi-task SLURM job, or a TPU pod slice (jax.distributed detects the rest on TPU and SLURM).
    """
    global _initialized
    if _initialized or cfg.distributed == "off":
        return
    coordinator = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if cfg.distributed == "auto" and not (coordinator or slurm or tpu_pod):
        return
    kwargs = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    nproc = cfg.num_processes if cfg.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if nproc is not None:
        kwargs["num_processes"] = int(nproc)
    if pid is not None:
        kwargs["process_id"] = int(pid)
    jax.distributed.initialize(**kwargs)
    _initialized = True


def _slices(devices: list) -> int:
    """TPU slices among `devices` (multislice jobs join slices over the data-center network, DCN)."""
    return len({d.slice_index for d in devices}) if hasattr(devices[0], "slice_index") else 1


def _dcn_shape(cfg: MeshConfig, data: int, fsdp: int, granules: int) -> tuple[int, int]:
    """(dcn_data, dcn_fsdp): how the mesh's data and fsdp axes span granules (slices, or processes when
    asked for). Default: the slices go on `data` (only the gradient all-reduce crosses DCN), else on `fsdp`."""
    dcn_fsdp = cfg.dcn_fsdp
    if cfg.dcn_data != -1:
        dcn_data = cfg.dcn_data
    elif dcn_fsdp == 1 and data % granules != 0 and fsdp % granules == 0:
        dcn_data, dcn_fsdp = 1, granules
    else:
        dcn_data = granules // max(dcn_fsdp, 1)
    if dcn_data * dcn_fsdp != granules or data % max(dcn_data, 1) or fsdp % max(dcn_fsdp, 1):
        raise ConfigError(f"mesh.dcn_data={dcn_data} x mesh.dcn_fsdp={dcn_fsdp} must equal the {granules} slices "
                          f"and divide mesh data={data} and fsdp={fsdp}")
    return dcn_data, dcn_fsdp


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of the run; a TPU topology's devices
    for a compile-only dry run), laid out on the physical topology by jax's mesh_utils: ICI rings/tori within a
    slice, and `mesh.dcn_data` / `mesh.dcn_fsdp` of the data and fsdp axes across slices. On CPU and GPU within
    one slice the order is jax.devices()', as before (numerics unchanged)."""
    from jax.experimental import mesh_utils
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    fsdp, tensor = cfg.fsdp, cfg.tensor
    data = cfg.data if cfg.data != -1 else n // max(fsdp * tensor, 1)
    if min(data, fsdp, tensor) < 1 or data * fsdp * tensor != n:
        raise ConfigError(f"mesh data={cfg.data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
                          f"does not match the {n} available devices")
    slices = _slices(devices)
    asked = cfg.dcn_data not in (-1, 1) or cfg.dcn_fsdp != 1
    if slices == 1 and not asked:
        grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices, allow_split_physical_axes=True)
        return Mesh(grid, ("data", "fsdp", "tensor"))
    # Several slices, or DCN axes asked for across processes (multi-node GPU: each process a granule).
    by_process = slices == 1
    granules = len({d.process_index for d in devices}) if by_process else slices
    dcn_data, dcn_fsdp = _dcn_shape(cfg, data, fsdp, granules)
    grid = mesh_utils.create_hybrid_device_mesh((data // dcn_data, fsdp // dcn_fsdp, tensor), (dcn_data, dcn_fsdp, 1),
                                                devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)
    return Mesh(grid, ("data", "fsdp", "tensor"))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token = 6·N + 12·n_layers·d_attn·T (PaLM appendix B).

    N counts the weights used in matmuls (all blocks + the output head; the embedding lookup is free);
    the second term is attention's QK^T and AV, forward and backward, counted for the full (unmasked) square.
    """
    n_matmul = cfg.param_count(embeddings=False) - (2 * cfg.n_layers + 1) * cfg.d_model
    n_matmul += cfg.d_model * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def network_flops_per_token(cfg: ModelConfig, seq_len: int, params_like: dict) -> float:
    """`flops_per_token` counted from the network's actual weights (a model variant: a Control-LLM merge site
    runs two blocks, a stack expansion N + k): N = every matrix outside the embedding, attention once per q
    projection. Frozen weights count as trained ones (6N), the usual MFU convention."""
    leaves = jax.tree_util.tree_flatten_with_path(params_like)[0]
    paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    n_matmul = sum(int(np.prod(x.shape)) for p, (_, x) in zip(paths, leaves) if x.ndim == 2 and
                   not p.startswith("embed/"))
    n_matmul += cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0
    n_attn = sum(p.endswith("attn/q/kernel") for p in paths)
    return 6.0 * n_matmul + 12.0 * n_attn * cfg.n_heads * cfg.head_dim * seq_len


def flops_6nd(cfg: ModelConfig, tokens: float) -> float:
    """Training compute C = 6·N·D of the scaling-law papers (Kaplan et al. 2020; SMDM's IsoFLOP analysis), with N
    the non-embedding parameters and D the tokens; for planning sweeps (MFU uses `flops_per_token`)."""
    return 6.0 * cfg.param_count(embeddings=False) * float(tokens)


# Dense peak FLOP/s per device for known accelerators (bf16 tensor cores / MXU).
_PEAKS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "tpu v4": 275e12, "tpu v5 lite": 197e12,
          "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6": 918e12}


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of a large square matmul on device 0: the machine's practical peak (used on CPUs)."""
    dev = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def _machine_key() -> str:
    """What the CPU peak depends on: the processor, the cores this process may use, the jax/XLA version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} | {cores} cores | jax {jax.__version__}"


def peak_cache_path() -> pathlib.Path:
    root = os.environ.get("MATHLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mathlm")
    return pathlib.Path(root) / "peak_flops.json"


def cached_cpu_peak(log=None) -> float:
    """This machine's fp32 matmul peak, measured once (best of 20 2048^3 matmuls) and cached by processor, core
    count and jax version: a per-run measurement moved with whatever else the host was doing (identical runs
    showed MFU 50% and 99%); a fixed peak leaves MFU to move with throughput only. `train.peak_flops` overrides."""
    path, key = peak_cache_path(), _machine_key()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), dict) and table[key].get("flops", 0) > 0:
        return float(table[key]["flops"])
    flops = measured_matmul_peak("float32", 2048, 20)
    table[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "how": "best of 20 float32 2048x2048 matmuls on device 0"}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(path)
        if log:
            log(f"MFU peak: measured {flops / 1e9:.1f} GFLOP/s on this machine ({key}); cached in {path}")
    except OSError:  # a read-only home: measured again next run
        pass
    return flops


def peak_flops_per_device(override: float | None = None) -> float:
    if override:
        return override
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in _PEAKS.items():
        if name in kind:
            return peak
    return cached_cpu_peak()
