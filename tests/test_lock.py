"""One trainer per workdir: train/lock.py and the CLI refusing a second trainer."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_overrides

from mathlm.train.lock import LOCK_NAME, WorkdirLock, WorkdirLocked


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path) as first:
        first.acquire()
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirLocked, match=f"in use by another trainer \\(pid {os.getpid()} on "):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                                  "started": "earlier"}))
    warnings = []
    lock = WorkdirLock(tmp_path)
    lock.acquire(warn=warnings.append)
    assert len(warnings) == 1 and "stale lock" in warnings[0] and "no longer running" in warnings[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_and_an_unreadable_one_are_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "started": "t"}))
    with pytest.raises(WorkdirLocked, match="on elsewhere since t"):
        WorkdirLock(tmp_path).acquire()  # a pid on another host cannot be checked from here
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(WorkdirLocked, match="cannot be read"):
        WorkdirLock(tmp_path).acquire()


def test_two_trainers_on_one_workdir(corpus, tmp_path):
    """The second `mathlm train` exits non-zero with one line naming the first; the first is not disturbed.
    (100,000 steps: the SIGTERM below must land inside the training loop, where it exits 0 after a save.)"""
    wd = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": ""}
    args = [sys.executable, "-m", "mathlm.cli.main", "train", "configs/math-tiny.yaml", "--workdir", str(wd),
            "--no-progress", *tiny_overrides(corpus, "train.steps=100000", "mesh.data=1")]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        def stepping():  # a step is logged: the first trainer is in its loop (compiled, MFU peak known)
            path = wd / "metrics.jsonl"
            return path.exists() and '"loss"' in path.read_text()
        while not stepping() and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert (wd / LOCK_NAME).exists(), first.stderr.read() if first.poll() is not None else "no lock"
        config_before = (wd / "config.yaml").read_text()
        second = subprocess.run(args[:-1] + ["train.seed=7"], env=env, capture_output=True, text=True,
                                timeout=240)
        assert second.returncode != 0
        err = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and "Traceback" not in second.stderr, err
        assert (wd / "config.yaml").read_text() == config_before  # nothing of the second run written
    finally:
        first.terminate()
        _, log = first.communicate(timeout=120)
    assert first.returncode == 0 and not (wd / LOCK_NAME).exists()  # SIGTERM: a clean save, exit 0
    # stderr is a pipe here, as in a pod job's log: one whole plain line per logging interval
    import re
    plain = [line for line in log.splitlines() if line.startswith("step ")]
    assert plain and all(re.fullmatch(r"step \d+/100000  loss [\d.]+  [\d,]+ tok/s  MFU [\d.]+%  "
                                      r"ETA \d+:\d\d:\d\d", line) for line in plain), plain[:3]


def test_a_failed_start_removes_the_folder_it_made_unless_a_token_store_was_finished(tmp_path):
    for finished in (False, True):
        wd = tmp_path / f"new{finished}" / "run"
        with pytest.raises(RuntimeError), WorkdirLock(wd) as lock:
            lock.acquire()
            (wd / "data" / "tokens" / "abc").mkdir(parents=True)
            if finished:  # hours of tokenizing: kept for the rerun (e.g. after the first step ran out of memory)
                (wd / "data" / "tokens" / "abc" / "meta.json").write_text("{}")
            raise RuntimeError("the first step ran out of memory")
        assert wd.exists() == finished and (wd.parent.exists() == finished)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_another_hosts_lock_is_taken_over_once_its_heartbeat_is_stale(where, tmp_path, request, monkeypatch):
    """A pod job restarted on new machines after a hard kill: the old holder's host is gone, its heartbeat old."""
    from mathlm.train import lock as lock_mod
    from mathlm.train.paths import run_path
    workdir = run_path(tmp_path if where == "local" else "gs://bucket/run")
    if where == "gcs":
        request.getfixturevalue("gcs")
    path = workdir / LOCK_NAME
    fresh = {"host": "pod-7", "pid": 1, "started": "t", "heartbeat": time.time() - 60}
    path.write_text(json.dumps(fresh))
    with pytest.raises(WorkdirLocked, match="in use by another trainer \\(pid 1 on pod-7 since t\\)"):
        WorkdirLock(workdir).acquire()
    path.write_text(json.dumps({**fresh, "heartbeat": time.time() - lock_mod.STALE_AFTER - 120}))
    warnings = []
    lock = WorkdirLock(workdir)
    lock.acquire(warn=warnings.append)
    assert len(warnings) == 1 and "stale lock" in warnings[0] and "no heartbeat for 17 min" in warnings[0]
    mine = json.loads(path.read_text())
    assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
    monkeypatch.setattr(lock_mod, "BEAT_EVERY", 0)
    lock.beat()  # a live trainer's lock never goes stale
    assert json.loads(path.read_text())["heartbeat"] > mine["heartbeat"]
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on "):
        WorkdirLock(workdir).acquire()  # a second trainer on the same store is refused
    lock.release()
    assert not path.exists()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_trainers_racing_for_the_lock_cannot_both_take_it(where, tmp_path, request, monkeypatch):
    """The race an exists-check cannot close: both trainers look, see no lock, then write. The create itself must
    refuse the second (O_EXCL; on GCS an upload with ifGenerationMatch=0), and the first's lock must survive."""
    from mathlm.train.paths import run_path
    workdir = run_path(tmp_path if where == "local" else "gs://bucket/race")
    if where == "gcs":
        request.getfixturevalue("gcs")
    other = {"host": "pod-3", "pid": 1, "started": "t", "heartbeat": time.time()}
    (workdir / LOCK_NAME).write_text(json.dumps(other))  # the other trainer won the race a moment ago
    monkeypatch.setattr(type(workdir), "exists", lambda self: False)  # ... after this one had looked
    with pytest.raises(WorkdirLocked, match="in use by another trainer \\(pid 1 on pod-3 since t\\)"):
        WorkdirLock(workdir).acquire()
    monkeypatch.undo()
    assert json.loads((workdir / LOCK_NAME).read_text()) == other  # not overwritten
