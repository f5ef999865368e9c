"""Masked diffusion objectives (SMDM): normalisers and masks against numpy, SSL = cropping, SFT prompt/EOS rules,
config checks, sharding equivalence and a short training run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import losses, run_script, tiny_overrides
from mathlm.models.transformer import ModelConfig, Transformer
from mathlm.train.config import ConfigError, load_config, objective_name, sft_pad_is_eos
from mathlm.train.diffusion_objectives import mdm_loss, mdm_sft_loss, split_keys
from mathlm.train.objectives import get_objective

V, L = 50, 12
CFG = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16,
                  causal=False, mask_token=True)
EOS = 2


def _model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _lm_batch():
    x = np.array(jax.random.randint(jax.random.key(1), (3, L), 3, V), np.int32)
    seg = np.ones((3, L), np.int32)
    seg[1, 7:] = 2  # two packed documents
    seg[2, 9:] = 0  # padding: not a token, not in the normaliser
    pos = np.tile(np.arange(L, dtype=np.int32), (3, 1))
    pos[1, 7:] -= 7
    return {"inputs": x, "targets": np.roll(x, -1, 1), "positions": pos, "segment_ids": seg,
            "loss_mask": np.ones((3, L), np.float32), "prompt_mask": np.zeros((3, L), np.int32)}


def _sft_batch():
    b = _lm_batch()
    prompt_lens, ends = [3, 5, 1], [9, 12, 6]  # ends: where the EOS padding starts
    for r, (pl, n) in enumerate(zip(prompt_lens, ends)):
        b["inputs"][r, n:] = EOS
        b["prompt_mask"][r] = np.arange(L) < pl
    b["segment_ids"] = np.ones((3, L), np.int32)
    b["positions"] = np.tile(np.arange(L, dtype=np.int32), (3, 1))
    return b, prompt_lens


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)


def _hand(model, rng, x0, maskable, seg, pos, eps, drop_prompt=None):
    """The SMDM loss in numpy from the documented key split: t, p, masks, then Σ CE/p over masked tokens."""
    _, _, k_t, k_mask, _ = split_keys(rng)
    p = (1 - eps) * np.asarray(jax.random.uniform(k_t, (x0.shape[0],))) + eps
    masked = (np.asarray(jax.random.uniform(k_mask, x0.shape)) < p[:, None]) & maskable
    xt = np.where(masked, V, x0)
    if drop_prompt is not None:
        xt = np.where(drop_prompt, V, xt)
    logits = np.asarray(model(jnp.asarray(xt), jnp.asarray(pos), jnp.asarray(seg)))
    assert logits.shape[-1] == V  # the head never covers the mask id
    nll = -np.take_along_axis(_log_softmax(logits), x0[..., None], -1)[..., 0]
    return (nll * masked / p[:, None]).sum(), masked, xt


def test_pretrain_loss_is_the_weighted_masked_ce_over_all_present_tokens():
    model, b = _model(), _lm_batch()
    rng = jax.random.key(7)
    loss_sum, m = mdm_loss(model, b, rng, eps=1e-3, ssl_ratio=0.0)
    present = b["segment_ids"] > 0
    want, masked, _ = _hand(model, rng, b["inputs"], present, b["segment_ids"], b["positions"], 1e-3)
    assert float(m["denom"]) == present.sum() == 3 * L - 3  # B·L minus the padding, not the masked count
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
    assert float(m["masked_tokens"]) == masked.sum() > 0
    assert not masked[2, 9:].any()  # padding is never masked


def test_ssl_crop_equals_running_the_cropped_sequence():
    model, b = _model(), _lm_batch()
    b["segment_ids"][2] = 1  # no padding: only the crop removes positions
    for seed in range(100):
        rng = jax.random.key(seed)
        k_ssl, k_len, *_ = split_keys(rng)
        ell = int(jax.random.randint(k_len, (), 1, L + 1))
        if 2 <= ell < L - 2:
            break
    loss_sum, m = mdm_loss(model, b, rng, eps=1e-3, ssl_ratio=1.0)
    assert float(m["denom"]) == 3 * ell
    # the same draws on the cropped arrays: masks restricted to the first ell positions
    _, _, k_t, k_mask, _ = split_keys(rng)
    p = (1 - 1e-3) * np.asarray(jax.random.uniform(k_t, (3,))) + 1e-3
    masked = (np.asarray(jax.random.uniform(k_mask, (3, L))) < p[:, None])[:, :ell]
    x0 = b["inputs"][:, :ell]
    logits = model(jnp.asarray(np.where(masked, V, x0)), jnp.asarray(b["positions"][:, :ell]),
                   jnp.asarray(b["segment_ids"][:, :ell]))
    nll = -np.take_along_axis(_log_softmax(logits), x0[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss_sum), (nll * masked / p[:, None]).sum(), rtol=1e-5)
    # ratio 0 never crops
    assert float(mdm_loss(model, b, rng, ssl_ratio=0.0)[1]["denom"]) == 3 * L


def test_sft_normaliser_prompt_never_masked_and_eos_padding_is_a_target():
    model, (b, prompt_lens) = _model(), _sft_batch()
    prompt = b["prompt_mask"] > 0
    seen_eos_masked = False
    for seed in range(5):
        rng = jax.random.key(seed)
        loss_sum, m = mdm_sft_loss(model, b, rng, eps=1e-3)
        assert float(m["denom"]) == 3 * L - sum(prompt_lens)
        want, masked, xt = _hand(model, rng, b["inputs"], ~prompt, b["segment_ids"], b["positions"], 1e-3)
        np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
        assert not masked[prompt].any() and np.all(xt[prompt] == b["inputs"][prompt])
        seen_eos_masked |= bool(masked[b["inputs"] == EOS].any())
    assert seen_eos_masked  # the EOS padding is masked and scored like any response token
    assert np.all(b["inputs"] < V)  # x0 (the targets) never holds the mask id


def test_cfg_drop_masks_the_whole_prompt_but_never_scores_it():
    model, (b, prompt_lens) = _model(), _sft_batch()
    prompt = b["prompt_mask"] > 0
    rng = jax.random.key(3)
    loss_sum, m = mdm_sft_loss(model, b, rng, eps=1e-3, cfg_drop=1.0)
    want, _, xt = _hand(model, rng, b["inputs"], ~prompt, b["segment_ids"], b["positions"], 1e-3, drop_prompt=prompt)
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
    assert np.all(xt[prompt] == V) and float(m["denom"]) == 3 * L - sum(prompt_lens)


def test_registered_with_config_hyperparameters():
    cfg = load_config(None, ["model.causal=false", "train.objective=mdm", "train.ssl_ratio=0", "train.mdm_eps=0.5"])
    model, b = _model(), _lm_batch()
    got = get_objective("mdm", cfg.train)(model, b, jax.random.key(0), None)[0]
    np.testing.assert_allclose(float(got), float(mdm_loss(model, b, jax.random.key(0), eps=0.5)[0]), rtol=1e-6)


def test_config_checks():
    with pytest.raises(ConfigError, match="bidirectional"):
        load_config(None, ["train.objective=mdm"])
    with pytest.raises(ConfigError, match="bidirectional"):
        load_config(None, ["train.objective=mdm", "model.causal=false", "model.mask_token=false"])
    with pytest.raises(ConfigError, match="causal model"):
        load_config(None, ["train.objective=causal_lm", "model.causal=false"])
    with pytest.raises(ConfigError, match="sft_pad"):
        load_config(None, ["train.objective=mdm_sft", "model.causal=false", "data.format=sft", "data.sft_pad=pad"])
    auto = load_config(None, ["model.causal=false", "data.format=sft"])
    assert objective_name(auto) == "mdm_sft" and sft_pad_is_eos(auto)
    assert objective_name(load_config(None, [])) == "causal_lm" and not sft_pad_is_eos(load_config(None, []))


MDM = ("model.causal=false", "train.objective=mdm", "train.ssl_ratio=0.5", "train.lr=3e-3")


def test_sharded_and_single_device_mdm_losses_agree(corpus, tmp_path):
    record = tmp_path / "one.json"
    proc = run_script([str(tmp_path / "one"), str(record), *tiny_overrides(corpus, "train.steps=3", *MDM)],
                      devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(record.read_text())
    assert single["devices"] == 1 and len(single["losses"]) == 3
    from mathlm.train.trainer import train
    wd = tmp_path / "sharded"
    train(load_config(None, tiny_overrides(corpus, "train.steps=3", "mesh.data=2", "mesh.fsdp=4", *MDM)), wd,
          show_progress=False)
    np.testing.assert_allclose(losses(wd), single["losses"], rtol=1e-5)


def test_mdm_training_lowers_the_loss_then_sft_on_eos_padded_rows(corpus, tmp_path):
    from mathlm.train.trainer import train
    cfg = load_config(None, tiny_overrides(corpus, "train.steps=40", "mesh.data=8", "train.eval_every=40",
                                           f"data.validation=[{corpus['validation']}]", "train.eval_batches=2",
                                           "model.causal=false", "train.objective=mdm"))
    train(cfg, tmp_path / "pre", show_progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "pre" / "metrics.jsonl")]
    ls = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(ls[-10:]) < np.mean(ls[:10]), ls  # one t per row makes single steps noisy

    last = [r for r in rows if "flops_6nd" in r][-1]
    n = cfg.model.param_count(embeddings=False)
    assert last["flops_6nd"] == pytest.approx(6 * n * 40 * 8 * 64) and "masked_ce" in last
    ev = [r for r in rows if "eval/loss" in r][-1]
    # held-out ELBO (fixed key): a random model starts at ln(512) = 6.24 nats/token (E[#masked / p] = #tokens)
    assert 0 < ev["eval/loss"] < np.log(512) - 1.5 and ev["eval/bpb"] > 0
    sft = load_config(None, tiny_overrides(corpus, "train.steps=3", "mesh.data=8", "model.causal=false",
                                           "data.format=sft", f"model.init_from={tmp_path / 'pre'}"))
    assert objective_name(sft) == "mdm_sft"
    out = train(sft, tmp_path / "sft", show_progress=False)
    assert np.isfinite(out["loss"]) and out["loss"] < ls[0]
