"""The run-folder path layer (train/paths.py, etils.epath) on local paths and on GCS on localhost (the `gcs`
fixture: tests/gcs_emulator.py, reached through gcsfs as on a pod)."""
import json

import pytest

from mathlm.train import paths, verify
from mathlm.train.metrics import RunLogger


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
    if where == "gcs":  # written to the bucket, as whole objects (GCS has no append)
        assert "run/metrics.jsonl" in gcs.objects() and not (tmp_path / "run").exists()


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


def test_an_append_through_gcsfs_loses_the_object_so_the_log_rewrites_it_whole(gcs):
    """Why LineLog never appends on a store: gcsfs's mode "a" silently replaces the object with the new bytes."""
    p = paths.run_path("gs://bucket/x.txt")
    p.write_text("a")
    with pytest.warns(UserWarning), p.open("a") as f:
        f.write("b")
    assert p.read_text() == "b"
    log = paths.LineLog(p)
    log.write("c\n")
    assert p.read_text() == "bc\n"  # what was there, kept


def test_a_uri_folded_by_pathlib_is_restored():
    import pathlib
    assert str(paths.run_path(pathlib.Path("gs://bucket/run"))) == "gs://bucket/run"
    assert paths.is_remote("gs:/bucket/run") and not paths.is_remote("hf:gsm8k") and not paths.is_remote("a/b")
