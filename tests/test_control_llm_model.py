"""Control-LLM (issue 13), the expanded model: expansion layouts (sites, insertions, depth), identity at init,
the un-stopped gradient path through the frozen branch, and two-cache decoding.

Tiny shapes throughout (d_model <= 64, vocab 128, 4 base layers); shared helpers in tests/control_llm_helpers.py;
the end-to-end checks (convert, train, eval, merge-back, export, bad input) are in tests/test_control_cli.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from control_llm_helpers import (
    BASE,
    MERGES,
    _abstract,
    _cfg,
    _expanded_params,
    _model,
    _perturbed,
    _tokens,
    base_params_fixture,  # noqa: F401 (the base_params fixture)
)
from flax import nnx

from mathlm import models
from mathlm.models import merges, variants
from mathlm.models.expand import ExpandError, ExpandOptions, MergeSite, describe, expansion_points, layout
from mathlm.models.generate import Generator, Sampling, greedy_reference
from mathlm.models.transformer import Block, attention_mask
from mathlm.train.objectives.causal import masked_lm
from mathlm.train.state import combine, leaf_paths, partition

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


