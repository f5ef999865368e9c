"""Multi-host SPMD: two local processes joined by jax.distributed (CPU collectives) == one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import HERE, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(corpus, tmp_path):
    overrides = tiny_overrides(corpus, "train.steps=5", "mesh.distributed=auto")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    single = subprocess.run([sys.executable, str(HERE / "_run.py"), str(tmp_path / "one"), str(tmp_path / "one.json"),
                             *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = []
    for pid in range(2):
        penv = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "_run.py"), str(tmp_path / "two"), str(tmp_path / f"two{pid}.json"),
             *overrides], env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    one = json.loads((tmp_path / "one.json").read_text())
    two = [json.loads((tmp_path / f"two{i}.json").read_text()) for i in range(2)]
    assert two[0]["devices"] == 2 and two[1]["process"] == 1
    assert len(one["losses"]) == 5
    np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=1e-5)
    # Each process read only its own rows of every global batch: disjoint halves of what one process read.
    a, b = two[0]["windows"], two[1]["windows"]
    assert a and b and not (set(a) & set(b))
    trained = 5 * 8  # windows in the 5 global batches of 8
    assert set(a[: trained // 2]) | set(b[: trained // 2]) == set(one["windows"][:trained])
