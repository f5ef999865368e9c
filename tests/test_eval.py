"""`mathlm eval`: metrics from grades, output files, perplexity against a direct computation, bad input."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from mathlm.cli.main import app
from mathlm.train.eval.evaluate import EvalRequest, compute_metrics
from mathlm.train.eval.perplexity import rolling_windows

GSM8K_LINES = [  # GSM8K test set, MIT (c) 2021 OpenAI (first two records, answers shortened to their last line)
    {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                 "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
                 "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does "
                 "it take?", "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\n#### 3"},
]


def _grade(extracted, correct, other_correct=None):
    return {"extracted": extracted, "correct": correct,
            "correct_by": {"strict-match": correct, "flexible-extract": correct if other_correct is None
                           else other_correct}}


def test_compute_metrics_from_grades():
    graded = [
        [_grade("5", True), _grade("7", False), _grade("5", True), _grade(None, False)],
        [_grade("1", False), _grade("1", False), _grade("2", True), _grade("3", False, True)],
    ]
    m = compute_metrics("gsm8k", graded, (1, 2, 4), seed=0)
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["accuracy_by_extractor"] == {"strict-match": pytest.approx(3 / 8),
                                          "flexible-extract": pytest.approx(4 / 8)}
    # pass@k: problem 1 has c=2 of n=4, problem 2 c=1 of 4 (Chen et al. 1 - C(n-c,k)/C(n,k)).
    exact = lambda c, k: 1 - math.comb(4 - c, k) / math.comb(4, k)
    for k in (1, 2, 4):
        assert m[f"pass@{k}"] == pytest.approx((exact(2, k) + exact(1, k)) / 2, abs=1e-12)
    # maj@4: problem 1 votes 5 (x2) over 7 -> right; problem 2 votes 1 (x2) -> wrong.
    assert m["maj@4"] == pytest.approx(0.5)


def test_default_ks_are_powers_of_two_up_to_the_samples():
    assert EvalRequest("synth", samples=1).resolved_ks() == (1,)
    assert EvalRequest("synth", samples=8, temperature=1).resolved_ks() == (1, 2, 4, 8)
    assert EvalRequest("synth", samples=6, temperature=1).resolved_ks() == (1, 2, 4, 6)


def test_rolling_windows_score_every_token_once_with_full_context():
    tokens = list(range(10, 33))  # 23 tokens, windows of 8
    windows = rolling_windows(tokens, prefix=1, length=8)
    scored = []
    for inputs, targets, n in windows:
        assert len(inputs) == len(targets) <= 8
        assert inputs[1:] == targets[:-1]  # next-token alignment
        scored += targets[len(targets) - n:]
    assert scored == tokens
    assert windows[0][0][0] == 1 and len(windows[-1][0]) == 8  # the last window still sees 8 tokens


def test_eval_synth_writes_summary_samples_and_plot(tiny_run, tmp_path):
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["eval", str(tiny_run), "--task", "synth", "--limit", "6", "--samples", "4",
                                 "-t", "1.0", "-n", "16", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "synth" and summary["n"] == 6 and summary["settings"]["samples"] == 4
    for key in ("accuracy", "pass@1", "pass@2", "pass@4", "maj@1", "maj@4"):
        assert 0 <= summary["metrics"][key] <= 1
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and {x["sample"] for x in lines} == {0, 1, 2, 3}
    for x in lines:
        assert set(x) >= {"id", "prompt", "completion", "extracted", "reference", "correct"}
        assert x["prompt"].startswith("Question: ") and x["prompt"].endswith("\nAnswer:")
    assert summary["metrics"]["accuracy"] == pytest.approx(sum(x["correct"] for x in lines) / 24)
    assert (out / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "synth accuracy:" in r.stdout


def test_eval_gsm8k_file_and_rescoring(tiny_run, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in GSM8K_LINES))
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["eval", str(tiny_run), "--task", "gsm8k", "--data", str(data), "-n", "8",
                                 "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["reference"] for x in lines] == ["18", "3"]  # from the #### line, not the <<>> notes
    # Re-grade hand-written completions: right, wrong, and right only for the flexible extractor.
    saved = tmp_path / "saved.jsonl"
    saved.write_text("".join(json.dumps({**rec, "completion": c}) + "\n" for rec, c in
                             zip(GSM8K_LINES * 2, ["so\n#### 18", "#### 4", "it is 18", "#### 3.00"])))
    r = CliRunner().invoke(app, ["eval", "score", str(saved), "--task", "gsm8k", "--out", str(tmp_path / "s.jsonl")])
    assert r.exit_code == 0, r.output
    assert "gsm8k accuracy: 50.00% (2/4)" in r.stdout
    scored = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in scored] == [True, False, False, True]
    assert scored[2]["extracted"] is None


def test_eval_perplexity_matches_a_direct_forward(tiny_run, tmp_path):
    from mathlm.train.runs import load_run
    texts = ["Question: what is 7 + 5?\nAnswer: 12", "A longer document. " * 30]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ppl"
    r = CliRunner().invoke(app, ["eval", str(tiny_run), "--task", "perplexity", "--data", str(data),
                                 "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "summary.json").read_text())["metrics"]
    run = load_run(tiny_run)
    tok, length = run.tokenizer, run.cfg.model.max_seq_len
    nll, n_tokens = 0.0, 0
    for t in texts:
        ids = tok.encode(t)
        n_tokens += len(ids)
        seq = [tok.bos_id] + ids
        for inputs, targets, n in rolling_windows(ids, tok.bos_id, length):
            logp = jax.nn.log_softmax(run.model(jnp.asarray([inputs]))[0], -1)
            nll -= float(sum(logp[i, targets[i]] for i in range(len(targets) - n, len(targets))))
        assert len(seq) > length or t == texts[0]  # the second document needs several windows
    n_bytes = sum(len(t.encode()) for t in texts)
    assert m["tokens"] == n_tokens and m["bytes"] == n_bytes
    np.testing.assert_allclose(m["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(m["token_perplexity"], math.exp(nll / n_tokens), rtol=1e-5)
    np.testing.assert_allclose(m["bits_per_byte"], nll / n_bytes / math.log(2), rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--task", "gsm8k"], "needs --data"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "synth", "--samples", "2"], "needs --temperature > 0"),
    (["--task", "synth", "--samples", "2", "-t", "1", "--k", "4"], "pass@4 needs"),
    (["--task", "synth", "--shots", "3"], "no default prompt style for 3-shot synth"),
    (["--task", "perplexity"], "needs --data"),
])
def test_eval_bad_input_is_one_line(tiny_run, args, message):
    r = CliRunner().invoke(app, ["eval", str(tiny_run), *args, "--no-progress"])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_eval_checks_its_arguments_before_loading_a_model(tmp_path):
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "no-run"), "--task", "synth", "--samples", "4", "-t", "1",
                                 "--k", "8", "--no-progress"])
    assert r.exit_code == 2 and "pass@8 needs" in r.output, r.output


def test_eval_task_file_with_missing_field_names_field_and_line(tiny_run, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GSM8K_LINES[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    r = CliRunner().invoke(app, ["eval", str(tiny_run), "--task", "gsm8k", "--data", str(data), "--no-progress"])
    assert r.exit_code == 2 and "answer" in r.output and f"{data}:2" in r.output, r.output


def test_eval_never_replaces_an_evaluation_silently(tiny_run, tmp_path):
    """`--limit 50` went into RUN/eval/TASK and replaced training's full evaluation there. Settings away from the
    defaults get their own folder, and an existing evaluation is refused without --overwrite."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    full = run / "eval" / "synth" / "summary.json"
    full.parent.mkdir(parents=True)
    full.write_text('{"n": 1057}')  # as training's evaluation left it
    args = ["eval", str(run), "--task", "synth", "--limit", "3", "-n", "4", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert full.read_text() == '{"n": 1057}'
    mine = run / "eval" / "synth" / "limit3-n4" / "summary.json"
    assert json.loads(mine.read_text())["n"] == 3
    before = mine.stat().st_mtime_ns
    r = CliRunner().invoke(app, args)  # the same again: refused in one line, nothing touched
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "already holds an evaluation" in r.output, r.output
    assert "--overwrite" in r.output and mine.stat().st_mtime_ns == before
    r = CliRunner().invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0 and mine.stat().st_mtime_ns != before, r.output
