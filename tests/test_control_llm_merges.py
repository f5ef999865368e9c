"""Control-LLM (issue 13), the merge arithmetic: the seven merges and four divergences against numpy formulas,
the alpha weighting and its gradients, the relaxed norm, and one merge site against its two plain blocks.

Tiny shapes throughout (d_model <= 64, vocab 128); shared helpers in tests/control_llm_helpers.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from control_llm_helpers import BASE, MERGES, _sig
from flax import nnx

from mathlm.models import merges
from mathlm.models.expand import ExpandOptions, MergeSite
from mathlm.models.transformer import attention_mask

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
