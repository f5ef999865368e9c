"""Blocked (flash) attention and the TPU splash kernel (through the Pallas interpreter) against the einsum path
and a float64 reference: forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mathlm.models import transformer as tr
from mathlm.models.blocked_attention import blocked_attend
from mathlm.models.splash import splash_attend

KERNELS = {
    "blocked": blocked_attend,
    "splash": lambda q, k, v, seg, causal, block: splash_attend(q, k, v, seg, causal, block, interpret=True),
}


def _inputs(b=2, t=64, kv=2, g=2, dh=16, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, t, kv, g, dh)), jax.random.normal(ks[1], (b, t, kv, dh)),
            jax.random.normal(ks[2], (b, t, kv, dh)))


def _reference(q, k, v, mask):
    """Plain softmax attention in float64 (numpy), masked rows -> 0."""
    q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, v, mask))
    s = np.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bkgts,bskd->btkgd", p, v)


SEGMENTS = {
    "one document": np.ones((2, 64), np.int32),
    "packed": np.array([[1] * 40 + [2] * 24, [1] * 10 + [2] * 30 + [3] * 24], np.int32),
    "ragged (padding = its own segment)": np.array([[1] * 50 + [0] * 14, [1] * 64], np.int32),
}


# (kernel, sequence length, block): splash's blocks are multiples of 128 lanes, so its cases run at T = 256.
CASES = [("blocked", 64, 16), ("blocked", 64, 64), ("splash", 256, 128), ("splash", 256, 256)]


@pytest.mark.parametrize("kernel,t,block", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", list(SEGMENTS))
def test_kernel_matches_float64_and_einsum(kernel, t, block, causal, segments):
    q, k, v = _inputs(t=t)
    seg = jnp.asarray(np.repeat(SEGMENTS[segments], t // 64, axis=1))  # the same layout, stretched to T
    mask = tr.attention_mask(seg, causal)
    ref = _reference(q, k, v, mask)
    attend = KERNELS[kernel]
    out = attend(q, k, v, seg, causal, block)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(tr._attend(q, k, v, mask)), atol=1e-5 * np.abs(ref).max())
    weights = jax.random.normal(jax.random.PRNGKey(7), q.shape)  # a cotangent that is not uniform
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weights)
    g_blocked = jax.grad(loss(lambda q, k, v: attend(q, k, v, seg, causal, block)), (0, 1, 2))(q, k, v)
    g_einsum = jax.grad(loss(lambda q, k, v: tr._attend(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_einsum):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("kernel,t,block,bad", [("blocked", 64, 32, 48), ("splash", 256, 128, 384)])
def test_mqa_and_a_block_that_does_not_divide(kernel, t, block, bad):
    q, k, v = _inputs(t=t, kv=1, g=4)  # one kv head shared by four query heads
    seg = jnp.ones((2, t), jnp.int32)
    mask = tr.attention_mask(seg, True)
    np.testing.assert_allclose(np.asarray(KERNELS[kernel](q, k, v, seg, True, block)), _reference(q, k, v, mask),
                               atol=1e-5 * 4)
    with pytest.raises(ValueError, match=f"not a multiple of the block {bad}"):
        KERNELS[kernel](q, k, v, seg, True, bad)


def test_a_model_with_blocked_attention_equals_the_einsum_model():
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    einsum = tr.Transformer(tr.ModelConfig(**base, attention="xla"), nnx.Rngs(0))
    blocked = tr.Transformer(tr.ModelConfig(**base, attention="blocked", attention_block=16), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 97)
    seg = jnp.asarray(SEGMENTS["packed"])

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(tokens, segment_ids=seg), -1)[..., 0])

    (la, ga), (lb, gb) = nnx.value_and_grad(loss)(einsum), nnx.value_and_grad(loss)(blocked)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * max(float(jnp.abs(a).max()), 1e-6))


def test_a_sequence_length_off_the_block_is_a_config_error():
    from mathlm.train.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.seq_len=96 is not a multiple of model.attention_block=64"):
        load_config("configs/math-tiny.yaml", ["model.attention=blocked", "model.attention_block=64",
                                               "train.seq_len=96"])


def test_auto_on_this_cpu_keeps_einsum_below_the_measured_threshold():
    cfg = tr.ModelConfig(attention_block=512)
    assert tr.attention_kind(cfg, 1024) == "xla" and tr.attention_kind(cfg, tr.BLOCKED_FROM - 512) == "xla"
    assert tr.attention_kind(cfg, tr.BLOCKED_FROM) == "blocked"
    assert tr.attention_kind(cfg, tr.BLOCKED_FROM + 100) == "xla"  # off the block: the einsum path stays
