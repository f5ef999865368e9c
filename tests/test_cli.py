"""The CLI: every bad input gets a one-line error (exit != 0, no traceback); help texts; SIGTERM resume."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from mathlm.cli.main import app

runner = CliRunner()
CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "math-tiny.yaml")


def _fails_with(args, *needles):
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code != 0, out
    assert "Traceback" not in out
    lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, (out, repr(result.exception))
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_help_texts():
    for args in ([], ["train"], ["data"], ["data", "synth"], ["data", "prepare"], ["tokenizer", "train"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_unknown_key_names_close_matches(corpus):
    _fails_with(["train", CONFIG, "model.d_modle=64"], "unknown config key 'model.d_modle'", "model.d_model")
    _fails_with(["train", CONFIG, "trian.steps=3"], "unknown config key 'trian'", "train")


def test_wrong_value_type():
    _fails_with(["train", CONFIG, "train.steps=many"], "train.steps", "integer")
    _fails_with(["train", CONFIG, "train.lr=fast"], "train.lr", "number")


def test_missing_config_file(tmp_path):
    _fails_with(["train", str(tmp_path / "nope.yaml")], "config file not found")


def test_mesh_must_match_device_count(corpus, tmp_path):
    _fails_with(["train", CONFIG, *tiny_overrides(corpus, "mesh.data=3"), "-w", str(tmp_path / "r")],
                "does not match the 8 available devices")


def test_batch_must_divide_over_data_parallel(corpus, tmp_path):
    _fails_with(["train", CONFIG, *tiny_overrides(corpus, "train.batch_size=12"), "-w", str(tmp_path / "r")],
                "train.batch_size=12", "data-parallel size 8")


def test_missing_empty_and_malformed_data(corpus, tmp_path):
    tok = f"data.tokenizer={corpus['tokenizer']}"
    base = ["train", CONFIG, *tiny_overrides(corpus), tok, "-w", str(tmp_path / "r")]
    _fails_with(base + [f"data.train=[{tmp_path / 'missing.jsonl'}]"], "data file not found", "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    _fails_with(base + [f"data.train=[{tmp_path / 'empty.jsonl'}]"], "empty.jsonl", "no examples")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{oops}\n')
    _fails_with(base + [f"data.train=[{tmp_path / 'bad.jsonl'}]"], "bad.jsonl:3", "malformed JSON")


def test_sft_overlong_examples_refused_when_truncation_is_off(corpus, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "q " * 80, "answer": "a"}) + "\n")
    _fails_with(["train", CONFIG, *tiny_overrides(corpus, "data.format=sft", f"data.train=[{long}]",
                                                  "data.truncate=false"), "-w", str(tmp_path / "r")],
                "longer than seq_len")


def test_init_from_with_wrong_shapes(corpus, tmp_path):
    ok = runner.invoke(app, ["train", CONFIG, *tiny_overrides(corpus, "train.steps=1"), "-w", str(tmp_path / "a"),
                             "--no-progress"])
    assert ok.exit_code == 0, ok.output
    _fails_with(["train", CONFIG, *tiny_overrides(corpus, "train.steps=1", "model.d_ff=96",
                                                  f"model.init_from={tmp_path / 'a'}"), "-w", str(tmp_path / "b")],
                "mlp.down.kernel", "(128, 64)", "(96, 64)")
    _fails_with(["train", CONFIG, *tiny_overrides(corpus, f"model.init_from={tmp_path / 'nothing'}"),
                 "-w", str(tmp_path / "c")], "no checkpoint found")


def test_data_synth_prepare_and_tokenizer_commands(tmp_path):
    r = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "corpus"), "--n", "300", "--seed", "1"])
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "corpus").glob("*.jsonl"))
    assert [f.name for f in files] == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    r = runner.invoke(app, ["tokenizer", "train", *map(str, files), "--vocab-size", "300",
                            "--out", str(tmp_path / "tok.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "prepare", str(tmp_path / "corpus" / "*.jsonl"), "--tokenizer",
                            str(tmp_path / "tok.json"), "--out", str(tmp_path / "tokens")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text())["n_docs"] == 300
    _fails_with(["data", "prepare", str(tmp_path / "nothing*.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "t2")], "no files match")


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(corpus, tmp_path):
    wd = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "mathlm.cli.main", "train", CONFIG, *tiny_overrides(corpus), "-w", str(wd),
           "--no-progress"]
    proc = subprocess.Popen(cmd + ["train.steps=100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = int(err.split("saved checkpoint at step ")[1].split(";")[0])
    assert saved >= 3
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == saved
    resumed = subprocess.run(cmd + [f"train.steps={saved + 2}"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {saved}" in resumed.stderr
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 3))  # no step lost, none logged twice


def test_resume_with_an_incompatible_config(corpus, tmp_path):
    ok = runner.invoke(app, ["train", CONFIG, *tiny_overrides(corpus, "train.steps=1"), "-w", str(tmp_path / "a"),
                             "--no-progress"])
    assert ok.exit_code == 0, ok.output
    _fails_with(["train", CONFIG, *tiny_overrides(corpus, "train.steps=2", "model.d_ff=96"),
                 "-w", str(tmp_path / "a")], "does not fit this config")


def test_diffusion_run_summary_says_its_eval_is_an_upper_bound(corpus, tmp_path):
    args = ["train", CONFIG, *tiny_overrides(corpus, "train.steps=2", "model.causal=false", "model.mask_token=true",
                                             f"data.validation=[{corpus['validation']}]", "train.eval_every=2"),
            "-w", str(tmp_path / "mdm"), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    done = [l for l in result.output.splitlines() if l.startswith("done:")]
    assert len(done) == 1 and "eval/loss" in done[0] and "ELBO, upper bounds" in done[0], result.output


def test_inputs_once_accepted_silently_are_refused(tiny_run, tmp_path):
    """Issue 16's three silent acceptances: an empty prompt (autoregressive models; a diffusion model samples
    unconditionally from one), zero synthetic problems, a non-empty export folder."""
    _fails_with(["generate", str(tiny_run), "--prompt", ""], "--prompt is empty")
    _fails_with(["generate", str(tiny_run), "--prompt", "2 + 2 =", "--prompt", " "], "--prompt is empty")
    _fails_with(["data", "synth", "--out", str(tmp_path / "s"), "--n", "0"], "--n must be >= 1")
    assert not (tmp_path / "s").exists()
    full = tmp_path / "hf"
    full.mkdir()
    (full / "stray.bin").write_text("from an earlier export")
    _fails_with(["convert", "to-hf", str(tmp_path / "run"), str(full)], "is not empty", "--overwrite")
    assert (full / "stray.bin").read_text() == "from an earlier export"  # nothing removed without --overwrite


def test_the_entry_point_prints_help_and_survives_a_closed_pipe():
    """`mathlm` is `mathlm.cli.main:main`: help with no arguments (exit 0); `mathlm --help | head -1` ends without
    a traceback (the matching of click's exceptions must not itself fail)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    alone = subprocess.run([sys.executable, "-m", "mathlm.cli.main", "train"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert alone.returncode == 0 and "Usage" in alone.stdout and alone.stderr == ""
    proc = subprocess.Popen([sys.executable, "-m", "mathlm.cli.main", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, bufsize=0)
    proc.stdout.read(10)
    proc.stdout.close()  # as `head` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err, err
