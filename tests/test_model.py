"""The Transformer: shapes, causality, document isolation under packing, mask row, GQA, tied embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mathlm.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def _model(**kw):
    return Transformer(ModelConfig(**{**CFG.__dict__, **kw}), rngs=nnx.Rngs(0))


def test_logits_cover_real_vocab_only_and_mask_row_is_an_input():
    m = _model()
    assert m.embed.embedding[...].shape == (98, 32)  # one extra row for the mask token
    tokens = jnp.full((2, 8), 97, jnp.int32)  # all-mask input is valid
    out = m(tokens)
    assert out.shape == (2, 8, 97) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_causal_model_ignores_the_future():
    m = _model()
    x = jax.random.randint(jax.random.key(1), (1, 16), 0, 97)
    y = x.at[0, 10].set((x[0, 10] + 1) % 97)
    a, b = np.asarray(m(x)), np.asarray(m(y))
    np.testing.assert_allclose(a[0, :10], b[0, :10], rtol=1e-5, atol=1e-6)
    assert np.abs(a[0, 10:] - b[0, 10:]).max() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_do_not_attend_across(causal):
    """Two documents in one row: perturbing the second leaves the first one's logits unchanged."""
    m = _model(causal=causal)
    x = jax.random.randint(jax.random.key(2), (1, 16), 0, 97)
    seg = jnp.asarray([[1] * 9 + [2] * 7], jnp.int32)
    pos = jnp.asarray([list(range(9)) + list(range(7))], jnp.int32)
    y = x.at[0, 12].set((x[0, 12] + 5) % 97)
    a, b = np.asarray(m(x, pos, seg)), np.asarray(m(y, pos, seg))
    np.testing.assert_allclose(a[0, :9], b[0, :9], rtol=1e-5, atol=1e-6)
    assert np.abs(a[0, 9:] - b[0, 9:]).max() > 1e-4
    # ... and the second document is computed exactly as if it stood alone at positions 0..6.
    alone = np.asarray(m(x[:, 9:], pos[:, 9:], seg[:, 9:]))
    np.testing.assert_allclose(a[0, 9:], alone[0], rtol=1e-4, atol=1e-5)


def test_bidirectional_model_sees_the_future():
    m = _model(causal=False)
    x = jax.random.randint(jax.random.key(1), (1, 16), 0, 97)
    y = x.at[0, 10].set((x[0, 10] + 1) % 97)
    assert np.abs(np.asarray(m(x))[0, :10] - np.asarray(m(y))[0, :10]).max() > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = _model()
    mha = _model(n_kv_heads=4)
    g_state, m_state = nnx.state(gqa, nnx.Param), nnx.state(mha, nnx.Param)
    src = nnx.to_pure_dict(g_state)
    for _i, blk in src["blocks"].items():
        for name in ("k", "v"):
            w = blk["attn"][name]["kernel"].reshape(32, 2, 8)  # (d, kv_heads, head_dim)
            blk["attn"][name]["kernel"] = jnp.repeat(w, 2, axis=1).reshape(32, 32)  # kv head j serves q heads 2j, 2j+1
    nnx.replace_by_pure_dict(m_state, src)
    nnx.update(mha, m_state)
    x = jax.random.randint(jax.random.key(3), (2, 12), 0, 97)
    np.testing.assert_allclose(np.asarray(gqa(x)), np.asarray(mha(x)), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_the_matrix():
    """With tied embeddings the head is the embedding (real rows only): scaling it scales the logits."""
    m = _model(tie_embeddings=True)
    assert not hasattr(m, "lm_head")
    x = jnp.arange(8)[None]
    before = np.asarray(m(x))
    emb = m.embed.embedding[...]
    # Changing only the mask row (an input row the head never uses) leaves these logits unchanged.
    m.embed.embedding[...] = emb.at[97].set(1.0)
    np.testing.assert_array_equal(np.asarray(m(x)), before)
    m.embed.embedding[...] = emb.at[5].set(emb[5] * 3.0)
    assert np.abs(np.asarray(m(x))[..., 5] - before[..., 5]).max() > 1e-4


def test_param_count_matches_the_tree():
    for kw in ({}, {"tie_embeddings": True}, {"mask_token": False}):
        m = _model(**kw)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert n == m.cfg.param_count()


def test_bfloat16_compute_keeps_float32_params_and_logits():
    m = _model(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    out = m(jnp.zeros((1, 4), jnp.int32))
    assert out.dtype == jnp.float32
    ref = _model()(jnp.zeros((1, 4), jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.05)


def test_remat_changes_memory_not_results():
    x = jax.random.randint(jax.random.key(4), (2, 12), 0, 97)

    def loss_and_grads(model):
        g, p = nnx.split(model, nnx.Param)
        f = lambda p: jnp.mean(nnx.merge(g, p)(x) ** 2)
        return jax.value_and_grad(f)(p)

    (la, ga), (lb, gb) = loss_and_grads(_model()), loss_and_grads(_model(remat=True))
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
