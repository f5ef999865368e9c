"""Sharding as a table: each weight's logical axes, and rules that map logical axes onto mesh axes.

Logical axes keep the model free of mesh details: the config's `mesh.rules` decides, e.g. `embed -> fsdp`,
`mlp -> tensor`. Activations carry logical axes too (`constrain`, applied by the Transformer to its residual
stream, attention inputs/outputs, MLP hidden and logits) and go through the same table: an activation's batch
dimension takes `batch -> (data, fsdp)` first, so its `embed` dimension finds fsdp used and stays whole, while
heads/mlp/vocab shard over tensor. Without them the partitioner kept full-batch buffers (all rows' logits) on
every chip under FSDP. A dimension that the mapped mesh axes do not divide is replicated instead of failing, so the
same rules serve tiny test models and large ones; `describe()` reports every such fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Weight path (slash-joined, block index as *) -> logical axis per dimension. Kernels are (in, out).
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed/embedding": ("vocab", "embed"),
    "blocks/*/attn_norm/scale": (None,),
    "blocks/*/attn/q/kernel": ("embed", "heads"),
    "blocks/*/attn/k/kernel": ("embed", "kv_heads"),
    "blocks/*/attn/v/kernel": ("embed", "kv_heads"),
    "blocks/*/attn/q/bias": ("heads",),
    "blocks/*/attn/k/bias": ("kv_heads",),
    "blocks/*/attn/v/bias": ("kv_heads",),
    "blocks/*/attn/o/kernel": ("heads", "embed"),
    "blocks/*/mlp_norm/scale": (None,),
    "blocks/*/mlp/gate/kernel": ("embed", "mlp"),
    "blocks/*/mlp/up/kernel": ("embed", "mlp"),
    "blocks/*/mlp/down/kernel": ("mlp", "embed"),
    "final_norm/scale": (None,),
    "lm_head/kernel": ("embed", "vocab"),
}

# Default rules: FSDP shards the model dimension of every matrix, tensor parallelism the heads/ffn/vocab.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)

MESH_AXES = ("data", "fsdp", "tensor")


def path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, axes in LOGICAL_AXES.items():
        if fnmatch.fnmatchcase(path, pattern):
            return axes
    return (None,) * ndim  # unknown extra weights (adapters, biases) are replicated


def _mesh_axes_for(logical: str | None, rules) -> tuple[str, ...]:
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    return ()


def spec_for(shape, axes, rules, mesh: Mesh) -> P:
    used: set[str] = set()
    out = []
    for dim, logical in zip(shape, axes):
        targets = tuple(a for a in _mesh_axes_for(logical, rules) if a not in used and mesh.shape.get(a, 1) > 1)
        size = int(np.prod([mesh.shape[a] for a in targets])) if targets else 1
        if targets and dim % size == 0:
            used.update(targets)
            out.append(targets[0] if len(targets) == 1 else targets)
        else:
            out.append(None)
    return P(*out)


def param_shardings(abstract_params, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every leaf of a params pytree (works on ShapeDtypeStructs)."""

    def one(path, leaf):
        axes = logical_axes(path_str(path), len(leaf.shape))
        return NamedSharding(mesh, spec_for(leaf.shape, axes, rules, mesh))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    batch_axes = tuple(a for a in _mesh_axes_for("batch", rules) if a in mesh.shape)
    return NamedSharding(mesh, P(batch_axes if batch_axes else None))


def describe(abstract_params, mesh: Mesh, rules=DEFAULT_RULES) -> list[str]:
    """One line per weight: path, shape and the partition spec it gets."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        p = path_str(path)
        spec = spec_for(leaf.shape, logical_axes(p, len(leaf.shape)), rules, mesh)
        lines.append(f"{p:40s} {str(tuple(leaf.shape)):18s} {spec}")
    return lines


# ----------------------------------------------------------------------------- activations

_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("mathlm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`, and the attention
    picks its kernel for the mesh's platform (`current_platform`). A one-device mesh constrains nothing, so a
    single-device program is exactly the unconstrained one."""
    token = _ACTIVATIONS.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def traced_under(fn, mesh: Mesh, rules=DEFAULT_RULES):
    """`fn` with its body run inside `activation_sharding(mesh, rules)`: wrap a function before `jax.jit`, so the
    constraints apply at trace time wherever the jitted function is first called."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return traced


def current_mesh() -> tuple[Mesh, tuple] | None:
    """(mesh, rules) of the activation context being traced, or None outside one."""
    return _ACTIVATIONS.get()


def current_platform() -> str:
    """The platform the program being traced will run on: the context mesh's devices ("tpu" for a topology
    dry-run on a CPU host, where `jax.default_backend()` says "cpu"), else the default backend."""
    ctx = _ACTIVATIONS.get()
    return ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()


def activation_spec(shape, *axes: str | None) -> P | None:
    """The PartitionSpec `constrain` would give an activation of `shape`, or None when nothing shards (no
    context, or a one-device mesh)."""
    ctx = _ACTIVATIONS.get()
    if ctx is None or ctx[0].size == 1:
        return None
    mesh, rules = ctx
    return spec_for(shape, axes, rules, mesh)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Pin activation `x` to the logical `axes` (one per dimension) under the current activation context;
    outside one (tests, decoding, a single device) return x untouched."""
    spec = activation_spec(x.shape, *axes)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ACTIVATIONS.get()[0], spec))
