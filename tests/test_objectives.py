"""Objectives against hand computations, and the auxiliary-loss seam (Control-LLM divergence will use it)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mathlm.models.transformer import ModelConfig, Transformer
from mathlm.train.objectives import get_objective

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16)


def _batch():
    k = jax.random.key(0)
    inputs = jax.random.randint(k, (2, 6), 0, 50)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], jnp.float32)
    return {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1), "positions": jnp.tile(jnp.arange(6), (2, 1)),
            "segment_ids": jnp.ones((2, 6), jnp.int32), "loss_mask": mask}


def test_masked_lm_is_a_sum_with_the_loss_token_count_as_normaliser():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    batch = _batch()
    logits = np.asarray(model(batch["inputs"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"])
    for name in ("causal_lm", "sft"):
        loss_sum, metrics = get_objective(name)(model, batch, None, None)
        assert float(metrics["denom"]) == mask.sum() == 7
        np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)


class SowsDivergence(nnx.Module):
    def __init__(self):
        self.inner = Transformer(CFG, rngs=nnx.Rngs(0))

    def target_logprobs(self, *args):  # what the objectives call (the chunked loss head)
        self.sow(nnx.Intermediate, "aux_loss", jnp.asarray(0.25))
        return self.inner.target_logprobs(*args)


def test_aux_losses_are_added_with_the_same_normaliser():
    model = SowsDivergence()
    batch = _batch()
    plain, _ = get_objective("causal_lm")(model.inner, batch, None, None)
    with_aux, metrics = get_objective("causal_lm")(model, batch, None, None)
    np.testing.assert_allclose(float(with_aux), float(plain) + 0.25 * 7, rtol=1e-6)
    assert float(metrics["aux_loss"]) == 0.25 * 7
    # captured per call, never stored on the module: a second call does not count it twice
    again, _ = get_objective("causal_lm")(model, batch, None, None)
    assert float(again) == float(with_aux)
    assert not nnx.state(model, nnx.Intermediate)
    # the trainer's path: split/merge at a jit boundary
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda st: get_objective("causal_lm")(nnx.merge(graphdef, st), batch, None, None)[0])
    np.testing.assert_allclose(float(jitted(state)), float(with_aux), rtol=1e-6)


def test_every_objective_spec_is_complete_and_auto_is_unambiguous():
    import dataclasses

    from mathlm.train.objectives import REGISTRY, auto_name
    for name, spec in REGISTRY.items():
        section = spec.section()
        assert dataclasses.is_dataclass(section) and section.name == name
        fake = {"tokens": 4.0, "correct_sum": 2.0, "masked_tokens": 2.0, "masked_nll_sum": 1.0, "nll_sum": 1.0}
        assert tuple(spec.summarize(fake)) == spec.metric_names, name
        assert spec.model_kind in ("arm", "mdm") and spec.sft_pad in ("pad", "eos")
    pairs = [p for spec in REGISTRY.values() for p in spec.auto_for]
    assert len(pairs) == len(set(pairs))
    assert [auto_name(k, f) for k, f in (("arm", "lm"), ("arm", "sft"), ("mdm", "lm"), ("mdm", "sft"))] == [
        "causal_lm", "causal_lm", "mdm", "mdm_sft"]
