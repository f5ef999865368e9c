"""Control-LLM (issue 13), below the CLI: expansion layouts, the seven merges and four divergences against numpy
formulas, identity at init, the un-stopped gradient path, freezing and optimizer state, and two-cache decoding.

Tiny shapes throughout (d_model <= 64, vocab 128, 4 base layers); the end-to-end checks (convert, train, eval,
merge-back, export, bad input) are in tests/test_control_cli.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mathlm import models
from mathlm.models import merge_back, merges, variants
from mathlm.models.expand import ExpandError, ExpandOptions, MergeSite, describe, expansion_points, layout
from mathlm.models.generate import Generator, Sampling, greedy_reference
from mathlm.models.transformer import Block, ModelConfig, attention_mask
from mathlm.train.config import load_config
from mathlm.train.objectives.causal import masked_lm
from mathlm.train.state import combine, leaf_paths, partition

BASE = ModelConfig(vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
MERGES = ("lerp", "slerp", "dlerp", "dlerpin", "moe", "proj", "prog")
# Per merge: the gate weights that always train, and those that train unless freeze_gate.
GATES = {"lerp": ((), ("interpolation_factor",)), "slerp": ((), ("interpolation_factor",)),
         "dlerp": (("interp_w",), ("interp_b",)), "dlerpin": (("interp_w",), ("interp_b",)),
         "moe": (("router",), ("router_bias",)), "proj": (("proj",), ("interpolation_factor",)),
         "prog": (("proj",), ("interpolation_factor",))}


def _cfg(base: ModelConfig = BASE, **opts) -> ModelConfig:
    return dataclasses.replace(base, variant={"name": "expand", **opts})


@pytest.fixture(scope="module")
def base_params():
    return models.init_params(BASE, 0)


def _expanded_params(base_params, cfg: ModelConfig) -> dict:
    return variants.from_base(cfg, BASE, base_params, models.init_params(cfg, 1))


_ABSTRACT: dict[str, tuple] = {}


def _abstract(cfg: ModelConfig):
    """models.abstract, once per configuration (the trace is the slow part of these tiny tests)."""
    if repr(cfg) not in _ABSTRACT:
        _ABSTRACT[repr(cfg)] = models.abstract(cfg)
    return _ABSTRACT[repr(cfg)]


def _model(cfg: ModelConfig, params: dict):
    return nnx.merge(_abstract(cfg)[0], params)


def _perturbed(params: dict, cfg: ModelConfig, scale: float = 0.05, seed: int = 7) -> dict:
    """Brief training, simulated: noise on every trainable weight (copies, insertions, gates, P), so the branches
    differ."""
    is_trainable = variants.trainable_filter(cfg)
    trainable, frozen = partition(params, is_trainable)
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) * (1.0 if x.ndim >= 2 else 4.0) for x, k in zip(leaves, keys)]
    return combine(jax.tree.unflatten(tree, noisy), frozen)


def _tokens(b=2, t=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, BASE.vocab_size, (b, t)), jnp.int32)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# ----------------------------------------------------------------------------- sites and depth

ODD = list(range(1, 32, 2))
LAYOUTS = {  # (N, k): concat sites, hybrid (inserted after, sites, depth)
    (32, 8): ([3, 7, 11, 15, 19, 23, 27, 31], ([3, 11, 19, 27], [7, 15, 23, 31], 36)),
    (32, 16): (ODD, ([1, 5, 9, 13, 17, 21, 25, 29], [3, 7, 11, 15, 19, 23, 27, 31], 40)),
    (8, 2): ([3, 7], ([3], [7], 9)),
    (8, 4): ([1, 3, 5, 7], ([1, 5], [3, 7], 10)),
}


@pytest.mark.parametrize("n,k", list(LAYOUTS))
def test_site_indices_and_depth(n, k):
    points, (inserted, sites, depth) = LAYOUTS[(n, k)]
    cfg = dataclasses.replace(BASE, n_layers=n)
    assert expansion_points(n, k) == points and points[-1] == n - 1  # the last layer is always a site
    concat = describe(cfg, {"type": "concat", "num_layers": k})["expansion"]
    assert (concat["sites"], concat["site_blocks"], concat["inserted_after"], concat["depth"]) == (points, points,
                                                                                                  [], n)
    stack = describe(cfg, {"type": "stack", "num_layers": k})["expansion"]
    assert (stack["sites"], stack["inserted_after"], stack["depth"]) == ([], points, n + k)
    # An insertion sits right after its original: block index = original index + insertions before it + 1.
    assert stack["inserted_blocks"] == [i + p + 1 for p, i in enumerate(points)]
    hybrid = describe(cfg, {"type": "hybrid", "num_layers": k})["expansion"]
    assert (hybrid["inserted_after"], hybrid["sites"], hybrid["depth"]) == (inserted, sites, depth)
    assert depth == n + k // 2 and len(sites) == k // 2
    # M, the divergence's mean over sites: k for concat, k/2 for hybrid, none for stack.
    assert [ExpandOptions(type=t, num_layers=k).n_sites for t in ("concat", "hybrid", "stack")] == [k, k // 2, 0]
    lay = layout(n, ExpandOptions(type="hybrid", num_layers=k))
    assert [i for r, i in lay if r != "insert"] == list(range(n))  # every original once, in order
    assert [lay[j] for j in hybrid["site_blocks"]] == [("site", i) for i in sites]
    assert [lay[j] for j in hybrid["inserted_blocks"]] == [("insert", i) for i in inserted]
    assert all(lay[j - 1] == ("base", i) for j, (r, i) in enumerate(lay) if r == "insert")
    # k groups of s blocks (s + 1 with an insertion) each closed by its site or insertion.
    s = n // k
    bounds = [j for j, (r, i) in enumerate(lay) if r in ("site", "insert")]
    assert np.diff([-1, *bounds]).tolist() == [s + 1 if p % 2 == 0 else s for p in range(k)]


def test_hybrid_example_block_indices():
    exp = describe(dataclasses.replace(BASE, n_layers=32), {"type": "hybrid", "num_layers": 8})["expansion"]
    assert exp["inserted_blocks"] == [4, 13, 22, 31] and exp["site_blocks"] == [8, 17, 26, 35]


@pytest.mark.parametrize("typ", ["concat", "stack", "hybrid"])
def test_built_model_follows_the_layout(typ):
    cfg = _cfg(dataclasses.replace(BASE, n_layers=8), type=typ, num_layers=4, merge="dlerp")
    blocks = models.abstract(cfg)[1]["blocks"]
    exp = models.metadata(cfg)["expansion"]
    assert len(blocks) == exp["depth"] == {"concat": 8, "stack": 12, "hybrid": 10}[typ]
    for j, blk in blocks.items():
        if j in exp["site_blocks"]:
            assert set(blk) == {"pretrained", "expanded", "interp_w", "interp_b"}
            assert blk["interp_w"].shape == (2 * BASE.d_model,) and blk["interp_b"].shape == (1,)
        else:
            assert set(blk) == {"attn_norm", "attn", "mlp_norm", "mlp"}


@pytest.mark.parametrize("typ,n,k,needle", [
    ("concat", 8, 3, "expand.num_layers=3 must divide the base model's 8 layers"),
    ("stack", 32, 12, "expand.num_layers=12 must divide the base model's 32 layers"),
    ("hybrid", 8, 5, "must divide"),
    ("hybrid", 6, 3, "expand.type=hybrid needs an even expand.num_layers, got 3"),
    ("hybrid", 8, 1, "needs an even expand.num_layers"),
])
def test_bad_k_is_a_clear_error(typ, n, k, needle):
    base = dataclasses.replace(BASE, n_layers=n)
    with pytest.raises(ExpandError, match=needle):
        ExpandOptions(type=typ, num_layers=k).validate(base)
    with pytest.raises(ExpandError, match=needle):  # the factory checks too
        models.abstract(_cfg(base, type=typ, num_layers=k))


# ----------------------------------------------------------------------------- golden merges

B, T, D = 2, 3, 16
RNG = np.random.default_rng(0)
H_IN, H_PRE, H_EXP = (RNG.normal(size=(B, T, D)).astype(np.float32) for _ in range(3))


def _np_slerp(p, e, a):
    p, e = p.astype(np.float64), e.astype(np.float64)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    c = np.clip(np.sum(unit(p) * unit(e), -1, keepdims=True), -1, 1)
    theta = np.arccos(c)
    if (theta < 1e-4).any():
        return (1 - a) * p + a * e
    s = np.maximum(np.sqrt(1 - c * c + 1e-8), 1e-6)
    return np.sin((1 - a) * theta) / s * p + np.sin(a * theta) / s * e


def test_lerp_and_gate_null():
    gate = {"factor": jnp.array([0.3])}
    out, a, cmp_pre = merges.merge("lerp", gate, H_IN, H_PRE, H_EXP)
    a_np = _sig(0.3)
    np.testing.assert_allclose(float(a), a_np, rtol=1e-6)
    np.testing.assert_allclose(out, H_PRE + a_np * (H_EXP - H_PRE), atol=1e-5)
    np.testing.assert_array_equal(cmp_pre, H_PRE)
    out, a, _ = merges.merge("lerp", {}, H_IN, H_PRE, H_EXP, gate_is_one=True)  # gate_init null: a = 1
    np.testing.assert_allclose(out, H_EXP, rtol=0, atol=1e-6)  # h_pre + 1 (h_exp - h_pre), rounded
    assert float(a) == 1.0


def test_slerp_spherical_and_its_batch_global_fallback():
    gate = {"factor": jnp.array([-0.4])}
    a = _sig(-0.4)
    out, a_out, _ = merges.merge("slerp", gate, H_IN, H_PRE, H_EXP)
    np.testing.assert_allclose(float(a_out), a, rtol=1e-6)
    spherical = _np_slerp(H_PRE, H_EXP, a)
    lerp = (1 - a) * H_PRE + a * H_EXP
    assert np.abs(spherical - lerp).max() > 0.1  # the two rules are far apart on these tokens
    np.testing.assert_allclose(out, spherical, atol=1e-5)
    # One aligned token (theta = 0 exactly: |(1,..,1)| = 4 in 16 dims) switches the whole batch to lerp.
    p, e = H_PRE.copy(), H_EXP.copy()
    p[1, 2], e[1, 2] = np.ones(D), 3 * np.ones(D)
    out, _, _ = merges.merge("slerp", gate, H_IN, p, e)
    lerp = (1 - a) * p + a * e
    np.testing.assert_allclose(out, lerp, atol=1e-5)
    assert np.abs(np.asarray(out)[0, 0] - _np_slerp(p[:1, :1], e[:1, :1], a)[0, 0]).max() > 0.1
    # Finite gradients on both branches (arccos' slope at c = 1 never meets the fallback's zero cotangent).
    for hp, he in ((H_PRE, H_EXP), (p, e)):
        grads = jax.grad(lambda f, x, y: jnp.sum(merges.merge("slerp", {"factor": f}, H_IN, x, y)[0] ** 2),
                         argnums=(0, 1, 2))(jnp.array([-0.4]), hp, he)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("kind", ["dlerp", "dlerpin"])
def test_dlerp_gates_per_token_with_h_pre_first(kind):
    fan_in = 2 * D if kind == "dlerp" else D
    w = RNG.uniform(-1, 1, fan_in).astype(np.float32)
    gate = {"w": jnp.asarray(w), "b": jnp.array([0.2])}
    out, a, cmp_pre = merges.merge(kind, gate, H_IN, H_PRE, H_EXP)
    feats = np.concatenate([H_PRE, H_EXP], -1) if kind == "dlerp" else H_IN
    a_np = _sig(feats @ w + 0.2)[..., None]
    assert a.shape == (B, T, 1)
    np.testing.assert_allclose(a, a_np, atol=1e-6)
    np.testing.assert_allclose(out, (1 - a_np) * H_PRE + a_np * H_EXP, atol=1e-5)
    np.testing.assert_array_equal(cmp_pre, H_PRE)
    if kind == "dlerp":  # [h_exp ; h_pre] would give other gates
        swapped = _sig(np.concatenate([H_EXP, H_PRE], -1) @ w + 0.2)[..., None]
        assert np.abs(swapped - a_np).max() > 0.1


def _router(seed=3):
    r = np.random.default_rng(seed)
    return {"router": jnp.asarray(r.uniform(-0.5, 0.5, (2, D)), jnp.float32),
            "bias": jnp.asarray([0.0, 0.1], jnp.float32)}


def _np_router_probs(gate, h_in):
    z = h_in.astype(np.float64) @ np.asarray(gate["router"], np.float64).T + np.asarray(gate["bias"])
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_moe_hard_top1_and_no_router_gradient_from_the_output():
    gate = _router()
    out, a, cmp_pre = merges.merge("moe", gate, H_IN, H_PRE, H_EXP)
    p = _np_router_probs(gate, H_IN)
    routed = (p[..., 1] > p[..., 0])[..., None]
    assert routed.any() and not routed.all()
    np.testing.assert_array_equal(out, np.where(routed, H_EXP, H_PRE))
    np.testing.assert_allclose(a, p[..., 1:] * routed, atol=1e-6)  # alpha -1's weight: p1 * m
    np.testing.assert_array_equal(merges.moe_routed(gate, H_IN), routed)
    np.testing.assert_allclose(merges.gate_mean("moe", gate, H_IN, a), p[..., 1].mean(), atol=1e-6)
    g = jax.grad(lambda gt: jnp.sum(merges.merge("moe", gt, H_IN, H_PRE, H_EXP)[0] * H_IN))(gate)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))  # argmax: no CE gradient


def test_proj_keeps_p_out_of_the_output_and_prog_puts_it_in():
    P = RNG.normal(size=(D, D)).astype(np.float32)  # not symmetric: h P^T != h P
    assert np.abs(H_PRE @ P.T - H_PRE @ P).max() > 1.0
    gate = {"factor": jnp.array([0.5]), "proj": jnp.asarray(P)}
    a = _sig(0.5)
    out, _, cmp_pre = merges.merge("proj", gate, H_IN, H_PRE, H_EXP)
    np.testing.assert_allclose(out, H_PRE + a * (H_EXP - H_PRE), atol=1e-5)
    np.testing.assert_allclose(cmp_pre, H_PRE @ P.T, atol=1e-4)
    out, _, cmp_pre = merges.merge("prog", gate, H_IN, H_PRE, H_EXP)
    np.testing.assert_allclose(out, (1 - a) * (H_PRE @ P.T) + a * H_EXP, atol=1e-4)
    np.testing.assert_array_equal(cmp_pre, H_PRE)  # prog's divergence: the unprojected h_pre


def test_unknown_merge_and_divergence():
    with pytest.raises(ValueError, match="unknown merge 'mix'"):
        merges.merge("mix", {}, H_IN, H_PRE, H_EXP)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        merges.token_divergence("kl", H_PRE, H_EXP)


# ----------------------------------------------------------------------------- golden divergences

def _np_cos_d(p, e):
    p, e = p.astype(np.float64), e.astype(np.float64)
    c = (p * e).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(e, axis=-1), 1e-8)
    r = np.maximum(0, 1 - c)
    return np.where(r < 1, 0.5 * r * r, r - 0.5)


def test_cosine_is_smooth_l1_on_both_sides_of_r_1():
    cos = np.array([1.0, 0.9, 0.5, 0.0, -0.5, -1.0])
    e1, e2 = np.eye(D)[0], np.eye(D)[1]
    p = np.stack([2.0 * e1] * len(cos))[None].astype(np.float32)
    e = np.stack([3.0 * (c * e1 + np.sqrt(1 - c * c) * e2) for c in cos])[None].astype(np.float32)
    d = merges.token_divergence("cosine", p, e)
    # r = 1 - cos = 0, .1, .5 (0.5 r^2) | 1 (both 0.5) | 1.5, 2 (r - 0.5; 0.5 r^2 would give 1.125, 2)
    np.testing.assert_allclose(d[0], [0.0, 0.005, 0.125, 0.5, 1.0, 1.5], atol=1e-6)
    np.testing.assert_allclose(merges.token_divergence("cosine", H_PRE, H_EXP), _np_cos_d(H_PRE, H_EXP), atol=1e-6)
    np.testing.assert_allclose(merges.cosine_similarity(p, e)[0], cos, atol=1e-6)


def test_mse_dot_and_dot_magnitude():
    np.testing.assert_allclose(merges.token_divergence("mse", H_PRE, H_EXP), ((H_EXP - H_PRE) ** 2).mean(-1),
                               rtol=1e-6)
    cos_d = merges.token_divergence("cosine", H_PRE, H_EXP)
    np.testing.assert_array_equal(merges.token_divergence("dot", H_PRE, H_EXP), 0.5 * cos_d)  # the reference's bug
    mag = np.linalg.norm(H_PRE, axis=-1) - np.linalg.norm(H_EXP, axis=-1)
    np.testing.assert_allclose(merges.token_divergence("dot_magnitude", H_PRE, H_EXP),
                               0.5 * _np_cos_d(H_PRE, H_EXP) + 0.5 * mag ** 2, rtol=1e-5)


def _causal_probs(rng, b, h, t):
    z = rng.normal(size=(b, h, t, t)) + np.where(np.tril(np.ones((t, t))), 0, -np.inf)
    z = np.exp(z - z.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).astype(np.float32)


def test_attention_divergence_is_a_mean_over_every_entry():
    r = np.random.default_rng(1)
    pre, exp = _causal_probs(r, 2, 3, 5), _causal_probs(r, 2, 3, 5)
    d = exp.astype(np.float64) * (np.log(exp + 1e-8) - np.log(pre + 1e-8))
    np.testing.assert_allclose(merges.attention_divergence(pre, exp), d, atol=1e-6)
    loss = merges.site_loss("attention", 1.0, jnp.float32(0.5), None, None, probs=(pre, exp))
    np.testing.assert_allclose(float(loss), d.mean(), rtol=1e-5)  # / (B*H*T*T), not a per-row KL sum
    assert abs(d.sum(-1).mean() - d.mean()) > 1e-3
    np.testing.assert_allclose(float(merges.site_loss("attention", 0.3, None, None, None, probs=(pre, exp))),
                               0.3 * d.mean(), rtol=1e-5)
    # alpha -1 with a per-token gate (B, T, 1): it weights the query position, as the reference's (B, 1, T, 1).
    a = r.uniform(size=(2, 5, 1)).astype(np.float32)
    loss = merges.site_loss("attention", -1, a, None, None, probs=(pre, exp))
    np.testing.assert_allclose(float(loss), (a[:, None, :, :] * d).mean(), rtol=1e-5)
    assert abs((a[:, None, :, 0][..., None, :] * d).mean() - (a[:, None, :, :] * d).mean()) > 1e-4


def test_site_loss_alpha_and_mean_over_all_positions():
    d = _np_cos_d(H_PRE, H_EXP)
    np.testing.assert_allclose(float(merges.site_loss("cosine", 0.7, None, H_PRE, H_EXP)), 0.7 * d.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(merges.site_loss("cosine", -1, jnp.float32(0.25), H_PRE, H_EXP)),
                               0.25 * d.mean(), rtol=1e-5)
    a = RNG.uniform(size=(B, T, 1)).astype(np.float32)
    np.testing.assert_allclose(float(merges.site_loss("cosine", -1, a, H_PRE, H_EXP)), (a[..., 0] * d).mean(),
                               rtol=1e-5)
    # alpha 0 computes nothing: no input is even read.
    for kind in ("cosine", "mse", "attention"):
        assert float(merges.site_loss(kind, 0, None, None, None, probs=None)) == 0.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_moe_mask_and_denominator(kind):
    gate = _router()
    _, a, _ = merges.merge("moe", gate, H_IN, H_PRE, H_EXP)
    routed = np.asarray(merges.moe_routed(gate, H_IN))
    pre, exp = merges.moe_inputs(H_PRE, H_EXP, routed)
    fill = np.broadcast_to(np.float32(0.01) * ~routed, pre.shape)  # 0.01 * ones where not routed
    np.testing.assert_array_equal(np.where(routed, 0, pre), fill)
    np.testing.assert_array_equal(np.where(routed, 0, exp), fill)
    np.testing.assert_array_equal(np.where(routed, pre, 0), np.where(routed, H_PRE, 0))
    d = ((H_EXP - H_PRE) ** 2).mean(-1) if kind == "mse" else _np_cos_d(H_PRE, H_EXP)
    m = routed[..., 0]
    want = (d * m).sum() / (B * T)  # unrouted positions give d = 0 and stay in the mean
    assert abs(want - (d * m).sum() / m.sum()) > 1e-3
    np.testing.assert_allclose(float(merges.site_loss(kind, 1.0, a, pre, exp)), want, rtol=1e-5)
    p1 = _np_router_probs(gate, H_IN)[..., 1]
    np.testing.assert_allclose(float(merges.site_loss(kind, -1, a, pre, exp)), (p1 * m * d).sum() / (B * T),
                               rtol=1e-5)


def test_alpha_minus_one_trains_f_w_and_the_router():
    """With alpha -1 the gate weights the divergence undetached: closed-form gradients into f, w and W."""
    d_mse = ((H_EXP.astype(np.float64) - H_PRE) ** 2).mean(-1)

    def loss(kind, gate):
        _, a, cmp_pre = merges.merge(kind, gate, H_IN, H_PRE, H_EXP)
        cmp_exp = H_EXP
        if kind == "moe":
            cmp_pre, cmp_exp = merges.moe_inputs(cmp_pre, cmp_exp, merges.moe_routed(gate, H_IN))
        return merges.site_loss("mse", -1, a, cmp_pre, cmp_exp)

    g = jax.grad(lambda gt: loss("lerp", gt))({"factor": jnp.array([0.3])})
    s = _sig(0.3)
    np.testing.assert_allclose(g["factor"], [s * (1 - s) * d_mse.mean()], rtol=1e-5)
    w = RNG.uniform(-0.2, 0.2, 2 * D).astype(np.float32)
    g = jax.grad(lambda gt: loss("dlerp", gt))({"w": jnp.asarray(w), "b": jnp.array([0.1])})
    x = np.concatenate([H_PRE, H_EXP], -1).astype(np.float64)
    a = _sig(x @ w + 0.1)
    np.testing.assert_allclose(g["w"], np.einsum("bt,btd->d", a * (1 - a) * d_mse, x) / (B * T), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(g["b"], [(a * (1 - a) * d_mse).mean()], rtol=1e-5)
    gate = _router()
    g = jax.grad(lambda gt: loss("moe", gt))(gate)
    p = _np_router_probs(gate, H_IN)
    m = p[..., 1] > p[..., 0]
    dp1 = (p[..., 1] * m * d_mse)[..., None] * (np.array([0.0, 1.0]) - p)  # d p1 / d z = p1 (e_1 - p)
    np.testing.assert_allclose(g["router"], np.einsum("btk,btd->kd", dp1, H_IN) / (B * T), rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(g["router"]).min()) > 0
    # With a fixed alpha the router gets nothing (p only enters through the argmax).
    g = jax.grad(lambda gt: merges.site_loss(
        "mse", 1.0, merges.merge("moe", gt, H_IN, H_PRE, H_EXP)[1],
        *merges.moe_inputs(H_PRE, H_EXP, merges.moe_routed(gt, H_IN))))(gate)
    assert float(jnp.abs(g["router"]).max()) == 0.0


@pytest.mark.parametrize("alpha,g", [(0.3, 0.0), (-1.0, 1.2), (-1.0, -0.7)])
def test_relaxed_norm(alpha, g):
    """`ExpandedLayerNorm`: beta h + (1 - beta) RMSNorm(h); beta fixed, or clip(2 sigma(g) - 1, 0, 1)."""
    from mathlm.models.expand import ExpandedNorm
    norm = ExpandedNorm(D, 1e-5, alpha, g)
    norm.scale[...] = jnp.asarray(RNG.uniform(0.5, 1.5, D), jnp.float32)
    beta = alpha if alpha != -1 else float(np.clip(2 * _sig(g) - 1, 0, 1))
    x = H_IN.astype(np.float64)
    rms = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.asarray(norm.scale[...])
    np.testing.assert_allclose(norm(H_IN), beta * x + (1 - beta) * rms, atol=1e-5)
    if alpha == -1:
        assert norm.gate[...].shape == (1,) and (beta == 0) == (g < 0)
    site = MergeSite(BASE, ExpandOptions(num_layers=2, norm_alpha=alpha, gate_init=g), nnx.Rngs(0))
    assert isinstance(site.expanded.attn_norm, ExpandedNorm) and isinstance(site.expanded.mlp_norm, ExpandedNorm)
    assert not isinstance(site.pretrained.attn_norm, ExpandedNorm)  # only the copy's norms are relaxed


# ----------------------------------------------------------------------------- one merge site against plain blocks

SITE_CASES = [(m, "mse", 1.0) for m in MERGES] + [(m, "cosine", -1.0) for m in ("dlerp", "moe")] + [
    ("lerp", "attention", 1.0), ("dlerpin", "attention", -1.0), ("proj", "mse", 0.0)]


@pytest.mark.parametrize("merge,div,alpha", SITE_CASES)
def test_merge_site_against_plain_blocks(merge, div, alpha):
    """A MergeSite's output and sown divergence from its two plain Block calls and the formulas above."""
    opts = ExpandOptions(num_layers=2, merge=merge, gate_init=0.3, div_loss=div, div_alpha=alpha)
    site = MergeSite(BASE, opts, nnx.Rngs(5))  # two independently initialised blocks: the branches differ
    x = jax.random.normal(jax.random.key(0), (2, 8, BASE.d_model))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = attention_mask(jnp.ones((2, 8), jnp.int32), True)
    out, sown = nnx.capture(site, nnx.Intermediate)(x, pos, mask)
    h_pre, h_exp = site.pretrained(x, pos, mask), site.expanded(x, pos, mask)
    gate = site.gate()
    want_out, a, cmp_pre = merges.merge(merge, gate, x, h_pre, h_exp)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    cmp_exp = h_exp
    if merge == "moe":
        cmp_pre, cmp_exp = merges.moe_inputs(cmp_pre, cmp_exp, merges.moe_routed(gate, x))
    if div == "attention":
        probs = []
        for blk in (site.pretrained, site.expanded):
            h = blk.attn_norm(x)
            pr = blk.attn.probs(h, pos, mask)  # (B, H, T, S), checked against the attention output itself
            v = jnp.repeat(blk.attn.v(h).reshape(2, 8, BASE.n_kv_heads, -1), BASE.n_heads // BASE.n_kv_heads, 2)
            mixed = jnp.einsum("bhts,bshd->bthd", pr, v).reshape(2, 8, -1)
            np.testing.assert_allclose(blk.attn.o(mixed), blk.attn(h, pos, mask), atol=1e-5)
            probs.append(np.asarray(pr, np.float64))
        d = probs[1] * (np.log(probs[1] + 1e-8) - np.log(probs[0] + 1e-8))
        w = np.asarray(a, np.float64)[:, None] if np.ndim(a) == 3 else float(a)
        want = (w * d).mean() if alpha == -1 else alpha * d.mean()
    elif alpha == 0:
        want = 0.0
    else:
        d = (((np.asarray(cmp_exp, np.float64) - np.asarray(cmp_pre)) ** 2).mean(-1) if div == "mse"
             else _np_cos_d(np.asarray(cmp_pre), np.asarray(cmp_exp)))
        w = np.asarray(a, np.float64)[..., 0] if np.ndim(a) == 3 else float(a)
        want = (w * d).mean() if alpha == -1 else alpha * d.mean()
    div_sown = float(sown["site_div"][0])
    np.testing.assert_allclose(div_sown, want, rtol=1e-4, atol=1e-9)
    assert (div_sown > 0) == (alpha != 0)
    np.testing.assert_allclose(float(sown["aux_loss"][0]), div_sown / 2, rtol=1e-6)  # / M = k sites
    np.testing.assert_allclose(float(sown["site_cos"][0]), np.mean(merges.cosine_similarity(h_pre, h_exp)),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- identity at init

IDENTITY = [(t, m) for t in ("concat", "hybrid") for m in MERGES] + [("stack", "lerp")]
BOUND = {"lerp": 1e-6, "proj": 1e-6, "moe": 1e-6, "slerp": 1e-6, "dlerp": 1e-5, "dlerpin": 1e-5}


@pytest.mark.parametrize("typ,merge", IDENTITY)
def test_identity_at_init(base_params, typ, merge):
    from mathlm.train.objectives import forward
    tokens = _tokens()
    base_logits = _model(BASE, base_params)(tokens)
    cfg = _cfg(type=typ, num_layers=2, merge=merge, div_loss="mse", div_alpha=1.0)
    logits, aux, diag = forward(_model(cfg, _expanded_params(base_params, cfg)), tokens)
    diff = float(jnp.abs(logits - base_logits).max())
    if merge == "prog" and typ != "stack":
        assert diff > 1e-3, diff  # h + (1 - a)(P - I) h: not the identity, and not small
    else:
        assert diff <= BOUND["lerp" if typ == "stack" else merge], diff
    divs = [v for k, v in diag.items() if k.endswith("/div")]
    assert len(divs) == {"concat": 2, "hybrid": 1, "stack": 0}[typ]
    if merge == "proj" and typ != "stack":
        assert all(float(v) > 0 for v in divs) and float(aux) > 0  # div(P h_pre, h_exp), P = I + 0.01 N
    else:
        assert all(float(v) == 0.0 for v in divs) and float(aux) == 0.0
    if merge == "dlerp" and typ == "concat":  # a = sigma(w [h; h] + 0) with random w: not 0.5 per token
        site = _model(cfg, _expanded_params(base_params, cfg)).blocks[1]
        h = jax.random.normal(jax.random.key(1), (2, 4, BASE.d_model))
        a = merges.merge("dlerp", site.gate(), h, h, h)[1]
        assert float(jnp.abs(a - 0.5).max()) > 1e-3


def test_expanded_weights_copy_the_base(base_params):
    cfg = _cfg(type="hybrid", num_layers=2, merge="prog")
    p = _expanded_params(base_params, cfg)
    same = lambda x, y: all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    # layout N=4, k=2 hybrid: 0, 1, insert(1), 2, site(3)
    assert same(p["blocks"][0], base_params["blocks"][0]) and same(p["blocks"][3], base_params["blocks"][2])
    assert same(p["blocks"][4]["pretrained"], base_params["blocks"][3])
    assert same(p["blocks"][4]["expanded"], base_params["blocks"][3])  # a full copy, both norm scales included
    ins, src = p["blocks"][2], base_params["blocks"][1]
    assert leaf_paths(ins) == leaf_paths(src)
    for path, x, y in zip(leaf_paths(ins), jax.tree.leaves(ins), jax.tree.leaves(src)):
        if path.startswith(("attn/o/", "mlp/down/")):  # the output projections zeroed: identity at init
            assert not np.any(x) and np.any(y), path
        else:  # everything else copied, norms not reset
            assert np.array_equal(x, y), path
    P = np.asarray(p["blocks"][4]["proj"])
    assert 0.005 < np.std(P - np.eye(BASE.d_model)) < 0.015 and np.abs(np.diag(P) - 1).max() < 0.06
    f = np.asarray(p["blocks"][4]["interpolation_factor"])
    assert f.shape == (1,) and f[0] == 0.0
    dl = _expanded_params(base_params, _cfg(type="concat", num_layers=2, merge="dlerp"))["blocks"][1]["interp_w"]
    bound = 1 / np.sqrt(2 * BASE.d_model)  # PyTorch-default Linear init, fan_in 2d
    assert np.abs(dl).max() <= bound and np.abs(dl).max() > 0.8 * bound


@pytest.mark.parametrize("typ", ["concat", "stack", "hybrid"])
def test_trainable_weights_own_their_buffers(base_params, typ):
    """The train step donates trainable weights: none may share a buffer with another (frozen) weight."""
    cfg = _cfg(type=typ, num_layers=2, merge="dlerp", freeze_non_layers=False)
    trainable, frozen = partition(_expanded_params(base_params, cfg), variants.trainable_filter(cfg))
    ptr = lambda tree: [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]
    mine, others = ptr(trainable), ptr(frozen)
    assert len(set(mine)) == len(mine) and not set(mine) & set(others)


# ----------------------------------------------------------------------------- gradient path

def _plain_block(params, x, pos, mask):
    return nnx.merge(nnx.split(nnx.eval_shape(lambda: Block(BASE, nnx.Rngs(0))))[0], params)(x, pos, mask)


def _reference_loss(params, tokens, targets, stop: bool):
    """Plain Block calls and the lerp formula; mean CE + mean over the two sites of the mse divergence."""
    t = tokens.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    mask = attention_mask(jnp.ones(tokens.shape, jnp.int32), True)
    x = params["embed"]["embedding"][tokens]
    divs = []
    for j in range(4):
        blk = params["blocks"][j]
        if j in (1, 3):  # N=4, k=2: sites at 1 and 3
            h_pre, h_exp = _plain_block(blk["pretrained"], x, pos, mask), _plain_block(blk["expanded"], x, pos, mask)
            if stop:
                h_pre = jax.lax.stop_gradient(h_pre)
            a = jax.nn.sigmoid(blk["interpolation_factor"][0])
            divs.append(jnp.mean((h_exp - h_pre) ** 2))
            x = h_pre + a * (h_exp - h_pre)
        else:
            x = _plain_block(blk, x, pos, mask)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + BASE.norm_eps) * params["final_norm"]["scale"]
    logp = jax.nn.log_softmax(x @ params["lm_head"]["kernel"], -1)
    ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    return ce + sum(divs) / len(divs)


def test_gradient_reaches_the_first_copy_through_the_second_sites_frozen_branch(base_params):
    cfg = _cfg(type="concat", num_layers=2, merge="lerp", gate_init=0.3, div_loss="mse", div_alpha=1.0)
    params = _perturbed(_expanded_params(base_params, cfg), cfg)
    trainable, frozen = partition(params, variants.trainable_filter(cfg))
    graphdef = _abstract(cfg)[0]
    ids = _tokens(2, 17, seed=3)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.ones((2, 16), jnp.int32), "loss_mask": jnp.ones((2, 16), jnp.float32)}

    def ours(tr):  # what the trainer differentiates: the objective on the merged model, w.r.t. trainable only
        loss_sum, m = masked_lm(nnx.merge(graphdef, combine(tr, frozen)), batch)
        return loss_sum / m["denom"]

    def reference(tr, stop):
        return _reference_loss(combine(tr, frozen), ids[:, :-1], ids[:, 1:], stop)

    vg = jax.value_and_grad
    (loss, grad), (ref_loss, ref), (_, stopped) = jax.jit(lambda tr: (
        vg(ours)(tr), vg(lambda t: reference(t, False))(tr), vg(lambda t: reference(t, True))(tr)))(trainable)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    first = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g["blocks"][1]["expanded"])])
    scale = np.abs(first(ref)).max()
    assert scale > 0
    np.testing.assert_allclose(first(grad), first(ref), rtol=0, atol=1e-4 * scale)
    assert np.abs(first(stopped) - first(ref)).max() > 1e-2 * scale  # stop-gradient on h_pre is not the method
    last = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g["blocks"][3]["expanded"])])
    np.testing.assert_allclose(last(stopped), last(ref), rtol=0, atol=1e-4 * np.abs(last(ref)).max())  # no path
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):  # every trainable leaf, gates included
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(np.abs(b).max(), 1e-12))


# ----------------------------------------------------------------------------- freezing

def _paths(cfg) -> list[str]:
    return leaf_paths(_abstract(cfg)[1])


def _expected_trainable(cfg, typ, merge, freeze_gate, sites, inserts, norm_gate=False):
    out = set()
    always, maybe = GATES[merge]
    for path in _paths(cfg):
        parts = path.split("/")
        if parts[0] != "blocks":
            continue
        j = int(parts[1])
        if j in inserts:
            out.add(path)
        elif j in sites:
            if parts[2] == "expanded":
                if not (parts[-1] == "gate" and freeze_gate):
                    out.add(path)
            elif parts[2] in always or (parts[2] in maybe and not freeze_gate):
                out.add(path)
            else:
                assert parts[2] in ("pretrained", *always, *maybe), path
    if norm_gate:
        assert {f"blocks/{j}/expanded/{n}/gate" for j in sites for n in ("attn_norm", "mlp_norm")} <= set(_paths(cfg))
    return out


FREEZE_CASES = [(t, m, fg) for t in ("concat", "hybrid") for m in MERGES for fg in (False, True)] + [
    ("stack", "lerp", False), ("stack", "lerp", True)]
SITES = {"concat": ([1, 3], []), "hybrid": ([4], [2]), "stack": ([], [2, 5])}  # N=4, k=2 (block indices)


@pytest.mark.parametrize("typ,merge,freeze_gate", FREEZE_CASES)
def test_trainable_masks(typ, merge, freeze_gate):
    cfg = _cfg(type=typ, num_layers=2, merge=merge, freeze_gate=freeze_gate)
    is_trainable = variants.trainable_filter(cfg)
    got = {p for p in _paths(cfg) if is_trainable(p)}
    sites, inserts = SITES[typ]
    want = _expected_trainable(cfg, typ, merge, freeze_gate, sites, inserts)
    assert got == want
    # Spot checks in the spec's words.
    assert not any(p.startswith(("embed", "final_norm", "lm_head")) for p in got)
    assert not any(p.startswith(("blocks/0/", "blocks/1/")) for p in got if typ != "concat")
    for j in inserts:
        assert {f"blocks/{j}/attn_norm/scale", f"blocks/{j}/mlp_norm/scale", f"blocks/{j}/attn/o/kernel"} <= got
        assert not any(p.startswith(f"blocks/{j - 1}/") for p in got)  # the original before an insertion
    for j in sites:
        assert f"blocks/{j}/expanded/attn_norm/scale" in got and f"blocks/{j}/expanded/mlp/down/kernel" in got
        assert not any(p.startswith(f"blocks/{j}/pretrained/") for p in got)
        if merge in ("dlerp", "dlerpin"):
            assert f"blocks/{j}/interp_w" in got and (f"blocks/{j}/interp_b" in got) == (not freeze_gate)
        if merge in ("lerp", "slerp"):
            assert (f"blocks/{j}/interpolation_factor" in got) == (not freeze_gate)
        if merge == "moe":
            assert f"blocks/{j}/router" in got and (f"blocks/{j}/router_bias" in got) == (not freeze_gate)
        if merge in ("proj", "prog"):
            assert f"blocks/{j}/proj" in got


@pytest.mark.parametrize("freeze_gate", [False, True])
def test_relaxed_norm_gates_and_freeze_flags(freeze_gate):
    cfg = _cfg(type="concat", num_layers=2, merge="lerp", norm_alpha=-1, freeze_gate=freeze_gate)
    is_trainable = variants.trainable_filter(cfg)
    got = {p for p in _paths(cfg) if is_trainable(p)}
    assert got == _expected_trainable(cfg, "concat", "lerp", freeze_gate, [1, 3], [], norm_gate=True)
    assert ("blocks/1/expanded/attn_norm/gate" in got) == (not freeze_gate)
    open_cfg = _cfg(type="concat", num_layers=2, merge="lerp", freeze_base_layers=False, freeze_non_layers=False)
    is_trainable = variants.trainable_filter(open_cfg)
    frozen = {p for p in _paths(open_cfg) if not is_trainable(p)}
    assert frozen == set()
    half = _cfg(type="stack", num_layers=2, freeze_non_layers=False)
    is_trainable = variants.trainable_filter(half)
    got = {p for p in _paths(half) if is_trainable(p)}
    assert {p for p in got if not p.startswith("blocks/")} == {"embed/embedding", "final_norm/scale",
                                                               "lm_head/kernel"}
    assert {p.split("/")[1] for p in got if p.startswith("blocks/")} == {"2", "5"}


OPT_CASES = [("concat", "lerp", True), ("concat", "dlerp", True), ("hybrid", "moe", False), ("stack", "lerp", False)]


@pytest.mark.parametrize("typ,merge,freeze_gate", OPT_CASES)
def test_frozen_leaves_have_no_optimizer_state(typ, merge, freeze_gate):
    from mathlm.train.trainer import build
    over = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
            "model.d_ff=128", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
            "model.init_from=/nonexistent/base", f"expand.type={typ}", "expand.num_layers=2", f"expand.merge={merge}",
            f"expand.freeze_gate={str(freeze_gate).lower()}", "train.b2=0.999", "train.weight_decay_lr_ratio=0.1"]
    setup = build(load_config(None, over))
    all_paths = leaf_paths(setup.abstract_params)
    trainable = leaf_paths(setup.abstract_trainable)
    frozen = leaf_paths(setup.abstract_frozen["model"])
    assert sorted(trainable + frozen) == sorted(all_paths) and not set(trainable) & set(frozen)
    is_trainable = variants.trainable_filter(setup.cfg.model)
    assert trainable == [p for p in all_paths if is_trainable(p)]
    shapes = {p: x.shape for p, x in zip(all_paths, jax.tree.leaves(setup.abstract_params))}
    # Adam's mu and nu: exactly one of each per trainable leaf (same path, same shape), none for frozen ones.
    state_paths = [p for p, x in zip(leaf_paths(setup.abstract_opt["state"]), jax.tree.leaves(setup.abstract_opt[
        "state"])) if x.shape != () or any(p.endswith(t) for t in trainable)]
    owners = {}
    for p in state_paths:
        match = [t for t in all_paths if p.endswith("/" + t)]
        assert len(match) == 1, p
        owners[match[0]] = owners.get(match[0], 0) + 1
        assert match[0] in trainable, p
    assert owners == {t: 2 for t in trainable}
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_opt["state"]))
    n_trainable = sum(int(np.prod(shapes[t])) for t in trainable)
    assert n_state - 2 * n_trainable < 8  # nothing else but scalar counters


# ----------------------------------------------------------------------------- generation

GEN_CASES = [("concat", m) for m in MERGES] + [("stack", "lerp")]


@pytest.mark.parametrize("typ,merge", GEN_CASES)
def test_cached_decoding_equals_full_recomputation(base_params, typ, merge):
    cfg = _cfg(type=typ, num_layers=2, merge=merge, gate_init=0.2)
    model = _model(cfg, _perturbed(_expanded_params(base_params, cfg), cfg, scale=0.2))
    prompt = [5, 17, 3, 99, 42]
    got = Generator(model, eos_id=-1, pad_id=0)([prompt], Sampling(max_new_tokens=10)).tokens[0]
    want = greedy_reference(model, prompt, 10, eos_id=-1)
    assert got == want and len(set(want)) > 3
    assert not any(hasattr(b, "site_div") for b in model.blocks)  # plain calls leave nothing sown


@pytest.mark.parametrize("typ,merge", [("concat", "dlerp"), ("hybrid", "slerp")])
def test_two_caches_per_site_extend_like_the_full_forward(base_params, typ, merge):
    cfg = _cfg(type=typ, num_layers=2, merge=merge, gate_init=0.2)
    params = _perturbed(_expanded_params(base_params, cfg), cfg, scale=0.2)
    seq = jnp.asarray([[5, 17, 3, 99, 42, 11, 60, 2]], jnp.int32)
    full = _model(cfg, params)(seq)
    model = _model(cfg, params)
    cache = model.init_cache(1, 8)
    sites = [j for j, blk in enumerate(model.blocks) if isinstance(blk, MergeSite)]
    assert sites == {"concat": [1, 3], "hybrid": [4]}[typ]
    for j, layer in enumerate(cache["layers"]):  # a site: ((k, v) pretrained, (k, v) expanded); a block: (k, v)
        assert len(layer) == 2 and all(len(c) == 2 for c in layer) == (j in sites)
    logits, cache = model.extend(seq[:, :5], jnp.arange(5)[None], jnp.ones((1, 5), bool), cache)
    steps = [logits]
    for t in range(5, 8):  # then one token at a time
        logits, cache = model.extend(seq[:, t:t + 1], jnp.array([[t]]), jnp.ones((1, 1), bool), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=0, atol=1e-4 * float(jnp.abs(full).max()))
    for j in sites:  # the branches' K/V differ after "training": one shared cache could not be right
        (k_pre, _), (k_exp, _) = cache["layers"][j]
        assert float(jnp.abs(k_pre - k_exp).max()) > 1e-2


# ----------------------------------------------------------------------------- merge-back (numpy)

def test_merge_back_lerp_formula():
    r = np.random.default_rng(2)
    w_pre, w_exp = r.normal(size=(6, 5)).astype(np.float32), r.normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(merge_back.lerp_weights(w_pre, w_exp, 0.3), 0.7 * w_pre + 0.3 * w_exp, atol=1e-6)
    assert merge_back.lerp_weights(w_pre, w_exp, 0.3).dtype == np.float32


def _np_torch_row_slerp(w_pre, w_exp, a):
    """The reference on torch's (out, in) layout: each row (last dim) slerped."""
    rows = []
    for p, e in zip(w_pre.astype(np.float64), w_exp.astype(np.float64)):
        c = np.clip(np.dot(p / np.linalg.norm(p), e / np.linalg.norm(e)), -1 + 1e-6, 1 - 1e-6)
        th = np.arccos(c)
        rows.append(np.sin((1 - a) * th) / (np.sin(th) + 1e-6) * p + np.sin(a * th) / (np.sin(th) + 1e-6) * e)
    return np.stack(rows)


def test_merge_back_slerp_runs_along_the_input_axis():
    r = np.random.default_rng(4)
    k_pre = r.normal(size=(6, 4)).astype(np.float32)  # Flax (in, out) kernel
    k_exp = (k_pre * r.uniform(0.2, 3.0, size=(1, 4)) + 0.3 * r.normal(size=(6, 4))).astype(np.float32)
    a = 0.3
    want = _np_torch_row_slerp(k_pre.T, k_exp.T, a).T  # torch rows = Flax columns
    other = _np_torch_row_slerp(k_pre, k_exp, a)  # slerp of Flax rows: a different answer
    assert np.abs(want - other).max() > 1e-2
    np.testing.assert_allclose(merge_back.slerp_weights(k_pre, k_exp, a), want, atol=1e-5)
    v_pre, v_exp = r.normal(size=7).astype(np.float32), r.normal(size=7).astype(np.float32)  # a norm: one row
    np.testing.assert_allclose(merge_back.slerp_weights(v_pre, v_exp, a), _np_torch_row_slerp(
        v_pre[None], v_exp[None], a)[0], atol=1e-5)


@pytest.mark.parametrize("a", [0.5, 0.2])
def test_merge_back_slerp_of_identical_weights_scales_by_099929(a):
    w = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    ratio = merge_back.slerp_weights(w, w, a) / w
    assert np.all(np.abs(ratio - 0.99929) <= 2e-5), ratio


def test_merged_params_weights_and_supported_inputs(base_params):
    cfg = _cfg(type="concat", num_layers=2, merge="dlerp", gate_init=0.4)
    opts = ExpandOptions(type="concat", num_layers=2, merge="dlerp", gate_init=0.4)
    params = jax.device_get(_perturbed(_expanded_params(base_params, cfg), cfg))
    merged, used = merge_back.merged_params(params, 4, opts, {})
    b1, b3 = (float(params["blocks"][j]["interp_b"][0]) for j in (1, 3))
    assert used == pytest.approx({1: _sig(b1), 3: _sig(b3)}, abs=1e-7)  # sigma(b), w ignored
    merged_eval, used = merge_back.merged_params(params, 4, opts, {3: 0.9})
    assert used[3] == 0.9 and used[1] == pytest.approx(_sig(b1))  # the eval running-mean gate wins
    site = params["blocks"][3]
    q = merged_eval["blocks"][3]["attn"]["q"]["kernel"]
    np.testing.assert_allclose(q, _np_torch_row_slerp(np.asarray(site["pretrained"]["attn"]["q"]["kernel"]).T,
                                                      np.asarray(site["expanded"]["attn"]["q"]["kernel"]).T, 0.9).T,
                               atol=1e-5)
    assert set(merged["blocks"][1]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert leaf_paths(merged) == leaf_paths(base_params)  # the base architecture's weights, exactly
    for bad, needle in [(dict(type="stack"), "concat expansions only, not stack"),
                        (dict(type="hybrid"), "concat expansions only, not hybrid"),
                        (dict(merge="moe"), "not moe"), (dict(merge="proj"), "not proj"),
                        (dict(merge="prog"), "not prog"),
                        (dict(norm_alpha=-1.0), "relaxed norms")]:
        with pytest.raises(ExpandError, match=needle):
            merge_back.check_mergeable(dataclasses.replace(opts, **bad))
