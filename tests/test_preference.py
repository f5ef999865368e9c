"""Preference optimisation (train/objectives/preference.py) and the `pref` data format: DPO and ORPO against hand
computations, the reference policy (disabled adapters, frozen copy), masking, gradient accumulation over pairs,
the pair pipeline, and short training runs from a plain checkpoint."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_overrides
from flax import nnx

from mathlm import models
from mathlm.data.pipeline import PairRows, sft_row
from mathlm.data.sources import DataError, read_examples
from mathlm.data.store import TokenStore, write_store
from mathlm.data.tokenizer import Tokenizer
from mathlm.models import variants
from mathlm.models.transformer import ModelConfig
from mathlm.train import objectives
from mathlm.train.config import ConfigError, load_config
from mathlm.train.loop import train
from mathlm.train.objectives import get_objective
from mathlm.train.objectives.preference import (
    DPOConfig,
    ORPOConfig,
    initial_loss,
    log1mexp,
    log_odds,
    sequence_logps,
)
from mathlm.train.state import combine, partition
from mathlm.train.trainer import TrainingError, batch_spec, build, compile_step, to_global

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
LORA = dataclasses.replace(BASE, variant={"name": "lora", "r": 4, "alpha": 8.0})
EOS, PAD = 2, 0


def _pairs(seed=0, b=3, length=12, vocab=64):
    """(B, 2, L) rows built by the pipeline's own sft_row: random prompts (bos first) and responses of varied
    lengths, each ending in eos, padded."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        prompt = [1, *rng.integers(3, vocab, rng.integers(1, 4))]
        sides = [sft_row(np.asarray([*prompt, *rng.integers(3, vocab, rng.integers(1, 6)), EOS], np.int32),
                         len(prompt), length, PAD) for _ in range(2)]
        rows.append({k: np.stack([s[k] for s in sides]) for k in sides[0]})
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _model(cfg, params):
    return nnx.merge(models.abstract(cfg)[0], params)


@pytest.fixture(scope="module")
def base_params():
    return models.init_params(BASE, 0)


def _lora_params(base_params, b_scale=0.0):
    params = variants.from_base(LORA, BASE, base_params, models.init_params(LORA, 1))
    keys = iter(jax.random.split(jax.random.key(3), 64))
    walk = lambda t: {k: b_scale * jax.random.normal(next(keys), v.shape) if k == "lora_b" else walk(v)
                      for k, v in t.items()} if isinstance(t, dict) else t
    return walk(params)


def _np_logps(model, batch):
    """Hand computation in float64: Σ over loss_mask of log_softmax(logits)[target], per (pair, side)."""
    b, r, length = batch["inputs"].shape
    logits = np.asarray(model(batch["inputs"].reshape(b * r, length)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, np.asarray(batch["targets"]).reshape(b * r, length, 1), -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64).reshape(b * r, length)
    return (tok * mask).sum(-1).reshape(b, r), mask.sum(-1).reshape(b, r)


def _per_pair(loss_and_metrics):
    loss_sum, m = loss_and_metrics
    return float(loss_sum) / float(m["denom"]), {k: float(v) / float(m["denom"]) for k, v in m.items()}


# ----------------------------------------------------------------------------- DPO

def test_summed_logps_match_a_hand_computation(base_params):
    model, batch = _model(BASE, base_params), _pairs()
    s, n, _ = sequence_logps(model, batch)
    want, count = _np_logps(model, batch)
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(n), count)
    assert count.min() >= 2  # every side scores its response and its eos


@pytest.mark.parametrize("reference", ["adapters", "auto"])
def test_dpo_with_the_fresh_adapter_as_policy_is_log_2(base_params, reference):
    model = _model(LORA, _lora_params(base_params))  # B = 0: the policy is its own reference
    loss, m = _per_pair(get_objective("dpo", DPOConfig(reference=reference))(model, _pairs(), None, {}))
    assert float(m["denom"]) == 1.0 and abs(loss - math.log(2)) < 1e-5
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert abs(m[k]) < 1e-6, k
    assert all(layer.enabled for _, layer in nnx.iter_modules(model) if hasattr(layer, "lora_a"))  # restored


def test_dpo_copy_reference_on_a_plain_model_is_log_2(base_params):
    model = _model(BASE, base_params)
    loss, m = _per_pair(get_objective("dpo", DPOConfig(reference="copy"))(model, _pairs(), None,
                                                                         {"reference": base_params}))
    assert abs(loss - math.log(2)) < 1e-5 and abs(m["rewards/margin"]) < 1e-6


def test_dpo_with_a_trained_adapter_uses_the_base_as_reference(base_params):
    """Disabled adapters are the base exactly: the loss is the DPO formula with S_ref from the plain model."""
    batch, beta = _pairs(1), 0.3
    policy = _model(LORA, _lora_params(base_params, b_scale=0.2))
    s, _ = _np_logps(policy, batch)
    ref, _ = _np_logps(_model(BASE, base_params), batch)
    rewards = beta * (s - ref)
    z = rewards[:, 0] - rewards[:, 1]
    assert np.abs(z).min() > 1e-3  # a real difference to test against
    for eps in (0.0, 0.2):
        want = (1 - eps) * np.logaddexp(0, -z) + eps * np.logaddexp(0, z)
        loss, m = _per_pair(get_objective("dpo", DPOConfig(beta=beta, label_smoothing=eps))(policy, batch, None, {}))
        np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
    np.testing.assert_allclose(m["rewards/chosen"], rewards[:, 0].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards/margin"], z.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracy"], (z > 0).mean())


def test_one_sgd_step_raises_the_chosen_minus_rejected_log_prob(base_params):
    """A plain gradient step on the adapters (the trainable leaves) moves S(y_w) − S(y_l) up."""
    graphdef, batch = models.abstract(LORA)[0], _pairs(2)
    trainable, frozen = partition(_lora_params(base_params), models.trainable_filter(LORA))
    loss = lambda t: get_objective("dpo")(nnx.merge(graphdef, combine(t, frozen)), batch, None, {})[0]
    def margin(t):
        s = sequence_logps(nnx.merge(graphdef, combine(t, frozen)), batch)[0]
        return float(jnp.sum(s[:, 0] - s[:, 1]))

    grads = jax.grad(loss)(trainable)
    stepped = jax.tree.map(lambda w, g: w - 0.5 * g, trainable, grads)
    assert margin(stepped) > margin(trainable) + 1e-4, (margin(stepped), margin(trainable))


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_masked_targets_and_padding_inputs_leave_the_loss_unchanged(base_params, name):
    """What the masks must guarantee: no prompt or padding position is scored (their target labels are
    irrelevant) and padding, which follows the response, never reaches a scored position. (A prompt token's
    *input* conditions the response, so changing it is meant to change the loss.)"""
    policy, batch = _model(LORA, _lora_params(base_params, b_scale=0.2)), _pairs(3)
    loss_fn = get_objective(name)
    before = float(loss_fn(policy, batch, None, {})[0])
    noise = jax.random.randint(jax.random.key(9), batch["inputs"].shape, 3, 64)
    scored, padding = batch["loss_mask"] > 0, batch["segment_ids"] == 0
    assert padding.any() and (~scored & ~padding).any()
    perturbed = dict(batch, targets=jnp.where(scored, batch["targets"], noise),
                     inputs=jnp.where(padding, noise, batch["inputs"]))
    np.testing.assert_allclose(float(loss_fn(policy, perturbed, None, {})[0]), before, rtol=1e-6)
    moved = dict(batch, inputs=jnp.where(batch["prompt_mask"] > 0, noise, batch["inputs"]))
    assert abs(float(loss_fn(policy, moved, None, {})[0]) - before) > 1e-5  # the conditioning does matter


def test_dpo_needs_a_reference_or_adapters(base_params):
    with pytest.raises(ValueError, match="neither LoRA nor a reference"):
        get_objective("dpo")(_model(BASE, base_params), _pairs(), None, {})
    with pytest.raises(ValueError, match="'reference'"):
        get_objective("dpo", DPOConfig(reference="copy"))(_model(BASE, base_params), _pairs(), None, {})


# ----------------------------------------------------------------------------- ORPO

def test_log1mexp_is_accurate_and_has_finite_gradients_near_zero():
    x = -np.logspace(-6, np.log10(50), 400).astype(np.float32)
    want = np.log1p(-np.exp(x.astype(np.float64)))  # float64: accurate to ~1e-10 relative over this range
    np.testing.assert_allclose(np.asarray(log1mexp(jnp.asarray(x))), want, rtol=2e-6)
    grads = jax.vmap(jax.grad(log1mexp))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grads), -np.exp(x.astype(np.float64)) / -np.expm1(x.astype(np.float64)),
                               rtol=1e-4)
    near = jnp.asarray([0.0, -1e-7, -1e-6, -1e-3], jnp.float32)  # 0 and -1e-7 are clipped to -1e-6
    assert np.all(np.isfinite(np.asarray(log_odds(near))))
    assert np.all(np.isfinite(np.asarray(jax.vmap(jax.grad(log_odds))(near))))


@pytest.mark.parametrize("lam", [0.1, 0.7])
def test_orpo_matches_a_hand_computation(base_params, lam):
    policy, batch = _model(LORA, _lora_params(base_params, b_scale=0.2)), _pairs(4)
    s, n = _np_logps(policy, batch)
    ell = s / n
    odds = ell - np.log1p(-np.exp(ell))
    ratio = odds[:, 0] - odds[:, 1]
    want = -ell[:, 0] + lam * np.logaddexp(0, -ratio)
    loss, m = _per_pair(get_objective("orpo", ORPOConfig(lam=lam))(policy, batch, None, {}))
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["log_odds_ratio"], ratio.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["nll"], -ell[:, 0].mean(), rtol=1e-5)


def test_orpo_without_the_odds_term_is_the_chosen_mean_token_nll(base_params):
    policy, batch = _model(BASE, base_params), _pairs(5)
    logits = policy(batch["inputs"][:, 0])
    from mathlm.train.objectives import token_nll
    mask = batch["loss_mask"][:, 0]
    per_row = jnp.sum(token_nll(logits, batch["targets"][:, 0]) * mask, -1) / jnp.sum(mask, -1)
    loss, _ = _per_pair(get_objective("orpo", ORPOConfig(lam=0.0))(policy, batch, None, {}))
    np.testing.assert_allclose(loss, float(jnp.mean(per_row)), rtol=1e-5)


# ----------------------------------------------------------------------------- data

def _write_pref(path, n=24, answers=None):
    rows = [json.loads(l) for l in open(answers)][:n + 1]
    with open(path, "w") as f:
        for i, (r, other) in enumerate(zip(rows, rows[1:])):
            f.write(json.dumps({"id": i, "prompt": f"Question: {r['question']}\nAnswer:", "chosen": f" {r['answer']}",
                                "rejected": f" {other['answer']}", "branch": "weak_chosen"}) + "\n")
    return path


def test_pair_rows_hold_chosen_then_rejected_with_the_prompt_masked(corpus, tmp_path):
    tok = Tokenizer.load(corpus["tokenizer"])
    path = _write_pref(tmp_path / "pairs.jsonl", 6, corpus["jsonl"]["train"])
    write_store(str(tmp_path / "store"), read_examples([str(path)], "pref"), tok, pairs=True)
    src = PairRows(TokenStore(str(tmp_path / "store")), 256, tok.pad_id)
    rec = json.loads(open(path).readline())
    item = src[0]
    assert len(src) == 6 and all(v.shape == (2, 256) for v in item.values())
    assert sorted(item) == ["inputs", "loss_mask", "positions", "prompt_mask", "segment_ids", "targets"]
    prompt_len = 1 + len(tok.encode(rec["prompt"]))
    for side, key in enumerate(("chosen", "rejected")):
        row = {k: v[side] for k, v in item.items()}
        assert int(row["prompt_mask"].sum()) == prompt_len and row["inputs"][0] == tok.bos_id
        trained = row["targets"][row["loss_mask"] > 0]
        assert trained[-1] == tok.eos_id  # eos belongs to the response
        assert tok.decode([int(t) for t in trained[:-1]]) == tok.decode(tok.encode(rec[key]))
        assert row["loss_mask"][: prompt_len - 1].sum() == 0 and row["loss_mask"][prompt_len - 1] == 1


def test_bad_preference_input_is_one_line(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": " a", "rejected": " b"}\n{"prompt": "Q", "chosen": " a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*no 'rejected'"):
        list(read_examples([str(bad)], "pref"))
    with pytest.raises(DataError, match="not a preference store"):
        PairRows(TokenStore(str(corpus["train"])), 64, 0)
    with pytest.raises(ConfigError, match="neither LoRA nor a reference"):
        load_config(None, ["data.format=pref", "train.objective={name: dpo, reference: adapters}"])
    with pytest.raises(ConfigError, match="beta must be > 0"):
        load_config(None, ["data.format=pref", "train.objective={name: dpo, beta: 0}"])
    with pytest.raises(ConfigError, match="needs data.format=pref"):
        load_config(None, ["data.format=sft", "train.objective=orpo"])


def test_frozen_sets_and_batch_shape_follow_the_config(tiny_run):
    lora = [f"model.init_from={tiny_run}", "model.variant={name: lora, r: 4}", "model.max_seq_len=256"]
    for extra, sets in (([], ("reference",)), (lora, ()), (lora + ["train.objective.reference=copy"], ("reference",)),
                        (lora + [r"train.trainable=[lora_]"], ("reference",))):
        cfg = load_config(None, ["data.format=pref", "train.objective=dpo", *extra])
        assert objectives.frozen_sets_of(cfg) == sets, extra
    cfg = load_config(None, ["data.format=pref", "train.objective=orpo", "train.batch_size=4", "train.steps=100"])
    assert objectives.frozen_sets_of(cfg) == () and batch_spec(cfg)["inputs"].shape == (4, 2, 256)
    assert cfg.train.lr == 1e-5 and cfg.train.warmup_steps == 10


# ----------------------------------------------------------------------------- trainer and loop

def test_gradient_accumulation_over_pairs_matches_one_batch():
    """k micro-batches: the same loss, metrics and gradient norm as one batch (the pair is the unit), with a
    reference that differs from the policy so that nothing is trivially log 2."""
    common = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.d_ff=64", "model.max_seq_len=16", "train.seq_len=12", "train.batch_size=16", "data.format=pref",
              "train.objective={name: dpo, beta: 3.0}"]
    batch = {k: np.asarray(v) for k, v in _pairs(6, b=16).items()}
    out = []
    for k in (1, 2):
        setup = build(load_config(None, [*common, f"train.micro_batches={k}"]))
        trainable, frozen, opt = setup.init_fn(0)
        frozen["sets"]["reference"] = jax.device_put(models.init_params(setup.cfg.model, 7),
                                                     setup.frozen_sh["sets"]["reference"])
        out.append(jax.device_get(setup.step_fn(trainable, frozen, opt, to_global(setup, batch))[2]))
    one, acc = out
    assert float(one["tokens"]) == float(acc["tokens"]) == 16.0  # pairs
    assert abs(float(one["loss"]) - math.log(2)) > 1e-3
    for key in ("loss", "grad_norm", "rewards/margin", "rewards/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(acc[key]), float(one[key]), rtol=1e-5, err_msg=key)
    assert compile_step(setup) is not None  # the dry-run compile takes batch_spec's (B, 2, L)


def _rows(wd):
    return [json.loads(l) for l in open(wd / "metrics.jsonl")]


@pytest.fixture(scope="module")
def pref_file(corpus, tmp_path_factory):
    return _write_pref(tmp_path_factory.mktemp("pref") / "pairs.jsonl", 24, corpus["jsonl"]["train"])


def _pref_cfg(corpus, tiny_run, pref_file, *extra):
    return load_config(None, tiny_overrides(
        corpus, "model.max_seq_len=256", f"model.init_from={tiny_run}", "data.format=pref",
        f"data.train=[{pref_file}]", f"data.validation=[{pref_file}]", "train.eval_every=2", "train.eval_batches=1",
        "train.steps=3", *extra))


@pytest.fixture(scope="module")
def dpo_lora_run(corpus, tiny_run, pref_file, tmp_path_factory):
    wd = tmp_path_factory.mktemp("dpo") / "run"
    cfg = _pref_cfg(corpus, tiny_run, pref_file, "model.variant={name: lora, r: 4, alpha: 8}", "train.objective=dpo")
    return wd, cfg, train(cfg, wd, show_progress=False)


def test_dpo_trains_a_lora_model_from_a_plain_run(dpo_lora_run):
    wd, cfg, last = dpo_lora_run
    rows = [r for r in _rows(wd) if "loss" in r]
    assert objectives.frozen_sets_of(cfg) == () and len(rows) == 3
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5  # step 1's loss is the initial policy's: policy = reference
    assert initial_loss(wd) == rows[0]["loss"]  # the loop's step-0 record
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["rewards/margin"] != 0.0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= set(rows[0])
    assert rows[0]["tokens"] == 8.0 and math.isfinite(last["eval/loss"])  # 8 pairs; eval on the chosen sides


def test_dpo_from_a_trained_adapter_stops_at_step_0(corpus, pref_file, dpo_lora_run, tmp_path):
    """LLaMA-Factory's trap: resuming a trained adapter makes the disabled-adapter reference the raw base, not
    the starting policy; the run-time check refuses it."""
    wd, _, _ = dpo_lora_run
    cfg = _pref_cfg(corpus, wd, pref_file, "model.variant={name: lora, r: 4, alpha: 8}", "train.objective=dpo")
    with pytest.raises(TrainingError, match="step-0 dpo loss"):
        train(cfg, tmp_path / "trap", show_progress=False)


def test_orpo_trains_a_lora_model_from_a_plain_run(corpus, tiny_run, pref_file, tmp_path):
    cfg = _pref_cfg(corpus, tiny_run, pref_file, "model.variant={name: lora, r: 4, alpha: 8}",
                    "train.objective={name: orpo, lam: 0.2}")
    last = train(cfg, tmp_path / "orpo", show_progress=False)
    rows = [r for r in _rows(tmp_path / "orpo") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(last["eval/loss"])
    assert {"nll", "log_odds_ratio", "rewards/accuracy", "or_loss"} <= set(rows[0])
    np.testing.assert_allclose(rows[0]["loss"], rows[0]["nll"] + 0.2 * rows[0]["or_loss"], rtol=1e-5)


def test_dpo_full_fine_tuning_keeps_its_reference_copy_across_a_resume(corpus, tiny_run, pref_file, tmp_path):
    common = ("train.objective=dpo", "train.eval_every=0", "checkpoint.every_steps=1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_pref_cfg(corpus, tiny_run, pref_file, *common), straight, show_progress=False)
    train(_pref_cfg(corpus, tiny_run, pref_file, *common), split, show_progress=False, stop_after=2)
    train(_pref_cfg(corpus, tiny_run, pref_file, *common), split, show_progress=False)
    loss = lambda wd: [r["loss"] for r in _rows(wd) if "loss" in r]
    assert loss(split) == loss(straight) and abs(loss(straight)[0] - math.log(2)) < 1e-5
