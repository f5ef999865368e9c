"""`--workdir gs://bucket/run`: a whole run in a bucket (GCS on localhost, the `gcs` fixture), through the same
clients a pod uses (gcsfs behind etils.epath; tensorstore's gcs driver for arrays). Nothing is written locally."""
import json
import os
import subprocess
import sys

import pytest
from conftest import HERE, TINY

from mathlm.train.config import load_config
from mathlm.train.loop import train
from mathlm.train.paths import run_path

# embeddings and block 0 frozen: their record (written once under <run>/frozen/, hashed on every resume) too
STEPS = ["train.steps=6", "checkpoint.every_steps=3", "train.eval_every=3", "data.synth_n=400",
         r"train.trainable=[blocks/1/, final_norm, lm_head]"]


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(x) for x in run_path(workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_run_in_a_bucket_resumes_falls_back_and_evaluates_like_a_local_one(gcs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(HERE.parent / "configs/math-tiny.yaml", TINY + STEPS)
    train(cfg, tmp_path / "local", show_progress=False)  # the reference: uninterrupted, on disk
    want = _losses(tmp_path / "local")

    remote = run_path("gs://bucket/run")
    train(cfg, remote, show_progress=False, stop_after=3)  # preempted after the first checkpoint
    assert gcs.objects("run/checkpoints/3/params") and not gcs.objects("run/checkpoints/6")
    train(cfg, remote, show_progress=False)
    assert _losses(remote) == want  # bit-exact across the resume
    assert sorted(os.listdir(tmp_path)) == ["local"]  # nothing local (no "gs:" folder either)
    names = gcs.objects("run")
    for name in ("run/config.yaml", "run/tokenizer.json", "run/checkpoints/6/commit_success.txt",
                 "run/frozen/model/0/params/commit_success.txt"):
        assert name in names, name
    assert "run/train.lock" not in names  # released
    record = json.loads(run_path("gs://bucket/run/checkpoints/6/meta/metadata").read_text())["frozen"]["model"]
    assert record["source"] == "frozen/model" and record["in_run"]  # relative: the bucket folder can move
    assert any(n.startswith("run/data/tokens/") and n.endswith("/meta.json") for n in names)

    # A damaged newest checkpoint in the bucket: reported, moved aside (copied, then deleted), the previous used.
    chunks = [n for n in gcs.objects("run/checkpoints/6/params") if "/d/" in n]
    run_path(f"gs://bucket/{chunks[0]}").write_bytes(b"\0" * 16)
    capsys.readouterr()
    train(cfg, remote, show_progress=False)
    out = capsys.readouterr().err
    assert "checkpoint 6 is damaged" in out and "falling back to 3" in out, out
    moved = run_path("gs://bucket/" + chunks[0].replace("run/checkpoints/", "run/checkpoints-damaged/"))
    assert moved.read_bytes() == b"\0" * 16  # kept, as it was
    assert _losses(remote) == want  # steps 4-6 again, from checkpoint 3
    assert "run/checkpoints/6/commit_success.txt" in gcs.objects("run/checkpoints/6")

    from mathlm.train.eval.evaluate import EvalRequest
    from mathlm.train.eval.run import EvalJob, run_eval
    summary, folder = run_eval(EvalJob("gs://bucket/run", EvalRequest("synth", limit=3, max_new_tokens=8)))
    assert str(folder) == "gs://bucket/run/eval/synth/limit3-n8" and summary["n"] == 3
    assert json.loads((folder / "summary.json").read_text())["n"] == 3
    assert len((folder / "samples.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_mathlm_train_on_a_gs_workdir_runs_its_evaluation_there(gcs, tmp_path):
    """The command as a pod runs it: a typed --workdir (pathlib would fold gs:// to gs:/), the evaluation after
    training written to the bucket, exit 0, no traceback."""
    cmd = [sys.executable, "-m", "mathlm.cli.main", "train", str(HERE.parent / "configs/math-tiny.yaml"),
           *[t for t in TINY if not t.startswith("eval.tasks")], "train.steps=2", "data.synth_n=400",
           "eval.tasks=[synth]", "eval.limit=2", "eval.max_new_tokens=8", "--workdir", "gs://bucket/cli"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, **gcs.env()})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "done: step 2 in gs://bucket/cli" in res.stdout, res.stdout
    assert "-> gs://bucket/cli/eval/synth/" in res.stdout, res.stdout
    names = gcs.objects("cli")
    assert any(n.startswith("cli/eval/synth/") and n.endswith("/summary.json") for n in names), names
    assert list(tmp_path.iterdir()) == []
