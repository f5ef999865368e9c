"""MFU against a fixed peak: on CPU the matmul peak is measured once per machine and cached (identical runs showed
MFU 50% and 99% when every run measured its own)."""
import json

from mathlm.train import runtime


def test_the_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MATHLM_CACHE", str(tmp_path))
    calls = []

    def fake_measure(dtype, n, reps):
        calls.append((dtype, n, reps))
        return 1.0e11 + len(calls)  # a different figure each time it is measured

    monkeypatch.setattr(runtime, "measured_matmul_peak", fake_measure)
    logged = []
    first = runtime.cached_cpu_peak(logged.append)
    assert first == 1.0e11 + 1 and calls == [("float32", 2048, 20)]
    assert len(logged) == 1 and "cached in" in logged[0] and str(tmp_path) in logged[0]
    for _ in range(3):  # later runs on this machine: the same peak, nothing measured
        assert runtime.cached_cpu_peak(logged.append) == first
    assert len(calls) == 1 and len(logged) == 1
    table = json.loads((tmp_path / "peak_flops.json").read_text())
    (key, entry), = table.items()
    assert "cores" in key and "jax" in key and entry["flops"] == first and entry["measured"]


def test_an_unreadable_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("MATHLM_CACHE", str(tmp_path))
    (tmp_path / "peak_flops.json").write_text("{not json")
    monkeypatch.setattr(runtime, "measured_matmul_peak", lambda *a: 5.0e10)
    assert runtime.cached_cpu_peak() == 5.0e10
    assert list(json.loads((tmp_path / "peak_flops.json").read_text()).values())[0]["flops"] == 5.0e10
