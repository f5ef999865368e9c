"""The chunked loss head: log p(target) and its gradients equal the whole-sequence head's (1e-5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mathlm.models import transformer as tr


def _model(loss_chunk: int, tie: bool):
    cfg = tr.ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                         tie_embeddings=tie, loss_chunk=loss_chunk)
    return tr.Transformer(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("t,chunk", [(64, 16), (60, 16), (64, 64)])  # 60: padded to 64 and sliced back
def test_chunked_logprobs_and_gradients_match_the_full_head(tie, t, chunk):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, t), 0, 97)
    targets = jnp.roll(tokens, -1, axis=1)
    seg = jnp.concatenate([jnp.ones((3, t // 2), jnp.int32), 2 * jnp.ones((3, t - t // 2), jnp.int32)], 1)
    weights = jax.random.uniform(jax.random.PRNGKey(2), (3, t))  # a per-token weight, as the ELBO's 1/t
    whole, chunked = _model(1024, tie), _model(chunk, tie)

    full = jax.nn.log_softmax(whole(tokens, segment_ids=seg), -1)
    want = jnp.take_along_axis(full, targets[..., None], -1)[..., 0]
    logp, hit = chunked.target_logprobs(tokens, targets, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(hit), np.asarray(jnp.argmax(full, -1) == targets))

    loss = lambda m: jnp.sum(m.target_logprobs(tokens, targets, segment_ids=seg)[0] * weights)
    (la, ga), (lb, gb) = nnx.value_and_grad(loss)(whole), nnx.value_and_grad(loss)(chunked)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * max(float(jnp.abs(a).max()), 1e-6))


def test_no_chunk_holds_the_whole_logits():
    """Under jit the chunked step's largest fp32 buffer is one chunk of logits, not (B, T, V)."""
    model = _model(16, False)
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((4, 64), jnp.int32)

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state).target_logprobs(tokens, tokens)[0])

    hlo = jax.jit(jax.grad(loss)).lower(state).as_text()
    assert "4x16x97xf32" in hlo and "4x64x97xf32" not in hlo
