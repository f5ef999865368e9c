"""SIGTERM wherever it lands: coordinated across two jax.distributed processes, during startup, after the last step.

Bound: after the SIGTERM, both processes have saved the same step and exited 0 within STOP_BOUND_S (each step
here takes milliseconds; the bound covers the save and jax.distributed's shutdown on a slow VM).
"""
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_overrides

STOP_BOUND_S = 60
STEPS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return {**env, **extra}


def _cli(workdir, overrides) -> list[str]:
    return [sys.executable, "-m", "mathlm.cli.main", "train", "configs/math-tiny.yaml", "--workdir", str(workdir),
            "--no-progress", *overrides]


def _start_pair(workdir, overrides) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(_cli(workdir, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(pid)))
            for pid in range(2)]


def _finish(procs, timeout) -> list[str]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, (p.returncode, err[-3000:])
    return [out + err for out, err in outs]


def _logged(workdir) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _last_step(workdir) -> int:
    return max(_logged(workdir), default=0)


def _checksums(workdir, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["checksums"]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_everywhere_and_resumes_bit_exactly(corpus, tmp_path):
    overrides = tiny_overrides(corpus, f"train.steps={STEPS}", "mesh.distributed=auto", "checkpoint.keep=10")
    whole = tmp_path / "whole"
    _finish(_start_pair(whole, overrides), timeout=600)
    want = _logged(whole)
    assert sorted(want) == list(range(1, STEPS + 1))

    rng = random.Random(int(time.time()))
    for point, victim in enumerate((1, 0, 1)):  # the non-lead process, the lead one, the non-lead again
        at = rng.randrange(5 + 30 * point, 30 + 30 * point)
        wd = tmp_path / f"cut{point}"
        procs = _start_pair(wd, overrides)
        deadline = time.time() + 300
        while _last_step(wd) < at and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.005)
        assert _last_step(wd) >= at, [p.communicate()[1][-2000:] for p in procs]
        procs[victim].send_signal(15)
        sent = time.time()
        logs = _finish(procs, timeout=STOP_BOUND_S)
        took = time.time() - sent
        saved = sorted(int(c.name) for c in (wd / "checkpoints").iterdir() if c.name.isdigit())
        assert len(saved) == 1 and at <= saved[0] < STEPS, (at, saved, logs[0][-2000:])
        assert f"stopping: saved checkpoint at step {saved[0]}" in logs[0], logs[0][-2000:]
        assert took < STOP_BOUND_S
        assert _last_step(wd) == saved[0]  # the lead logged up to the saved step and no further

        _finish(_start_pair(wd, overrides), timeout=600)  # the rerun resumes and completes
        assert _logged(wd) == want, f"kill point {point} (SIGTERM to process {victim} at step >= {at})"
        assert _checksums(wd, STEPS) == _checksums(whole, STEPS)  # params, optimizer and data state: bit-exact


def _train_cmd(corpus, workdir, *extra):
    return _cli(workdir, tiny_overrides(corpus, "mesh.data=1", *extra))


def test_sigterm_during_startup_exits_0_and_the_rerun_completes(corpus, tmp_path):
    wd = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(corpus, wd, "train.steps=20"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 240
    while not (wd / "train.lock").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the lock is taken once the model is built: restore, data and compilation follow
    proc.send_signal(15)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "stopping:" in out + err and "Traceback" not in err
    assert not (wd / "train.lock").exists()
    rerun = subprocess.run(_train_cmd(corpus, wd, "train.steps=20"), capture_output=True, text=True, env=_env(),
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(_logged(wd)) == list(range(1, 21))


def test_sigterm_after_the_last_step_exits_0_skipping_the_evaluation(corpus, tmp_path):
    wd = tmp_path / "run"
    cmd = _train_cmd(corpus, wd, "train.steps=3", "eval.tasks=[synth]", "eval.max_new_tokens=64")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    for line in proc.stdout:
        if line.startswith("done: step 3"):
            proc.send_signal(15)  # training is over and saved; the evaluation after training is starting
            break
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM after the last checkpoint (step 3)" in err and "Traceback" not in err
    assert not (wd / "eval" / "synth").exists()  # no half-written evaluation
    assert (wd / "checkpoints" / "3").is_dir()
