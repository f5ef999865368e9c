"""Masked diffusion sampling and likelihood: guidance identities, unmasking schedules, batch independence,
an unbiased ELBO (against an exact expectation), chain-rule NLL, sharded == single device, bad input."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mathlm.models import sharding as shard_rules
from mathlm.models.diffusion import (
    DiffusionGenerator,
    DiffusionSampling,
    DiffusionScorer,
    chain_rule_nll,
    guided_logits,
    pack,
    sample,
)
from mathlm.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                  causal=False)
V = CFG.vocab_size  # also the mask id
EOS = 2


def _prompts(seed=0, lengths=(5, 17, 1, 9, 3, 2, 12, 7)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, V, size=n).tolist() for n in lengths]


def _keys(n, seed=0):
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n)))


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


def _canvas(prompts, length):
    """The generator's layout, for calling the traceable `sample` directly."""
    p_len = 16
    b = len(prompts)
    canvas = np.full((b, p_len + length), 0, np.int32)
    canvas[:, p_len:] = V
    seg = np.zeros_like(canvas)
    seg[:, p_len:] = 1
    for i, p in enumerate(prompts):
        canvas[i, p_len - len(p):p_len] = p
        seg[i, p_len - len(p):p_len] = 1
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    return jnp.asarray(canvas), jnp.asarray(pos), jnp.asarray(seg), p_len


_sample = nnx.jit(sample, static_argnames=("length", "steps", "rule", "greedy", "guided", "eps", "history"))


def test_cfg_weight_zero_is_the_conditional_path(model):
    prompts = _prompts(lengths=(5, 9, 3))
    canvas, pos, seg, p_len = _canvas(prompts, 12)
    pmask = (jnp.arange(canvas.shape[1]) < p_len)[None] & (seg > 0)
    cond = model(canvas, pos, seg)
    assert np.array_equal(guided_logits(model, canvas, pos, seg, pmask, 0.0), cond)
    np.testing.assert_allclose(guided_logits(model, canvas, pos, seg, pmask, 0.0, guided=True), cond, atol=1e-6)
    for rule in ("low_confidence", "ancestral"):
        kw = {"length": 12, "steps": 6, "rule": rule, "greedy": False}
        plain, _ = _sample(model, canvas, pos, seg, _keys(3), 0.8, 0.0, guided=False, **kw)
        forced, _ = _sample(model, canvas, pos, seg, _keys(3), 0.8, 0.0, guided=True, **kw)
        assert np.array_equal(plain, forced)
    g = DiffusionGenerator(model, eos_id=EOS)
    s = DiffusionSampling(max_new_tokens=12, steps=6, temperature=0.8, rule="ancestral")
    assert g(prompts, s, _keys(3)).tokens == [_cut(r) for r in np.asarray(plain)[:, p_len:].tolist()]


def _cut(row):
    return row[: row.index(EOS)] if EOS in row else row


def test_cfg_is_a_no_op_without_conditional_information(model):
    canvas, pos, seg, p_len = _canvas(_prompts(lengths=(5, 9)), 8)
    pmask = (jnp.arange(canvas.shape[1]) < p_len)[None] & (seg > 0)
    masked = jnp.where(pmask, V, canvas)  # the prompt is masked in the conditional half too
    uncond = model(masked, pos, seg)
    for w in (0.5, 3.0):
        np.testing.assert_allclose(guided_logits(model, masked, pos, seg, pmask, w, guided=True), uncond,
                                   atol=1e-5)
    # ...while with the prompt visible guidance changes the logits.
    assert not np.allclose(guided_logits(model, canvas, pos, seg, pmask, 3.0, guided=True),
                           model(canvas, pos, seg), atol=1e-4)


def test_low_confidence_reveals_one_token_per_step_when_steps_equal_length(model):
    length = 12
    out = DiffusionGenerator(model, eos_id=-1)(_prompts(lengths=(5, 9, 1)), DiffusionSampling(
        max_new_tokens=length, steps=length, temperature=0.7), _keys(3), return_history=True)
    masks_left = (out.history == V).sum(-1)  # (steps, B)
    assert masks_left.tolist() == [[length - 1 - k] * 3 for k in range(length)]
    # Fewer steps: the counts still only go down and reach zero at the last step.
    out = DiffusionGenerator(model, eos_id=-1)(_prompts(lengths=(5, 9, 1)), DiffusionSampling(
        max_new_tokens=length, steps=5), return_history=True)
    left = (out.history == V).sum(-1)
    assert (np.diff(left, axis=0) <= 0).all() and (left[-1] == 0).all() and (left[0] < length).all()


@pytest.mark.parametrize("rule", ["low_confidence", "ancestral"])
def test_tiny_temperature_equals_greedy(model, rule):
    g = DiffusionGenerator(model, eos_id=EOS)
    prompts = _prompts(lengths=(5, 9, 3, 1))
    greedy = g(prompts, DiffusionSampling(max_new_tokens=10, steps=5, rule=rule), _keys(4)).tokens
    tiny = g(prompts, DiffusionSampling(max_new_tokens=10, steps=5, rule=rule, temperature=1e-6), _keys(4)).tokens
    assert tiny == greedy
    hot = g(prompts, DiffusionSampling(max_new_tokens=10, steps=5, rule=rule, temperature=5.0), _keys(4)).tokens
    assert hot != greedy


@pytest.mark.parametrize("rule", ["low_confidence", "ancestral"])
def test_prompt_is_kept_mask_never_returned_and_all_revealed(model, rule):
    prompts = _prompts(lengths=(5, 9, 3, 12))
    canvas, pos, seg, p_len = _canvas(prompts, 16)
    out, hist = _sample(model, canvas, pos, seg, _keys(4), 1.5, 2.0, length=16, steps=4, rule=rule, greedy=False,
                        guided=True, history=True)
    out, hist = np.asarray(out), np.asarray(hist)
    assert np.array_equal(out[:, :p_len], np.asarray(canvas)[:, :p_len])  # prompt and padding untouched
    assert np.array_equal(hist[-1], out[:, p_len:])
    assert (out[:, p_len:] < V).all() and (out >= 0).all()  # everything revealed, never the mask token
    # Once revealed, a slot never changes.
    for k in range(1, len(hist)):
        done = hist[k - 1] != V
        assert np.array_equal(hist[k][done], hist[k - 1][done])


def test_rows_do_not_depend_on_their_batch_neighbours(model):
    g = DiffusionGenerator(model, eos_id=EOS)
    prompts = _prompts(lengths=(5, 30, 1, 9, 3, 2, 12, 7))  # the 30-token prompt forces a 32-slot bucket
    for s in (DiffusionSampling(max_new_tokens=12, steps=6, temperature=0.9, guidance=1.5),
              DiffusionSampling(max_new_tokens=12, steps=4, temperature=0.9, rule="ancestral")):
        together = g(prompts, s, _keys(8)).tokens
        assert g(prompts[2:5], s, _keys(8)[2:5], pad_batch_to=8).tokens == together[2:5]  # 16-slot bucket
        assert g([prompts[6]], s, _keys(8)[6:7]).tokens == [together[6]]


def test_sharded_sampling_and_elbo_equal_single_device(model):
    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, shard_rules.param_shardings(pure, mesh,
                                                                                      shard_rules.DEFAULT_RULES)))
    sharded_model = nnx.merge(graphdef, state)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    prompts = _prompts()
    s = DiffusionSampling(max_new_tokens=12, steps=4, temperature=0.7, guidance=1.0)
    assert (DiffusionGenerator(sharded_model, eos_id=EOS, batch_sharding=rows)(prompts, s, _keys(8)).tokens
            == DiffusionGenerator(model, eos_id=EOS)(prompts, s, _keys(8)).tokens)
    targets = _prompts(seed=1, lengths=(3, 4, 1, 6, 2, 5, 3, 2))
    a = DiffusionScorer(sharded_model, batch_sharding=rows).elbo(prompts, targets, _keys(8), n_samples=8)
    b = DiffusionScorer(model).elbo(prompts, targets, _keys(8), n_samples=8)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_elbo_is_unbiased_against_the_exact_expectation(model):
    """E_t E_mask[sum_masked CE / p] computed exactly: enumerate the 2^3 masks of a 3-token target (the prompt is
    never masked) and integrate the resulting polynomial in t by Gauss-Legendre quadrature."""
    prompt, target, eps = [7, 8], [9, 10, 11], 1e-3
    m = len(target)
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    rows = np.asarray([prompt + [V if j in s else target[j] for j in range(m)] for s in subsets], np.int32)
    logp = jax.nn.log_softmax(model(jnp.asarray(rows)), -1)
    ce = np.asarray([-sum(float(logp[i, len(prompt) + j, target[j]]) for j in s) for i, s in enumerate(subsets)])
    x, w = np.polynomial.legendre.leggauss(8)
    t, w = (x + 1) / 2, w / 2
    p = (1 - eps) * t + eps
    exact = sum(c * np.sum(w * p ** (len(s) - 1) * (1 - p) ** (m - len(s))) for c, s in zip(ce, subsets))
    scorer = DiffusionScorer(model)
    nll, se = scorer.elbo([prompt], [target], _keys(1), n_samples=2048, chunk=512)
    assert abs(nll[0] - exact) < 4 * se[0] and se[0] < 0.05 * exact
    # The same row padded next to a longer one (other bucket) is estimated with the same draws.
    nll2, _ = scorer.elbo([prompt, [3] * 20], [target, [4]], np.concatenate([_keys(1), _keys(1, 5)]),
                          n_samples=2048, chunk=512)
    np.testing.assert_allclose(nll2[0], nll[0], rtol=1e-4)


def test_chain_rule_nll(model):
    prompt, target = [7, 8, 12], [9, 10, 11, 13]
    scorer = DiffusionScorer(model)
    one = scorer.chain_rule([prompt], [target[:1]])
    logp = jax.nn.log_softmax(model(jnp.asarray([prompt + [V]], jnp.int32))[0, -1])
    np.testing.assert_allclose(one[0], -float(logp[target[0]]), rtol=1e-5)
    # Longer continuation = the sum of per-token terms, each with the later tokens masked; ragged batch.
    want = 0.0
    for j in range(len(target)):
        row = prompt + target[:j] + [V] * (len(target) - j)
        want -= float(jax.nn.log_softmax(model(jnp.asarray([row], jnp.int32))[0, len(prompt) + j])[target[j]])
    got = scorer.chain_rule([prompt, [5], []], [target, [6, 7], [8]], chunk=2)
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    np.testing.assert_allclose(got[1], scorer.chain_rule([[5]], [[6, 7]])[0], rtol=1e-5)
    # Guidance: the traceable function with w = 0 on the guided path matches the plain one.
    batch = {k: jnp.asarray(v) for k, v in pack([prompt], [target]).items()}
    np.testing.assert_allclose(chain_rule_nll(model, batch, max_target_len=4, guided=True), [want], rtol=1e-5)


def test_bad_input_is_a_clear_error(model):
    g = DiffusionGenerator(model, eos_id=EOS)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        g([[5]], DiffusionSampling(max_new_tokens=4, steps=0))
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        g([[5]], DiffusionSampling(max_new_tokens=4, steps=2, guidance=-1.0))
    with pytest.raises(ValueError, match="non-empty prompt"):
        g([[5], []], DiffusionSampling(max_new_tokens=4, steps=2, guidance=1.0))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        g([[5] * 60], DiffusionSampling(max_new_tokens=8, steps=2))
    with pytest.raises(ValueError, match="needs PRNG keys"):
        g([[5]], DiffusionSampling(max_new_tokens=4, steps=2, rule="ancestral"))
    with pytest.raises(ValueError, match="rule must be"):
        g([[5]], DiffusionSampling(max_new_tokens=4, steps=2, rule="topk"))
    causal = Transformer(ModelConfig(**{**CFG.__dict__, "causal": True}), nnx.Rngs(0))
    with pytest.raises(ValueError, match="bidirectional"):
        DiffusionGenerator(causal, eos_id=EOS)
    with pytest.raises(ValueError, match="bidirectional"):
        DiffusionScorer(causal)
    assert g([[]], DiffusionSampling(max_new_tokens=4, steps=2)).tokens[0] is not None  # unconditional is fine
