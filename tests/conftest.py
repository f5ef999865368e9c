"""Test setup: 8 fake CPU devices (set before jax is imported) and a tiny prepared corpus shared by the session."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU MFU peak is measured once per machine and cached (train/runtime.py): here once per test session.
os.environ.setdefault("MATHLM_CACHE", __import__("tempfile").mkdtemp(prefix="mathlm-cache-"))

import json
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
TINY = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=8", "train.log_every=1",
    "train.eval_every=0", "train.warmup_steps=2", "train.lr=1e-2", "checkpoint.async_save=false",
    "checkpoint.every_steps=1000", "eval.tasks=[]",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Synthetic corpus -> tokenizer -> token stores, built once through the public functions."""
    from mathlm.data import synth
    from mathlm.data.sources import read_examples
    from mathlm.data.store import write_store
    from mathlm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    paths = synth.write_jsonl(synth.generate(synth.SynthConfig(n=800, seed=0)), root / "jsonl")
    tok = train_tokenizer((e.text for e in read_examples([str(paths["train"])])), 512)
    tok.save(root / "tokenizer.json")
    for split in ("train", "validation"):
        write_store(str(root / split), read_examples([str(paths[split])]), tok)
    return {"root": root, "jsonl": paths, "tokenizer": root / "tokenizer.json",
            "train": root / "train", "validation": root / "validation"}


@pytest.fixture(scope="session")
def tiny_run(corpus, tmp_path_factory):
    """A run folder holding a random tiny causal model and the corpus tokenizer (no training)."""
    from flax import nnx

    from mathlm.models.transformer import Transformer
    from mathlm.train.config import load_config
    from mathlm.train.runs import save_params_run
    cfg = load_config(None, TINY + ["model.max_seq_len=256", "data.synth_n=400"])
    model = Transformer(cfg.model, nnx.Rngs(0))
    return save_params_run(tmp_path_factory.mktemp("tiny_run") / "run", cfg,
                           nnx.to_pure_dict(nnx.state(model, nnx.Param)), corpus["tokenizer"])


@pytest.fixture(scope="session")
def _gcs_server():
    import gcs_emulator
    server = gcs_emulator.Emulator()
    yield server
    server.stop()


@pytest.fixture
def gcs(_gcs_server):
    """Google Cloud Storage on localhost (tests/gcs_emulator.py): an empty gs://bucket for this test."""
    _gcs_server.reset()
    return _gcs_server


def tiny_overrides(corpus, *extra: str) -> list[str]:
    return TINY + [f"data.train=[{corpus['train']}]", f"data.tokenizer={corpus['tokenizer']}",
                   "data.validation=null", *extra]


def losses(workdir) -> list[float]:
    rows = [json.loads(l) for l in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def run_script(args: list[str], env_extra: dict | None = None, devices: int | None = None, timeout=300):
    """Run tests/_run.py in a fresh interpreter (own XLA device count / jax.distributed settings)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(HERE / "_run.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
