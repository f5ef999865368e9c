"""Verified checkpoints: a damaged newest step is reported in one line, moved aside and the previous one used."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import losses, tiny_overrides
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mathlm.train import verify
from mathlm.train.checkpoint import CheckpointError
from mathlm.train.config import load_config
from mathlm.train.loop import train


def _train(corpus, wd, steps, *extra, **kw):
    cfg = load_config(None, tiny_overrides(corpus, f"train.steps={steps}", "mesh.data=8",
                                           "checkpoint.every_steps=1", "checkpoint.keep=5", *extra))
    return train(cfg, wd, show_progress=False, **kw)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 4-step run: its losses, and a 3-step run's checkpoints to damage (copied per test)."""
    root = tmp_path_factory.mktemp("ref")
    _train(corpus, root / "whole", 4)
    _train(corpus, root / "three", 3)
    return {"losses": losses(root / "whole"), "three": root / "three"}


def _copy(reference, tmp_path):
    import shutil
    wd = tmp_path / "run"
    shutil.copytree(reference["three"], wd)
    return wd


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero16(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(16)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated params", "zeroed opt bytes", "missing data state"])
def test_a_damaged_newest_checkpoint_falls_back_and_resumes_exactly(corpus, reference, tmp_path, capfd, damage):
    wd = _copy(reference, tmp_path)
    if damage == "truncated params":
        _truncate(_largest_file(wd / "checkpoints" / "3" / "params"))
    elif damage == "zeroed opt bytes":
        _zero16(_largest_file(wd / "checkpoints" / "3" / "opt"))
    else:
        import shutil
        shutil.rmtree(wd / "checkpoints" / "3" / "data")
    capfd.readouterr()
    _train(corpus, wd, 4)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and lines[0].startswith("checkpoint 3 is damaged (") and \
        lines[0].endswith("; falling back to 2"), err
    assert "Traceback" not in err and (wd / "checkpoints-damaged" / "3").is_dir()
    # steps 3 and 4 were trained again from checkpoint 2: the same losses as the uninterrupted run
    np.testing.assert_array_equal(losses(wd), reference["losses"])


def test_no_usable_checkpoint_left_is_one_error(corpus, reference, tmp_path):
    wd = _copy(reference, tmp_path)
    for step in (1, 2, 3):
        _truncate(_largest_file(wd / "checkpoints" / str(step) / "params"))
    with pytest.raises(CheckpointError, match="no usable checkpoint is left .* rerun to start again from step 0"):
        _train(corpus, wd, 4)
    assert sorted(p.name for p in (wd / "checkpoints-damaged").iterdir()) == ["1", "2", "3"]


def test_resume_from_an_earlier_step_moves_later_ones_aside(corpus, reference, tmp_path):
    wd = _copy(reference, tmp_path)
    _train(corpus, wd, 4, resume_from=1)
    assert (wd / "checkpoints-superseded" / "2").is_dir() and (wd / "checkpoints-superseded" / "3").is_dir()
    np.testing.assert_array_equal(losses(wd), reference["losses"])
    with pytest.raises(CheckpointError, match="--resume-from 9: no such checkpoint"):
        _train(corpus, wd, 5, resume_from=9)


def test_the_checksum_is_the_same_on_every_sharding_and_sees_one_changed_value():
    x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
    flat = {"w": x, "b16": x.astype(jnp.bfloat16), "step": jnp.asarray(3, jnp.int32)}
    mesh = jax.make_mesh((8,), ("d",))
    sharded = {**flat, "w": jax.device_put(x, NamedSharding(mesh, P("d")))}
    assert verify.tree_checksum(flat) == verify.tree_checksum(sharded)
    assert verify.tree_checksum({**flat, "w": x.at[5, 3].add(1e-6)}) != verify.tree_checksum(flat)
    assert verify.json_checksum({"a": 1, "b": [2]}) == verify.json_checksum(json.loads('{"b": [2], "a": 1}'))
