"""Masked diffusion objectives (SMDM): normalisers and masks against numpy, SSL = cropping, SFT prompt/EOS rules,
config checks, sharding equivalence and a short training run."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import losses, run_script, tiny_overrides
from flax import nnx

from mathlm.models.transformer import ModelConfig, Transformer
from mathlm.train.config import ConfigError, load_config
from mathlm.train.objectives import get_objective, objective_name, sft_pad_is_eos
from mathlm.train.objectives.diffusion import mdm_loss, mdm_sft_loss, split_keys

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
    cfg = load_config(None, ["model.causal=false", "train.objective=mdm", "train.objective.ssl_ratio=0",
                               "train.objective.eps=0.5"])
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


def test_diffusion_objectives_default_to_the_papers_lr_and_warmup_and_refuse_eps_zero():
    mdm = load_config(None, ["model.causal=false", "train.steps=5000"]).train
    assert (mdm.lr, mdm.warmup_steps, mdm.min_lr_ratio) == (2e-4, 50, 0.1)  # 2e-4 -> 2e-5 cosine, 1% warmup
    sft = load_config(None, ["model.causal=false", "data.format=sft", "train.steps=10"]).train
    assert (sft.lr, sft.warmup_steps) == (2e-4, 1)
    causal = load_config(None, ["train.steps=5000"]).train
    assert (causal.lr, causal.warmup_steps) == (3e-4, 100)
    given = load_config(None, ["model.causal=false", "train.lr=1e-3", "train.warmup_steps=7"]).train
    assert (given.lr, given.warmup_steps) == (1e-3, 7)
    with pytest.raises(ConfigError, match=r"train.objective.eps must be in \(0, 1\)"):
        load_config(None, ["model.causal=false", "train.objective.eps=0"])


# Non-embedding parameters of the SMDM paper's sizes (its Table 5 names them 19M, 113M, 472M, 1028M).
PAPER_SIZES = {"19m": 18_880_896, "113m": 113_265_408, "472m": 471_906_560, "1028m": 1_027_677_952}


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_configs_have_the_papers_sizes_and_arm_differs_only_in_the_objective(size):
    import dataclasses
    configs = pathlib.Path(__file__).parent.parent / "configs"
    mdm, arm = (load_config(configs / f"{kind}-{size}.yaml") for kind in ("smdm", "arm"))
    assert mdm.model.param_count(embeddings=False) == PAPER_SIZES[size]
    assert objective_name(mdm) == "mdm" and objective_name(arm) == "causal_lm"
    assert not mdm.model.causal and arm.model.causal
    assert dataclasses.replace(arm.model, causal=False) == mdm.model
    assert dataclasses.replace(arm.train, objective=mdm.train.objective) == mdm.train
    assert (arm.data, arm.eval, arm.mesh, arm.checkpoint) == (mdm.data, mdm.eval, mdm.mesh, mdm.checkpoint)
    assert (mdm.train.lr, mdm.train.min_lr_ratio, mdm.train.weight_decay, mdm.train.clip_norm) == (2e-4, 0.1, 0.1, 1)
    assert mdm.train.warmup_steps == int(0.01 * mdm.train.steps)  # the default rule for mdm, written out


def test_a_written_out_mask_token_in_training_text_is_refused(corpus, tmp_path):
    from mathlm.data.sources import DataError, Example
    from mathlm.data.store import write_store
    from mathlm.data.tokenizer import Tokenizer
    tok = Tokenizer.load(corpus["tokenizer"])
    examples = [Example("", "2 + 2 = 4"), Example("", "2 + <|mask|> = 4")]
    with pytest.raises(DataError, match="example 2 contains the reserved token '<\\|mask\\|>'"):
        write_store(str(tmp_path / "store"), examples, tok)


MDM = ("model.causal=false", "train.objective=mdm", "train.objective.ssl_ratio=0.5", "train.lr=3e-3")


def test_sharded_and_single_device_mdm_losses_agree(corpus, tmp_path):
    record = tmp_path / "one.json"
    proc = run_script([str(tmp_path / "one"), str(record), *tiny_overrides(corpus, "train.steps=3", *MDM)],
                      devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(record.read_text())
    assert single["devices"] == 1 and len(single["losses"]) == 3
    from mathlm.train.loop import train
    wd = tmp_path / "sharded"
    train(load_config(None, tiny_overrides(corpus, "train.steps=3", "mesh.data=2", "mesh.fsdp=4", *MDM)), wd,
          show_progress=False)
    np.testing.assert_allclose(losses(wd), single["losses"], rtol=1e-5)


def test_mdm_training_lowers_the_loss_then_sft_on_eos_padded_rows(corpus, tmp_path):
    from mathlm.train.loop import train
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


def test_old_flat_objective_keys_name_their_new_key():
    for old, new in (("mdm_eps", "train.objective.eps"), ("ssl_ratio", "train.objective.ssl_ratio"),
                     ("cfg_drop", "train.objective.cfg_drop")):
        with pytest.raises(ConfigError, match=f"train.{old} is now {new}"):
            load_config(None, ["model.causal=false", f"train.{old}=0.5"])
    cfg = load_config(None, ["model.causal=false", "train.objective={name: mdm, eps: 0.25}"])
    assert (cfg.train.objective.eps, cfg.train.objective.ssl_ratio) == (0.25, 0.01)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.objective.ssl_ration' \(did you mean"):
        load_config(None, ["model.causal=false", "train.objective.ssl_ration=0.5"])
    with pytest.raises(ConfigError, match="unknown objective 'ppo'"):
        load_config(None, ["train.objective=ppo"])
