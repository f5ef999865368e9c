"""Decode-throughput benchmark: mathlm's Generator (what `mathlm generate` runs) vs transformers `generate`.

    python bench/decode_bench.py                         # configs tiny and small, batch 1 and 16, 128 new tokens
    python bench/decode_bench.py --configs tiny --batches 16 --repeats 5
    python bench/decode_bench.py --json out.json
    python bench/decode_bench.py --frameworks mathlm    # mathlm only (e.g. before/after a change, interleaved)

Same weights in both: a randomly initialised mathlm model is written as a run and exported with
`mathlm.train.convert.to_hf`; transformers loads that folder (LlamaForCausalLM, float32, eager attention,
torch threads = os.cpu_count()). Greedy decoding, `--prompt-len` random prompt tokens per row (all rows the same
length, so neither side pads), exactly `--new-tokens` new tokens per row (no EOS: mathlm's eos id is set to -1,
transformers' generation_config.eos_token_id to None). The two outputs are compared token by token.

Timing: the first call is timed separately (for mathlm it compiles the prefill and the decode loop; `compile` =
first call minus the median of the rest); then `--repeats` calls are timed and the median is reported. A call is
prompt -> all new tokens on the host (prefill included, as `mathlm generate` sees it): new tokens/s =
batch * new_tokens / median call time. Each framework x config x batch runs in its own child process (this script
re-invoked with --_worker) so the XLA and torch thread pools never share a process. `busy` = CPU cores used by
other processes during the timed calls (from /proc/stat minus the child's own CPU time); figures with busy > 0.1
were taken on a loaded machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# name: (vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff)
CONFIGS = {
    "tiny": (1024, 256, 4, 4, 2, 704),  # configs/math-tiny.yaml
    "small": (4096, 512, 8, 8, 4, 1408),
}
MARK = "@@BENCH@@"


def _cpu_busy_seconds() -> float:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np
    return np.random.default_rng(seed).integers(3, vocab, (batch, length)).tolist()


def _time_calls(call, repeats: int) -> dict:
    t0 = time.perf_counter()
    first_out = call()
    first = time.perf_counter() - t0
    times = []
    busy0, own0 = _cpu_busy_seconds(), _own_cpu_seconds()
    wall0 = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    busy = max(0.0, (_cpu_busy_seconds() - busy0) - (_own_cpu_seconds() - own0)) / wall
    assert out == first_out, "decoding is not deterministic"
    return {"first_s": first, "times_s": times, "median_s": statistics.median(times), "busy": busy, "tokens": out}


def _worker_mathlm(a) -> dict:
    import jax

    from mathlm.models.generate import Generator, Sampling
    from mathlm.train.runs import load_run
    run = load_run(a.run_dir)
    gen = Generator(run.model, eos_id=-1, pad_id=0)  # eos -1: every row decodes all new tokens
    prompts = _prompts(a.batch, a.prompt_len, run.cfg.model.vocab_size)
    sampling = Sampling(max_new_tokens=a.new_tokens, temperature=0.0)
    res = _time_calls(lambda: gen(prompts, sampling).tokens, a.repeats)
    res["versions"] = f"jax {jax.__version__}"
    return res


def _worker_torch(a) -> dict:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.hf_dir, attn_implementation="eager", **{dtype_kw: torch.float32}).eval()
    model.generation_config.eos_token_id = None  # every row decodes all new tokens
    model.generation_config.pad_token_id = 0
    prompts = torch.tensor(_prompts(a.batch, a.prompt_len, model.config.vocab_size))
    mask = torch.ones_like(prompts)

    def call():
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=a.new_tokens,
                                 min_new_tokens=a.new_tokens, use_cache=True)
        return out[:, a.prompt_len:].tolist()

    res = _time_calls(call, a.repeats)
    res["versions"] = f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers " \
                      f"{transformers.__version__}"
    return res


# ----------------------------------------------------------------------------- parent

def _make_models(name: str, root: str) -> tuple[str, str]:
    """A random mathlm run for config `name` and its Hugging Face export; returns (run_dir, hf_dir)."""
    import dataclasses

    from flax import nnx

    from mathlm.data.tokenizer import train_tokenizer
    from mathlm.models.transformer import Transformer
    from mathlm.train.config import load_config
    from mathlm.train.convert import VERIFY_TEXTS, to_hf
    from mathlm.train.runs import save_params_run
    v, d, layers, h, kv, f = CONFIGS[name]
    cfg = load_config(None, [f"model.vocab_size={v}", f"model.d_model={d}", f"model.n_layers={layers}",
                             f"model.n_heads={h}", f"model.n_kv_heads={kv}", f"model.d_ff={f}",
                             "model.max_seq_len=256", "train.seq_len=256"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_token=False))
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    run_dir, hf_dir = os.path.join(root, f"{name}-run"), os.path.join(root, f"{name}-hf")
    tok_path = os.path.join(root, "tokenizer.json")
    if not os.path.exists(tok_path):  # the bench feeds random ids; a tokenizer is only needed to make a run
        train_tokenizer(iter(VERIFY_TEXTS * 8), 300).save(tok_path)
    save_params_run(run_dir, cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tok_path)
    to_hf(run_dir, hf_dir)
    return run_dir, hf_dir


def _run_child(framework: str, run_dir: str, hf_dir: str, batch: int, a) -> dict:
    cmd = [sys.executable, __file__, "--_worker", framework, "--run-dir", run_dir, "--hf-dir", hf_dir,
           "--batch", str(batch), "--new-tokens", str(a.new_tokens), "--prompt-len", str(a.prompt_len),
           "--repeats", str(a.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def _same_tokens(res: dict, n: int) -> float | None:
    """The share of new tokens on which the two frameworks agree; None when only one ran."""
    if len(res) < 2:
        return None
    return sum(x == y for r0, r1 in zip(res["mathlm"]["tokens"], res["torch"]["tokens"])
               for x, y in zip(r0, r1)) / n


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frameworks", nargs="+", default=["mathlm", "torch"], choices=["mathlm", "torch"])
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--_worker", choices=["mathlm", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        res = (_worker_mathlm if a._worker == "mathlm" else _worker_torch)(a)
        print(MARK + json.dumps(res))
        return

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in a.configs:
            run_dir, hf_dir = _make_models(name, root)
            for batch in a.batches:
                res = {fw: _run_child(fw, run_dir, hf_dir, batch, a) for fw in a.frameworks}
                same = _same_tokens(res, batch * a.new_tokens)
                for fw, r in res.items():
                    r.update(config=name, batch=batch, framework=fw, same_tokens=same,
                             tokens_per_s=batch * a.new_tokens / r["median_s"],
                             compile_s=r["first_s"] - r["median_s"])
                    rows.append(r)
                    print(f"{name:6s} b{batch:<3d} {fw:7s} first {r['first_s']:7.2f} s  median "
                          f"{r['median_s']:7.3f} s  {r['tokens_per_s']:8.0f} new tok/s  compile "
                          f"{r['compile_s']:6.2f} s  busy {r['busy']:.2f}  same tokens {_pct(same)}", flush=True)
                if len(res) == 2:
                    ratio = res["mathlm"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
                    print(f"{name:6s} b{batch:<3d} mathlm / torch: {ratio:.2f}x", flush=True)
                if max(r["busy"] for r in res.values()) > 0.1:
                    print("  warning: other processes used the CPU during timing; rerun on a quiet machine")
    print("; ".join(sorted({r["versions"] for r in rows})))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "tokens"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
