"""`mathlm w2s` end to end: the smoke config through every step (as the README runs it, in a fresh process with
one CPU device), resuming, invalidation by a changed config, split-2 labels never reaching a training file,
byte-identical resumed generation, and one-line errors for bad input."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from mathlm.train.w2s import pipeline
from mathlm.train.w2s.config import load

ROOT = pathlib.Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "w2s-synth-smoke.yaml"


def w2s(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's laptop
    return subprocess.run([sys.executable, "-m", "mathlm.cli.main", "w2s", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    wd = tmp_path_factory.mktemp("w2s") / "smoke"
    res = w2s("run", SMOKE, "--workdir", wd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return wd


def test_smoke_runs_every_step_and_writes_the_interface(smoke):
    for r in (1, 2):
        rd = smoke / f"round{r}"
        gen = _lines(rd / "weak_gen.jsonl")
        assert gen and set(gen[0]) == {"id", "question", "response", "answer"}
        assert [g["id"] for g in gen] == sorted(g["id"] for g in gen)
        kept = _lines(rd / "kept_weak.jsonl")
        assert len(_lines(rd / "kept_hybrid.jsonl")) == 2 * len(kept) and set(kept[0]) == {"id", "prompt", "response"}
        stats = json.loads((rd / "stats.json").read_text())
        assert stats["kept"] == len(kept) and "kept_label_accuracy" in stats
        for v in ("weak", "icl", "hybrid"):
            assert (rd / "models" / v / "checkpoints").is_dir()
    samples = _lines(smoke / "stage2" / "samples.jsonl")
    n_questions = len(_lines(smoke / "data" / "split2.jsonl"))
    assert len(samples) == 4 * n_questions and set(samples[0]) == {"id", "sample", "response", "answer"}
    pairs = _lines(smoke / "stage2" / "pairs.jsonl")
    assert pairs and set(pairs[0]) == {"id", "prompt", "chosen", "rejected", "branch"}
    for m in ("dpo", "orpo"):
        rows = _lines(smoke / "stage2" / "models" / m / "metrics.jsonl")
        assert any("loss" in r for r in rows)
    dpo = json.loads((smoke / "done" / "stage2__dpo.json").read_text())
    assert abs(dpo["summary"]["step0_loss"] - 0.6931471805599453) < 1e-4  # policy = reference at step 0
    results = json.loads((smoke / "results.json").read_text())
    for name in ("weak", "strong", "weak_icl", "naive", "ceiling", "round1_hybrid", "round2_hybrid", "dpo", "orpo"):
        assert 0 <= results["accuracy"][name] <= 1
    assert set(results["pass@2"]) == {"round2_hybrid", "dpo", "orpo", "ceiling"}
    assert {"weak_label_accuracy", "kept_label_accuracy", "pgr", "pairs", "rounds"} <= set(results)
    assert (smoke / "results.png").is_file()
    status = w2s("status", smoke)
    assert status.returncode == 0 and "39 of 39 units done" in status.stdout, status.stdout
    again = w2s("run", SMOKE, "--workdir", smoke)
    assert again.returncode == 0 and "ran 0," in again.stdout, again.stdout


def test_a_changed_setting_redoes_that_step_and_everything_after(smoke, tmp_path):
    wd = tmp_path / "copy"
    shutil.copytree(smoke, wd)
    cfg = load(SMOKE)
    changed = load(SMOKE, ["pairs.tau=0.75"])
    units = pipeline.units_of(cfg)
    a, b = pipeline.keys_of(cfg, units), pipeline.keys_of(changed, units)
    order = [u.name for u in units]
    first = order.index("stage2/pairs")
    assert all(a[n] == b[n] for n in order[:first])
    assert all(a[n] != b[n] for n in order[first:] if n.startswith(("stage2/", "report")) or "dpo" in n or "orpo" in n)
    res = w2s("run", SMOKE, "pairs.tau=0.75", "--workdir", wd, "--to", "pairs")
    assert res.returncode == 0 and "ran 1," in res.stdout, res.stdout + res.stderr
    status = {line.split()[1]: line.split()[2] for line in w2s("status", wd).stdout.splitlines()[1:-1]}
    assert status["stage2/sample"] == "done" and status["stage2/pairs"] == "done", status
    assert status["stage2/dpo"] == "stale" and status["report"] == "stale", status


def test_split2_labels_never_reach_a_training_file(smoke, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("split1", "test"):
        shutil.copy(smoke / "data" / f"{name}.jsonl", data / f"{name}.jsonl")
    with open(data / "split2.jsonl", "w") as f:
        for rec in _lines(smoke / "data" / "split2.jsonl"):
            f.write(json.dumps({"id": rec["id"], "question": rec["question"]}) + "\n")
    wd = tmp_path / "no_labels"
    args = ["data.source=files", f"data.split1={data / 'split1.jsonl'}", f"data.split2={data / 'split2.jsonl'}",
            f"data.test={data / 'test.jsonl'}", f"weak.run={smoke / 'models' / 'weak'}", "weak.pretrain=null",
            "weak.sft=null", f"strong.run={smoke / 'models' / 'strong'}", "strong.pretrain=null"]
    res = w2s("run", SMOKE, *args, "stage1.rounds=1", "--workdir", wd, "--to", "filter")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for rel in ["demos.json", "round1/weak_gen.jsonl", "round1/icl_gen.jsonl", "round1/kept_weak.jsonl",
                "round1/kept_icl.jsonl", "round1/kept_hybrid.jsonl"]:
        assert (wd / rel).read_bytes() == (smoke / rel).read_bytes(), rel
    stats = json.loads((wd / "round1" / "stats.json").read_text())
    assert "kept_label_accuracy" not in stats  # no gold, no analysis columns
    # bad input on this workdir: more demonstrations than answered questions
    res = w2s("icl-gen", SMOKE, *args, "stage1.rounds=1", "demos.k=100000", "--workdir", wd)
    last = res.stderr.strip().splitlines()[-1]  # after the step's own log lines
    assert res.returncode == 2 and last.startswith("error: demos.k=100000 is more than"), res.stderr


def test_resumed_generation_is_byte_identical(smoke, tmp_path):
    from mathlm.models.generate import Sampling
    from mathlm.train.eval.inference import load_engine
    from mathlm.train.w2s import generation
    engine = load_engine(str(smoke / "stage2" / "models" / "m_plus"))
    qs = _lines(smoke / "data" / "split2.jsonl")[:40]
    items = [generation.Item(q["id"], f"Question: {q['question']}\nAnswer:", s, (("sample", s),))
             for s in range(2) for q in qs]
    kw = dict(key="k", task="synth", stop=["Question", "Answer"], batch_size=16, log=lambda m: None)
    sampling = Sampling(24, temperature=1.0)
    whole = generation.generate(engine, items, sampling, tmp_path / "a.jsonl", **kw)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(engine, items, sampling, tmp_path / "b.jsonl", stop_after_batches=2, **kw)
    assert (tmp_path / "b.jsonl.partial").is_file() and not (tmp_path / "b.jsonl").exists()
    resumed = generation.generate(engine, items, sampling, tmp_path / "b.jsonl", **kw)
    assert resumed == whole and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert len({r["response"] for r in whole}) > 1  # really sampled


def test_sigterm_during_a_generation_pass_exits_0_and_the_rerun_finishes_it_byte_identically(smoke, tmp_path):
    """A pod preempting `mathlm w2s` mid-sampling: exit 0 with the finished batches kept, the step not recorded as
    done, and the same command resumes the pass to the file an uninterrupted run wrote. (Before, the default
    handler ended the process with exit 143.)"""
    import signal
    wd = tmp_path / "w"
    shutil.copytree(smoke, wd)
    (wd / "stage2" / "samples.jsonl").unlink()
    (wd / "done" / "stage2__sample.json").unlink()
    partial = wd / "stage2" / "samples.jsonl.partial"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "mathlm.cli.main", "w2s", "sample", str(SMOKE), "--workdir",
                             str(wd)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (partial.is_file() and len(partial.read_text().splitlines()) >= 2):
        time.sleep(0.01)  # header + one finished batch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped in" in out and "Traceback" not in err, out + err
    kept = len(partial.read_text().splitlines()) - 1
    assert 1 <= kept < 8 and not (wd / "stage2" / "samples.jsonl").exists()  # 384 samples in batches of 48
    assert not (wd / "done" / "stage2__sample.json").exists()
    res = w2s("sample", SMOKE, "--workdir", wd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming samples.jsonl: {kept} of 8 batches already done" in res.stdout + res.stderr
    assert (wd / "stage2" / "samples.jsonl").read_bytes() == (smoke / "stage2" / "samples.jsonl").read_bytes()
    assert (wd / "done" / "stage2__sample.json").is_file() and not partial.exists()


@pytest.mark.parametrize("override,message", [
    ("pairs.tau=0.9", "need 0 < tau <= tau_flip <= 1"),
    ("stage2.n=0", "stage2.n must be >= 1"),
    ("stage1.rounds=0", "stage1.rounds must be >= 1"),
    ("weak.run=/nonexistent/run", "/nonexistent/run: not a mathlm run"),
])
def test_bad_settings_are_one_line_errors(tmp_path, override, message):
    extra = ["weak.pretrain=null", "weak.sft=null"] if override.startswith("weak.run") else []
    res = w2s("run", SMOKE, override, *extra, "--workdir", tmp_path / "w", "--from", "weak-gen")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert message in res.stderr


def test_a_split2_record_without_a_question_is_one_line(tmp_path):
    bad = tmp_path / "split2.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "no question here"}) + "\n")
    good = tmp_path / "other.jsonl"
    good.write_text(json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"}) + "\n")
    res = w2s("prepare", SMOKE, "data.source=files", f"data.split1={good}", f"data.split2={bad}",
              f"data.test={good}", "task=gsm8k", "strong.run=x", "strong.pretrain=null", "weak.run=x",
              "weak.pretrain=null", "weak.sft=null", "--workdir", tmp_path / "w")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith("error: ") and "needs a question" in last, res.stderr


def test_a_preempted_training_run_stops_the_pipeline_unrecorded(tmp_path, monkeypatch):
    """SIGTERM inside a training unit: train() saves and returns `preempted`; the pipeline must stop there (the
    same command resumes), never record the half-trained model as done."""
    import mathlm.train.loop as loop
    monkeypatch.setattr(loop, "train", lambda cfg, wd, show_progress=False: {"preempted": True, "step": 3})
    cfg = load(SMOKE)
    result = pipeline.run(cfg, tmp_path / "w", log=lambda m: None)
    assert result == {"prepare/data": "ran", "prepare/strong": "stopped"}
    assert not (tmp_path / "w" / "done" / "prepare__strong.json").exists()
    assert (tmp_path / "w" / "done" / "prepare__data.json").is_file()


def test_dry_run_compiles_the_selected_programs_and_names_the_unknown():
    from mathlm.train.config import ConfigError
    from mathlm.train.w2s.dry_run import dry_run
    cfg = load(SMOKE, ["mesh.fsdp=8", "po.train.batch_size=8"])  # the paper configs' mesh, on 8 fake devices
    reports = dict(dry_run(cfg, only=["weak_sft", "strong_dpo_lora"]))
    assert list(reports) == ["weak_sft", "strong_dpo_lora"]
    assert all(r["mesh"]["fsdp"] == 8 for r in reports.values())
    weak, dpo = reports["weak_sft"], reports["strong_dpo_lora"]
    assert weak["params_trainable"] == weak["params"]  # full fine-tuning
    assert 0 < dpo["params_trainable"] < dpo["params"] / 5  # LoRA adapters only
    assert dpo["bytes_step_temp_per_device"] > 0 and dpo["compile_seconds"] > 0
    with pytest.raises(ConfigError, match="unknown program.*strong_sft_lora"):
        dict(dry_run(cfg, only=["nope"]))
