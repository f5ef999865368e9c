"""`mathlm generate` and `mathlm eval` on a masked diffusion checkpoint: the model kind is read from the run."""
import json

import pytest
from typer.testing import CliRunner

from mathlm.cli.main import app


@pytest.fixture(scope="module")
def mdm_run(corpus, tmp_path_factory):
    from conftest import TINY
    from flax import nnx

    from mathlm.models.transformer import Transformer
    from mathlm.train.config import load_config
    from mathlm.train.runs import save_params_run
    cfg = load_config(None, TINY + ["model.max_seq_len=256", "model.causal=false", "data.synth_n=400"])
    model = Transformer(cfg.model, nnx.Rngs(0))
    return save_params_run(tmp_path_factory.mktemp("mdm_run") / "run", cfg,
                           nnx.to_pure_dict(nnx.state(model, nnx.Param)), corpus["tokenizer"])


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_on_an_mdm_checkpoint(mdm_run):
    from mathlm.models.diffusion import DiffusionGenerator, DiffusionSampling
    from mathlm.train.inference import encode_prompt
    from mathlm.train.runs import load_run
    r = _run("generate", mdm_run, "--prompt", "Question: 2+3?\nAnswer:", "-n", "12", "--steps", "6")
    assert r.exit_code == 0, r.output
    run = load_run(mdm_run)
    tok = run.tokenizer
    out = DiffusionGenerator(run.model, eos_id=tok.eos_id, pad_id=tok.pad_id)(
        [encode_prompt(tok, "Question: 2+3?\nAnswer:")], DiffusionSampling(12, 6))
    assert r.stdout.rstrip("\n") == tok.decode(out.tokens[0]).rstrip("\n")
    for extra in (["--unmask", "ancestral", "-t", "0.7"], ["--cfg", "1.5"]):
        r = _run("generate", mdm_run, "--prompt", "7 *", "-n", "8", *extra)
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--top-k", "5"], "--top-k is for autoregressive checkpoints"),
    (["--prompt", "x", "--steps", "0"], "steps must be >= 1"),
    (["--prompt", "", "--cfg", "1"], "needs a prompt"),
    (["--prompt", "x", "-n", "400"], "exceeds the model's context"),
    (["--prompt", "x", "--unmask", "random"], "rule must be one of"),
])
def test_generate_mdm_bad_input(mdm_run, args, message):
    r = _run("generate", mdm_run, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_diffusion_options_on_an_autoregressive_checkpoint_are_refused(tiny_run):
    r = _run("generate", tiny_run, "--prompt", "x", "--steps", "4")
    assert r.exit_code == 2 and "--steps is for masked diffusion checkpoints" in r.output, r.output


def test_kv_cache_decoding_refuses_a_bidirectional_model():
    from flax import nnx

    from mathlm.models.generate import Generator
    from mathlm.models.transformer import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=31, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, n_layers=1,
                                    causal=False), nnx.Rngs(0))
    with pytest.raises(ValueError, match="KV-cache decoding needs a causal"):
        Generator(model, eos_id=2)


def test_eval_synth_and_perplexity_on_an_mdm_checkpoint(mdm_run, tmp_path):
    r = _run("eval", mdm_run, "--task", "synth", "--limit", "4", "-n", "16", "--steps", "4", "--out", tmp_path / "s",
             "--no-progress")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["kind"] == "mdm" and summary["settings"]["steps"] == 4 and summary["n"] == 4
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "Question: what is 7 + 5?\nAnswer: 12"}) + "\n")
    r = _run("eval", mdm_run, "--task", "perplexity", "--data", data, "--mc-samples", "8", "--out", tmp_path / "p",
             "--no-progress")
    assert r.exit_code == 0, r.output
    assert "upper bounds" in r.stdout
    m = json.loads((tmp_path / "p" / "summary.json").read_text())["metrics"]
    assert m["nll_is_upper_bound"] and m["token_perplexity"] > 1 and m["nll_standard_error"] > 0
