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
    from mathlm.train.eval.inference import encode_prompt
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
    (["--prompt", "x", "--top-k", "0"], "--top-k is for autoregressive checkpoints"),
    (["--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
    (["--prompt", "x", "--cfg", "-1"], "--cfg must be >= 0"),
    (["--prompt", "", "--cfg", "1"], "needs a prompt"),
    (["--prompt", "x", "-n", "400"], "exceeds the model's context"),
    (["--prompt", "x", "--unmask", "random"], "--unmask must be one of"),
])
def test_generate_mdm_bad_input(mdm_run, args, message):
    r = _run("generate", mdm_run, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("option", [["--steps", "4"], ["--steps", "0"], ["--cfg", "0"], ["--unmask", ""]])
def test_diffusion_options_on_an_autoregressive_checkpoint_are_refused(tiny_run, option):
    # Given at all is refused, even a falsy value: the user asked for something an ARM cannot do.
    r = _run("generate", tiny_run, "--prompt", "x", *option)
    assert r.exit_code == 2 and f"{option[0]} is for masked diffusion checkpoints" in r.output, r.output


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


def test_mdm_eval_completions_do_not_depend_on_batch_size(mdm_run, tmp_path):
    """One canvas for the whole set: the default -n 256 is shortened once, to what the context leaves after the
    longest prompt, never per batch (which made a completion depend on its batch neighbours)."""
    from mathlm.train.eval.inference import encode_prompt
    from mathlm.train.runs import load_run
    outs = {}
    for bs in (8, 16):
        r = _run("eval", mdm_run, "--task", "synth", "--limit", "16", "--steps", "8", "--batch-size", bs,
                 "--out", tmp_path / str(bs), "--no-progress")
        assert r.exit_code == 0, r.output
        outs[bs] = [json.loads(line)["completion"] for line in open(tmp_path / str(bs) / "samples.jsonl")]
    assert outs[8] == outs[16]
    summary = json.loads((tmp_path / "8" / "summary.json").read_text())
    prompts = [json.loads(line)["prompt"] for line in open(tmp_path / "8" / "samples.jsonl")]
    tok = load_run(mdm_run).tokenizer
    room = 256 - max(len(encode_prompt(tok, p)) for p in prompts)
    s = summary["settings"]
    assert (s["max_new_tokens"], s["max_new_tokens_requested"], s["steps"]) == (room, 256, 8)
    r = _run("eval", mdm_run, "--task", "synth", "--limit", "2", "-n", "100000", "--steps", "2",
             "--out", tmp_path / "big", "--no-progress")
    assert r.exit_code == 0 and "--max-new-tokens 100000 shortened to" in r.output, r.output
    s = json.loads((tmp_path / "big" / "summary.json").read_text())["settings"]
    assert s["max_new_tokens"] < 256 and s["max_new_tokens_requested"] == 100000


@pytest.mark.parametrize("args, message", [
    (["--cfg", "1"], "--cfg does not apply to --task perplexity"),
    (["--steps", "4"], "--steps does not apply to --task perplexity"),
    (["--unmask", "ancestral"], "--unmask does not apply to --task perplexity"),
    (["--mc-samples", "0"], "--mc-samples must be >= 1"),
])
def test_mdm_perplexity_refuses_options_it_would_ignore(mdm_run, tmp_path, args, message):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "1 + 1 = 2"}) + "\n")
    r = _run("eval", mdm_run, "--task", "perplexity", "--data", data, *args, "--no-progress")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_mc_samples_only_where_it_means_something(mdm_run, tiny_run, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "1 + 1 = 2"}) + "\n")
    r = _run("eval", tiny_run, "--task", "perplexity", "--data", data, "--mc-samples", "8", "--no-progress")
    assert r.exit_code == 2 and "--mc-samples is for masked diffusion checkpoints" in r.output, r.output
    r = _run("eval", mdm_run, "--task", "synth", "--mc-samples", "8", "--no-progress")
    assert r.exit_code == 2 and "--mc-samples applies to --task perplexity only" in r.output, r.output


def test_perplexity_skips_empty_documents_and_one_mc_sample_has_no_standard_error(mdm_run, tiny_run, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "7 + 5 = 12"}) + "\n")
    only = tmp_path / "empty.jsonl"
    only.write_text(json.dumps({"text": ""}) + "\n")
    for run in (mdm_run, tiny_run):
        r = _run("eval", run, "--task", "perplexity", "--data", only, "--no-progress")
        assert r.exit_code == 2 and "every document is empty" in r.output and "Traceback" not in r.output, r.output
        extra = ["--mc-samples", "1"] if run == mdm_run else []
        r = _run("eval", run, "--task", "perplexity", "--data", data, *extra, "--out", tmp_path / "p", "--overwrite",
                 "--no-progress")
        assert r.exit_code == 0, r.output
        m = json.loads((tmp_path / "p" / "summary.json").read_text())["metrics"]
        assert m["documents"] == 1 and m["empty_documents_skipped"] == 1 and m["token_perplexity"] > 1
        if run == mdm_run:
            assert m["nll_standard_error"] is None  # one sample per chunk: no spread to estimate it from
