"""`mathlm convert`: Hugging Face <-> mathlm round trips on tiny random models, checked against transformers.

HF -> mathlm -> HF: tensors bit-identical, logits within 1e-4 (float32), greedy generation equal to transformers'.
mathlm -> HF -> mathlm: params bit-identical (less the mask row). Exported tokenizers read the same under
AutoTokenizer. Every unsupported input is a one-line error naming what is wrong.
"""
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mathlm.cli.convert import app
from mathlm.data.tokenizer import Tokenizer, train_tokenizer
from mathlm.models.generate import Generator, Sampling
from mathlm.train import checkpoint as ckpt
from mathlm.train.config import load_config
from mathlm.train.convert import VERIFY_TEXTS, from_hf, read_hf_weights, to_hf, verify
from mathlm.train.runs import load_run, save_params_run

runner = CliRunner()
TEXTS = [*VERIFY_TEXTS, "Question: What is 17 * 23?\nAnswer: 17 * 23 = 391. #### 391"] * 4
PROMPTS = ["Question: 12 + 7 =", "The primes", "x^2 - 1 = (x - 1)(x + 1) so"]
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
SMALL = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "initializer_range": 0.1}
HF_MODELS = {  # name: (config class, extra kwargs, tokenizer kind)
    "llama": ("LlamaConfig", {"rope_theta": 500000.0}, "llama"),
    "mistral": ("MistralConfig", {"sliding_window": 4096, "num_key_value_heads": 1}, "llama"),
    "qwen2": ("Qwen2Config", {"rope_theta": 1e6}, "qwen"),
    "llama_tied_llama3": ("LlamaConfig", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}, "llama"),
}


def _fails(args, *needles):
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output.strip()
    assert result.exit_code != 0, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, (out, repr(result.exception))
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def native_tok(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(iter(TEXTS), 300).save(path)
    return path


def _hf_tokenizer(folder: pathlib.Path, kind: str) -> dict:
    """A byte-level BPE saved the transformers way; Llama-like (<s> </s>) or Qwen-like (eos only, no bos)."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers
    specials = ["<unk>", "<s>", "</s>"] if kind == "llama" else ["<|endoftext|>"]
    raw = Raw(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    roles = ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if kind == "llama"
             else {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **roles).save_pretrained(folder)
    ids = {"bos_token_id": 1, "eos_token_id": 2} if kind == "llama" else {"bos_token_id": None, "eos_token_id": 0}
    return ids


def _hf_model(name: str, folder: pathlib.Path):
    cls_name, extra, tok_kind = HF_MODELS[name]
    ids = _hf_tokenizer(folder, tok_kind)
    config = getattr(transformers, cls_name)(**{**SMALL, **extra, **ids})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    model.save_pretrained(folder)
    return model


def _random_ids(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _logits_hf(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _hf_greedy(model, prompt, n, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos)] if eos in new else new


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_to_mathlm_to_hf(name, tmp_path):
    hf_dir, run_dir, back = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    ref = _hf_model(name, hf_dir)
    from_hf(hf_dir, run_dir)
    run = load_run(run_dir)
    assert run.cfg.model.mask_token is False and run.cfg.model.max_seq_len == 128
    tok = run.tokenizer
    assert tok.eos_id == ref.config.eos_token_id and tok.bos_id == ref.config.bos_token_id

    # Logits: a text in the model's own tokenization and random ids, both within 1e-4 of transformers.
    for ids in ([t for t in [tok.bos_id] if t is not None] + tok.encode(TEXTS[0])[:100], _random_ids(128, 320)):
        ours = np.asarray(run.model(jnp.asarray([ids], jnp.int32))[0])
        np.testing.assert_allclose(ours, _logits_hf(ref, ids), atol=1e-4, rtol=0)

    # Greedy decoding: our cached, batched, left-padded Generator == transformers generate(do_sample=False).
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompts = [bos + tok.encode(p) for p in PROMPTS]
    gen = Generator(run.model, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ours = gen(prompts, Sampling(max_new_tokens=20, temperature=0.0)).tokens
    assert ours == [_hf_greedy(ref, p, 20, tok.eos_id) for p in prompts]

    # Back to HF: every tensor bit-identical, and transformers computes the very same logits.
    to_hf(run_dir, back)
    orig, again = read_hf_weights(hf_dir), read_hf_weights(back)
    if ref.config.tie_word_embeddings:
        orig.pop("lm_head.weight", None)
    assert sorted(orig) == sorted(again)
    for k in orig:
        assert orig[k].dtype == again[k].dtype and np.array_equal(orig[k], again[k]), k
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        back, attn_implementation="eager", output_loading_info=True, **{DTYPE_KW: torch.float32})
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = _random_ids(96, 320, seed=1)
    np.testing.assert_array_equal(_logits_hf(reloaded.eval(), ids), _logits_hf(ref, ids))
    orig_tok, back_tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (hf_dir, back))
    assert back_tok(TEXTS[1]).input_ids == orig_tok(TEXTS[1]).input_ids
    assert (back_tok.bos_token, back_tok.eos_token) == (orig_tok.bos_token, orig_tok.eos_token)


def _mathlm_run(folder: pathlib.Path, tok_path: pathlib.Path, *overrides: str):
    cfg = load_config(None, ["model.vocab_size=320", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=160", "model.max_seq_len=128", "train.seq_len=64",
                             *overrides])
    from mathlm.train.runs import abstract_params
    _, like = abstract_params(cfg)
    rng = np.random.default_rng(0)
    params = {k: (rng.normal(0, 0.1, v.shape) + (1.0 if k.endswith("scale") else 0.0)).astype(np.float32)
              for k, v in ckpt.flatten(like).items()}
    save_params_run(folder, cfg, ckpt.unflatten(like, params), tok_path)
    return cfg, params


VARIANTS = {
    "llama_gqa_mask": ["model.mask_token=true"],
    "qkv_bias_as_qwen2": ["model.attention_bias=true", "model.mask_token=false", "model.rope_theta=1e6"],
    "tied_llama3": ["model.tie_embeddings=true", "model.rope_scaling=llama3", "model.rope_factor=4.0",
                    "model.rope_original_max_len=32"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mathlm_to_hf_to_mathlm(variant, native_tok, tmp_path):
    run_dir, hf_dir, back = tmp_path / "run", tmp_path / "hf", tmp_path / "back"
    cfg, params = _mathlm_run(run_dir, native_tok, *VARIANTS[variant])
    to_hf(run_dir, hf_dir)
    hf_conf = json.loads((hf_dir / "config.json").read_text())
    assert hf_conf["architectures"] == ["Qwen2ForCausalLM" if cfg.model.attention_bias else "LlamaForCausalLM"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", output_loading_info=True, **{DTYPE_KW: torch.float32})
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_run(run_dir).model
    ids = _random_ids(128, 320)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray([ids]))[0]), _logits_hf(model.eval(), ids), atol=1e-4,
                               rtol=0)

    from_hf(hf_dir, back)
    got = ckpt.flatten(nnx.to_pure_dict(nnx.state(load_run(back).model, nnx.Param)))
    assert sorted(got) == sorted(params)
    for k, want in params.items():
        want = want[: cfg.model.vocab_size] if k == "embed.embedding" else want  # the mask row is not exported
        assert np.array_equal(np.asarray(got[k]), want), k


def test_exported_tokenizer_reads_the_same_under_autotokenizer(native_tok, tmp_path):
    _mathlm_run(tmp_path / "run", native_tok)
    to_hf(tmp_path / "run", tmp_path / "hf")
    ours = Tokenizer.load(native_tok)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert len(auto) == ours.vocab_size  # the mask token, with no embedding row, is not exported
    for text in [*VERIFY_TEXTS, "  spaces\tand tabs\n\n", "üñíçødé ∑ x² → ∞", "007 + 1,000,000.50"]:
        ids = ours.encode(text)
        assert auto(text, add_special_tokens=False).input_ids == ids
        assert auto(text).input_ids == [ours.bos_id, *ids]  # HF users get <|bos|> as mathlm prompts have it
        assert auto.decode(ids) == ours.decode(ids) == text
    # The exported tokenizer comes back with the same roles (from its tokenizer_config.json).
    back = Tokenizer.load(tmp_path / "hf")
    assert (back.bos_id, back.eos_id, back.pad_id, back.mask_id) == (ours.bos_id, ours.eos_id, ours.pad_id, None)
    assert back.encode(TEXTS[0]) == ours.encode(TEXTS[0])


def test_cli_round_trip_with_verify_and_shards(native_tok, tmp_path):
    _mathlm_run(tmp_path / "run", native_tok, "model.tie_embeddings=true")
    result = runner.invoke(app, ["to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--verify",
                                 "--max-shard-size", "40KB"])
    assert result.exit_code == 0, result.output
    assert "verify:" in result.output and ": OK" in result.output
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    result = runner.invoke(app, ["from-hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--verify"])
    assert result.exit_code == 0, result.output
    assert ": OK" in result.output
    report = verify(tmp_path / "back", tmp_path / "hf")
    assert report["ok"] and report["tokens"] > 300 and report["argmax_agreement"] == 1.0


def test_verify_fails_on_a_wrong_weight(native_tok, tmp_path):
    _mathlm_run(tmp_path / "run", native_tok)
    to_hf(tmp_path / "run", tmp_path / "hf")
    tensors = {k: np.array(v) for k, v in read_hf_weights(tmp_path / "hf").items()}
    tensors["model.norm.weight"] *= 1.01
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    report = verify(tmp_path / "run", tmp_path / "hf")
    assert not report["ok"] and report["max_abs_logit_diff"] > 1e-4 and report["max_kl"] > 1e-6
    # The CLI exits 1 when the check fails: here with a limit below float32 round-off (the import is exact).
    result = runner.invoke(app, ["from-hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--verify",
                                 "--atol", "1e-12"])
    assert result.exit_code == 1 and ": FAILED" in result.output, result.output


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    _hf_model("llama", d)
    return d


def _edited(llama_dir, tmp_path, **changes):
    d = tmp_path / "edited"
    shutil.copytree(llama_dir, d)
    conf = json.loads((d / "config.json").read_text())
    conf.update(changes)
    (d / "config.json").write_text(json.dumps(conf))
    return d


@pytest.mark.parametrize("changes, needles", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, ["'gpt2'", "llama, mistral, qwen2"]),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, ["rope_scaling", "'linear'"]),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, ["rope_scaling", "'yarn'"]),
    ({"head_dim": 32}, ["head_dim=32"]),
    ({"hidden_act": "gelu"}, ["hidden_act='gelu'"]),
    ({"mlp_bias": True}, ["mlp_bias"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"model_type": "qwen2", "use_sliding_window": True}, ["use_sliding_window"]),
])
def test_unsupported_configs_are_one_line_errors(llama_dir, tmp_path, changes, needles):
    _fails(["from-hf", _edited(llama_dir, tmp_path, **changes), tmp_path / "out"], *needles)
    assert not (tmp_path / "out").exists()


def test_bad_weights_are_one_line_errors(llama_dir, tmp_path):
    d = _edited(llama_dir, tmp_path)
    tensors = {k: np.array(v) for k, v in read_hf_weights(d).items()}
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(d / "model.safetensors"), metadata={"format": "pt"})
    _fails(["from-hf", d, tmp_path / "out"], "lacks tensor model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _fails(["from-hf", d, tmp_path / "out"], "model.layers.0.self_attn.k_proj.weight", "(16, 64)", "(32, 64)")
    (d / "model.safetensors").unlink()
    _fails(["from-hf", d, tmp_path / "out"], "no model.safetensors")
    (d / "tokenizer.json").unlink()
    _fails(["from-hf", d, tmp_path / "out"], "no tokenizer.json")
    _fails(["from-hf", tmp_path / "nowhere", tmp_path / "out"], "no config.json")


def test_bidirectional_model_is_refused(native_tok, tmp_path):
    _mathlm_run(tmp_path / "run", native_tok, "model.causal=false")
    _fails(["to-hf", tmp_path / "run", tmp_path / "hf"], "bidirectional")
    assert not (tmp_path / "hf").exists()
    _fails(["to-hf", tmp_path / "nothing", tmp_path / "hf"], "not a mathlm run")
    _fails(["to-hf", tmp_path / "run", tmp_path / "hf", "--max-shard-size", "big"], "--max-shard-size")


def test_verify_without_torch_says_what_to_install(native_tok, tmp_path, monkeypatch):
    import sys
    _mathlm_run(tmp_path / "run", native_tok)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _fails(["to-hf", tmp_path / "run", tmp_path / "hf", "--verify"], "install mathlm[hf]")


def test_imported_model_fine_tunes_with_init_from(llama_dir, tmp_path):
    from mathlm.train.loop import train
    run_dir = from_hf(llama_dir, tmp_path / "run")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = load_config(run_dir / "config.yaml", [
        "train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.log_every=1", "train.eval_every=0",
        "train.warmup_steps=1", f"data.train=[{data}]", "data.validation=null", "checkpoint.async_save=false"])
    assert cfg.model.init_from == str(run_dir)
    last = train(cfg, tmp_path / "ft", show_progress=False)
    assert last["step"] == 2 and np.isfinite(last["loss"])
    tuned = load_run(tmp_path / "ft")
    assert (tuned.tokenizer.bos_id, tuned.tokenizer.eos_id) == (1, 2)  # roles kept in the workdir


def test_bf16_checkpoint_imports_as_float32(tmp_path):
    ref = _hf_model("llama", tmp_path / "hf")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    assert str(read_hf_weights(tmp_path / "hf")["model.norm.weight"].dtype) == "bfloat16"
    from_hf(tmp_path / "hf", tmp_path / "run")
    got = ckpt.flatten(nnx.to_pure_dict(nnx.state(load_run(tmp_path / "run").model, nnx.Param)))
    want = ref.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    assert got["blocks.1.attn.k.kernel"].dtype == np.float32
    assert np.array_equal(np.asarray(got["blocks.1.attn.k.kernel"]), want)


def test_help_texts():
    for args in ([], ["to-hf"], ["from-hf"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_hub_style_configs_map_as_expected():
    """transformers 4.x config.json spellings (rope_theta / rope_scaling at top level), as published on the Hub."""
    from mathlm.models.hf import config_from_hf
    llama32 = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
               "num_key_value_heads": 8, "num_hidden_layers": 16, "head_dim": 64, "hidden_act": "silu",
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "tie_word_embeddings": True, "vocab_size": 128256, "attention_bias": False, "mlp_bias": False}
    cfg, notes = config_from_hf(llama32)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.d_ff, cfg.vocab_size) == (
        2048, 32, 8, 16, 8192, 128256)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len, cfg.rope_theta) == (
        "llama3", 32.0, 8192, 500000.0)
    assert cfg.tie_embeddings and not cfg.mask_token and not cfg.attention_bias and notes == []
    qwen25 = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2, "num_hidden_layers": 24, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 32768, "use_sliding_window": False,
              "max_window_layers": 21, "tie_word_embeddings": True, "vocab_size": 151936, "rms_norm_eps": 1e-6,
              "hidden_act": "silu", "eos_token_id": 151643}
    cfg, _ = config_from_hf(qwen25)
    assert cfg.attention_bias and cfg.head_dim == 64 and cfg.rope_scaling is None and cfg.norm_eps == 1e-6
    mistral = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_key_value_heads": 8, "num_hidden_layers": 32, "max_position_embeddings": 32768,
               "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000, "hidden_act": "silu",
               "eos_token_id": [2, 32000]}
    cfg, notes = config_from_hf(mistral)
    assert cfg.max_seq_len == 32768 and any("sliding_window=4096" in n for n in notes)
    assert any("eos_token_id" in n for n in notes)


def test_to_hf_refuses_a_non_empty_folder_and_overwrite_replaces_it(native_tok, tmp_path):
    _mathlm_run(tmp_path / "run", native_tok)
    out = tmp_path / "hf"
    assert runner.invoke(app, ["to-hf", str(tmp_path / "run"), str(out)]).exit_code == 0
    (out / "stray.bin").write_text("left by hand")
    again = runner.invoke(app, ["to-hf", str(tmp_path / "run"), str(out)])
    assert again.exit_code != 0 and "is not empty" in again.output and (out / "stray.bin").exists()
    assert runner.invoke(app, ["to-hf", str(tmp_path / "run"), str(out), "--overwrite"]).exit_code == 0
    assert not (out / "stray.bin").exists() and (out / "config.json").is_file()
