"""The run-folder path layer (train/paths.py, etils.epath) on local paths and on an in-process fake GCS."""
import json

import fake_gcs
import pytest

from mathlm.train import paths, verify
from mathlm.train.metrics import RunLogger


@pytest.fixture
def gcs():
    return fake_gcs.install()


def _rows(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_metrics_log_every_step_once_across_a_resume(where, tmp_path, gcs):
    workdir = paths.run_path(tmp_path / "run" if where == "local" else "gs://bucket/run")
    workdir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(workdir, 10, show_progress=False)
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    log = RunLogger(workdir, 10, start_step=3, show_progress=False)  # resumed from checkpoint 3
    for step in range(4, 11):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    assert _rows(workdir / "metrics.jsonl") == list(range(1, 11))
    if where == "gcs":  # written through the fake store, as whole objects (GCS has no append)
        assert "/bucket/run/metrics.jsonl" in gcs.store and not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_damaged_checkpoint_is_moved_aside_whole(where, tmp_path, gcs):
    root = paths.run_path(tmp_path if where == "local" else "gs://bucket/run")
    step = root / "checkpoints" / "40"
    for name, text in (("params/a", "1"), ("params/b/c", "2"), ("meta/metadata", "{}")):
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_text(text)
    dest = verify.move_aside(root / "checkpoints", 40)
    assert dest == root / "checkpoints-damaged" / "40" and not step.exists()
    assert (dest / "params" / "b" / "c").read_text() == "2" and (dest / "meta" / "metadata").read_text() == "{}"
    (step / "x").parent.mkdir(parents=True, exist_ok=True)
    (step / "x").write_text("again")
    assert verify.move_aside(root / "checkpoints", 40).name == "40.1"  # an earlier one is never replaced


def test_the_fake_store_refuses_appends_as_gcs_does(gcs):
    p = paths.run_path("gs://bucket/x.txt")
    p.write_text("a")
    with pytest.raises(OSError, match="cannot be appended"):
        p.open("a")


def test_a_remote_workdir_is_refused_in_one_line_with_nothing_written(tmp_path, monkeypatch):
    import subprocess
    import sys
    monkeypatch.chdir(tmp_path)
    root = __import__("pathlib").Path(__file__).parent.parent
    res = subprocess.run([sys.executable, "-m", "mathlm.cli.main", "train", str(root / "configs/math-tiny.yaml"),
                          "--workdir", "gs://bucket/run"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "remote run folders are not supported yet" in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # no local "gs:" folder
