"""Control-LLM expansion as a model variant (`model.variant: {name: expand, ...}`; linkedin/ControlLLM
`ModelExpander`): frozen pretrained blocks beside trainable copies, merged in output space.

Notation: N base layers, k = `num_layers`, s = N // k; the expansion points are E = {i : (i + 1) mod s = 0}.
  - concat (`expand_layers_concat`): each i in E becomes a merge site (pretrained block + trainable full copy,
    both RMSNorm scales included); depth N.
  - stack (`expand_layers_stack`, = LLaMA-Pro `block_expansion.py`): after each i in E a copy of block i whose
    attention and MLP output projections are zero (the identity at init); depth N + k, a plain Llama.
  - hybrid (`expand_layers_hybrid`): E alternates, starting with a stack insertion; depth N + k/2, k/2 sites.
Layout: the base's flat `blocks` list, in depth order. Site j's weights are blocks/j/pretrained/..., blocks/j/
expanded/... and its gate; a stack insertion is an ordinary block. The k sites close k contiguous groups of s
blocks (s + 1 with an insertion), so scanned layers can later scan over groups without changing checkpoints.
The merge and divergence formulas are in models/merges.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mathlm.models import merges
from mathlm.models.transformer import Block, ModelConfig, RMSNorm, Transformer
from mathlm.models.variants import VariantSpec, check_keys, register

NAME = "expand"
TYPES = ("concat", "stack", "hybrid")


class ExpandError(ValueError):
    """A bad expansion setting; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ExpandOptions:
    """The `expand:` config section and `convert expand` flags (the reference's `config.expansion`)."""
    type: str = "concat"  # expand_type
    num_layers: int = 8  # num_exp_layers, k
    merge: str = "lerp"  # merge_method
    gate_init: float | None = 0.0  # interpolation_factor f (sigma(0) = 0.5); null: lerp with a = 1
    freeze_gate: bool = False  # freeze_interpolation_factor
    div_loss: str = "cosine"  # interpolation_loss_type
    div_alpha: float = 1.0  # interpolation_loss_alpha: 0 = no divergence, -1 = weighted by the gate
    norm_alpha: float = 0.0  # interpolation_norm_alpha: 0 = plain RMSNorm in the copies, -1 = learned
    freeze_base_layers: bool = True  # freeze_ori_layers
    freeze_non_layers: bool = True  # freeze_ori_non_layers: embeddings, final norm, lm_head
    expanded_from: str | None = None  # the checkpoint it was expanded from

    @classmethod
    def parse(cls, options: dict) -> ExpandOptions:
        try:
            check_keys(cls, options, "expand")
        except ValueError as e:
            raise ExpandError(str(e)) from None
        return cls(**options)

    def validate(self, cfg: ModelConfig) -> None:
        n, k = cfg.n_layers, self.num_layers
        checks = [
            (self.type in TYPES, f"expand.type must be one of {', '.join(TYPES)}, got {self.type!r}"),
            (self.merge in merges.MERGES,
             f"expand.merge must be one of {', '.join(merges.MERGES)}, got {self.merge!r}"),
            (self.div_loss in merges.DIVERGENCES,
             f"expand.div_loss must be one of {', '.join(merges.DIVERGENCES)}, got {self.div_loss!r}"),
            (isinstance(k, int) and 1 <= k <= n, f"expand.num_layers must be in [1, {n}] (the base's layers), got {k}"),
            # The reference silently makes N // s sites when k does not divide N, and its merge-back then asserts.
            (n % k == 0 if isinstance(k, int) and k >= 1 else True,
             f"expand.num_layers={k} must divide the base model's {n} layers"),
            (self.type != "hybrid" or k % 2 == 0, f"expand.type=hybrid needs an even expand.num_layers, got {k}"),
            (self.gate_init is not None or self.merge == "lerp",
             f"expand.gate_init=null (a = 1) exists only for merge lerp, not {self.merge}"),
            (self.norm_alpha == -1 or 0 <= self.norm_alpha <= 1,
             f"expand.norm_alpha must be in [0, 1] or -1, got {self.norm_alpha}"),
            (not (self.div_loss == "attention" and self.div_alpha != 0 and cfg.attention == "cudnn"),
             "expand.div_loss=attention compares attention probabilities, which fused attention never forms: "
             "set model.attention to xla or auto"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ExpandError(msg)

    @property
    def n_sites(self) -> int:
        """M, the number of merge sites the divergence is averaged over."""
        return {"concat": self.num_layers, "hybrid": self.num_layers // 2, "stack": 0}[self.type]


def expansion_points(n_layers: int, k: int) -> list[int]:
    s = n_layers // k
    return [i for i in range(n_layers) if (i + 1) % s == 0]


def layout(n_layers: int, opts: ExpandOptions) -> list[tuple[str, int]]:
    """Per depth position: ("base" | "site" | "insert", the original block index it comes from)."""
    points = expansion_points(n_layers, opts.num_layers)
    role = {}
    for p, i in enumerate(points):
        if opts.type == "concat" or (opts.type == "hybrid" and p % 2 == 1):
            role[i] = "site"
        else:
            role[i] = "stack"
    out = []
    for i in range(n_layers):
        r = role.get(i, "base")
        out.append(("site", i) if r == "site" else ("base", i))
        if r == "stack":
            out.append(("insert", i))
    return out


class ExpandedNorm(RMSNorm):
    """`ExpandedLayerNorm`: beta h + (1 - beta) RMSNorm(h) in the copies; beta fixed, or (norm_alpha -1)
    clip(2 sigma(g) - 1, 0, 1) with a (1,) parameter g initialised to gate_init."""

    def __init__(self, dim: int, eps: float, alpha: float, gate_init: float):
        super().__init__(dim, eps)
        self.alpha = alpha
        if alpha == -1:
            self.gate = nnx.Param(jnp.full((1,), gate_init, jnp.float32))

    def __call__(self, x):
        beta = jnp.clip(2 * jax.nn.sigmoid(self.gate[0]) - 1, 0, 1) if self.alpha == -1 else self.alpha
        return (beta * x.astype(jnp.float32) + (1 - beta) * super().__call__(x).astype(jnp.float32)).astype(x.dtype)


def _uniform(key, shape, fan_in):
    """PyTorch's default Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class MergeSite(nnx.Module):
    """One merge layer (`MergeLayer*`): h_pre = pretrained(h_in), h_exp = expanded(h_in), merged by the gate."""

    def __init__(self, cfg: ModelConfig, opts: ExpandOptions, rngs: nnx.Rngs):
        self.merge, self.div_loss, self.div_alpha = opts.merge, opts.div_loss, opts.div_alpha
        self.n_sites = opts.n_sites
        self.gate_is_one = opts.gate_init is None
        self.pretrained = Block(cfg, rngs)
        self.expanded = Block(cfg, rngs)
        if opts.norm_alpha != 0:
            g = 0.0 if opts.gate_init is None else opts.gate_init
            self.expanded.attn_norm = ExpandedNorm(cfg.d_model, cfg.norm_eps, opts.norm_alpha, g)
            self.expanded.mlp_norm = ExpandedNorm(cfg.d_model, cfg.norm_eps, opts.norm_alpha, g)
        d, f = cfg.d_model, (opts.gate_init or 0.0)
        key = rngs.params()
        if opts.merge in ("lerp", "slerp", "proj", "prog") and not self.gate_is_one:
            self.interpolation_factor = nnx.Param(jnp.full((1,), f, jnp.float32))
        if opts.merge in ("dlerp", "dlerpin"):  # interp_weight.fc = Linear(2d | d, 1); the bias filled with f
            fan_in = 2 * d if opts.merge == "dlerp" else d
            self.interp_w = nnx.Param(_uniform(key, (fan_in,), fan_in))
            self.interp_b = nnx.Param(jnp.full((1,), f, jnp.float32))
        if opts.merge == "moe":  # gating.gate_network[0] = Linear(d, 2); bias c = [0, f]
            self.router = nnx.Param(_uniform(key, (2, d), d))
            self.router_bias = nnx.Param(jnp.array([0.0, f], jnp.float32))
        if opts.merge in ("proj", "prog"):  # `_initialize_identity`: I + 0.01 N(0, 1), torch (out, in) layout
            self.proj = nnx.Param(jnp.eye(d, dtype=jnp.float32) + 0.01 * jax.random.normal(key, (d, d)))

    def gate(self) -> dict:
        names = {"factor": "interpolation_factor", "w": "interp_w", "b": "interp_b", "router": "router",
                 "bias": "router_bias", "proj": "proj"}
        return {k: getattr(self, v)[...] for k, v in names.items() if hasattr(self, v)}

    def init_cache(self, batch: int, slots: int):
        """Two caches, one per branch: after training the two blocks' K/V projections differ."""
        return self.pretrained.init_cache(batch, slots), self.expanded.init_cache(batch, slots)

    def __call__(self, x, positions, mask, kv_cache=None, index=None):
        gate = self.gate()
        if kv_cache is not None:  # decoding: no divergence, no statistics
            # deviation from ControlLLM: slerp decodes with its training rule (batch-global fallback per forward
            # call); the reference's vLLM path always uses lerp.
            h_pre, c_pre = self.pretrained(x, positions, mask, kv_cache[0], index)
            h_exp, c_exp = self.expanded(x, positions, mask, kv_cache[1], index)
            return merges.merge(self.merge, gate, x, h_pre, h_exp, self.gate_is_one)[0], (c_pre, c_exp)
        # Divergence and statistics only where a caller collects them (`nnx.capture`, as the objectives' and the
        # eval's `forward`): a plain call (perplexity, greedy reference, export checks) neither pays for them nor
        # leaves sown values on the module.
        if not hasattr(self, "__captures__"):
            h_pre, h_exp = self.pretrained(x, positions, mask), self.expanded(x, positions, mask)
            return merges.merge(self.merge, gate, x, h_pre, h_exp, self.gate_is_one)[0]
        want_probs = self.div_loss == "attention" and self.div_alpha != 0
        h_pre, p_pre = _branch(self.pretrained, x, positions, mask, want_probs)
        h_exp, p_exp = _branch(self.expanded, x, positions, mask, want_probs)
        out, a, cmp_pre = merges.merge(self.merge, gate, x, h_pre, h_exp, self.gate_is_one)
        cmp_exp = h_exp
        if self.merge == "moe" and self.div_alpha != 0:
            routed = merges.moe_routed(gate, x)
            cmp_pre, cmp_exp = merges.moe_inputs(cmp_pre, cmp_exp, routed)
        loss = merges.site_loss(self.div_loss, self.div_alpha, a, cmp_pre, cmp_exp, probs=(p_pre, p_exp))
        self.sow(nnx.Intermediate, "aux_loss", loss / self.n_sites)
        self.sow(nnx.Intermediate, "site_div", loss)
        self.sow(nnx.Intermediate, "site_cos", jnp.mean(merges.cosine_similarity(h_pre, h_exp)))
        self.sow(nnx.Intermediate, "site_gate", merges.gate_mean(self.merge, gate, x, a))
        return out


def _branch(block: Block, x, positions, mask, want_probs: bool):
    """A block's post-residual output, with its attention probabilities when the divergence needs them.
    # deviation from ControlLLM: the probabilities are recomputed by an einsum beside the block's own attention
    # (which may be a fused kernel), instead of switching the whole model to eager attention."""
    if not want_probs:
        return block(x, positions, mask), None
    h = block.attn_norm(x)
    probs = block.attn.probs(h, positions, mask)
    x = x + block.attn(h, positions, mask)
    return x + block.mlp(block.mlp_norm(x)), probs


class ExpandedTransformer(Transformer):
    def __init__(self, cfg: ModelConfig, opts: ExpandOptions, rngs: nnx.Rngs):
        self.opts = opts
        super().__init__(cfg, rngs)

    def _make_blocks(self, cfg: ModelConfig, rngs: nnx.Rngs) -> list[nnx.Module]:
        return [MergeSite(cfg, self.opts, rngs) if role == "site" else Block(cfg, rngs)
                for role, _ in layout(cfg.n_layers, self.opts)]


# ----------------------------------------------------------------------------- surgery, freezing, metadata

def expand_params(base: dict, fresh: dict, n_layers: int, opts: ExpandOptions) -> dict:
    """The expanded weights from a plain model's: every block copied where the layout puts it (site copies
    whole, norms included), stack insertions with attention and MLP output projections zeroed (the exact identity
    at init; norms kept); gates, P and relaxed-norm gates from `fresh` (a freshly initialised expanded model)."""
    out = {k: v for k, v in base.items() if k != "blocks"}
    blocks = {}
    for j, (role, i) in enumerate(layout(n_layers, opts)):
        src = base["blocks"][i]
        if role == "base":
            blocks[j] = src
        elif role == "insert":
            blk = jax.tree.map(jnp.copy, src)  # own buffers: trainable weights are donated to the step
            blk["attn"] = {**blk["attn"], "o": {k: jnp.zeros_like(v) for k, v in src["attn"]["o"].items()}}
            blk["mlp"] = {**blk["mlp"], "down": {k: jnp.zeros_like(v) for k, v in src["mlp"]["down"].items()}}
            blocks[j] = blk
        else:
            site = dict(fresh["blocks"][j])
            site["pretrained"] = src
            site["expanded"] = _overlay(fresh["blocks"][j]["expanded"], jax.tree.map(jnp.copy, src))
            blocks[j] = site
    out["blocks"] = blocks
    return out


def _overlay(fresh: dict, src: dict) -> dict:
    """`load_state_dict(strict=False)`: src's weights where both have them, fresh's extras (norm gates) kept."""
    return {k: _overlay(v, src[k]) if isinstance(v, dict) else src.get(k, v) for k, v in fresh.items()}


def trainable(cfg: ModelConfig, options: dict):
    """`freeze_layers` / `freeze_none_layers`: original blocks and every site's pretrained block frozen (unless
    freeze_base_layers is off), embeddings, final norm and head frozen (unless freeze_non_layers is off); copies,
    insertions, P, dlerp's w and moe's router always train; f, b, c and norm gates unless freeze_gate."""
    opts = ExpandOptions.parse(options)
    roles = [r for r, _ in layout(cfg.n_layers, opts)]
    gate_params = ("interpolation_factor", "interp_b", "router_bias")

    def is_trainable(path: str) -> bool:
        parts = path.split("/")
        if parts[0] != "blocks":
            return not opts.freeze_non_layers
        role = roles[int(parts[1])]
        if role == "insert":
            return True
        if role == "base" or parts[2] == "pretrained":
            return not opts.freeze_base_layers
        if parts[2] == "expanded":
            return not (parts[-1] == "gate" and opts.freeze_gate)
        return not (parts[2] in gate_params and opts.freeze_gate)

    return is_trainable


def describe(cfg: ModelConfig, options: dict) -> dict:
    """The checkpoint's `expansion` block (the reference's `config.expansion`)."""
    opts = ExpandOptions.parse(options)
    lay = layout(cfg.n_layers, opts)
    concat = opts.type != "stack"
    return {"expansion": {
        "type": opts.type, "merge": opts.merge if concat else None, "num_layers": opts.num_layers,
        "num_ori_layers": cfg.n_layers, "depth": len(lay),
        "sites": [i for r, i in lay if r == "site"], "site_blocks": [j for j, (r, _) in enumerate(lay) if r == "site"],
        "inserted_after": [i for r, i in lay if r == "insert"],
        "inserted_blocks": [j for j, (r, _) in enumerate(lay) if r == "insert"],
        "gate_init": opts.gate_init, "freeze_gate": opts.freeze_gate,
        "div_loss": opts.div_loss if concat else None, "div_alpha": opts.div_alpha if concat else None,
        "norm_alpha": opts.norm_alpha, "freeze_base_layers": opts.freeze_base_layers,
        "freeze_non_layers": opts.freeze_non_layers, "expanded_from": opts.expanded_from}}


def _build(cfg: ModelConfig, options: dict, rngs: nnx.Rngs) -> nnx.Module:
    opts = ExpandOptions.parse(options)
    opts.validate(cfg)
    return ExpandedTransformer(cfg, opts, rngs)


def _from_base(cfg: ModelConfig, options: dict, base: dict, fresh: dict) -> dict:
    return expand_params(base, fresh, cfg.n_layers, ExpandOptions.parse(options))


def _plain_form(cfg: ModelConfig, options: dict) -> ModelConfig:
    opts = ExpandOptions.parse(options)
    if opts.type != "stack":
        raise ExpandError(f"an unmerged {opts.type} expansion has no plain form (its merge sites hold two "
                          "blocks): run `mathlm convert merge-back` first")
    return dataclasses.replace(cfg, n_layers=len(layout(cfg.n_layers, opts)), variant=None)


def _structure(options: dict) -> dict:
    """What defines the weights: the layout, the merge's gate parameters, relaxed norms. The divergence, its
    weight, the freeze flags and the gate's init value are training settings a later run may change."""
    opts = ExpandOptions.parse(options)
    return {"type": opts.type, "num_layers": opts.num_layers, "merge": opts.merge, "norm_alpha": opts.norm_alpha,
            "gate_init": "null" if opts.gate_init is None else "a value"}


register(VariantSpec(NAME, _build, trainable, from_base=_from_base, describe=describe, plain_form=_plain_form,
                     structure=_structure))
