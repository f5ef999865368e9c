"""Training-throughput benchmark: mathlm's real train step vs Hugging Face LlamaForCausalLM (PyTorch eager).

    python bench/train_bench.py                          # CPU: configs S and M, mathlm + torch, fp32
    python bench/train_bench.py --configs S --steps 5    # quicker
    python bench/train_bench.py --json out.json          # also write every figure as JSON
    python bench/train_bench.py --gpu                    # GPU: S, M, L(~350M) in bf16, no torch, MFU vs --peak-tflops

What one "step" is, identically for both frameworks: forward, token cross-entropy (mean over B*T), backward,
global-norm gradient clipping at 1.0 and an AdamW update (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on
matrices; lr 3e-4, no warm-up). mathlm runs `mathlm.train.trainer.build(cfg).step_fn` (objective causal_lm,
which also computes an accuracy metric); torch runs LlamaForCausalLM(attn_implementation="eager", float32, no
biases, untied embeddings, same rope theta) + F.cross_entropy + clip_grad_norm_ + torch.optim.AdamW
(default implementation).
The batch is random tokens, one document per row (causal mask only), loss on every position.

mathlm's step is compiled ahead of time (setup.step_fn.lower(...).compile(), the executable the jit would build);
with --gpu the batch is halved until XLA's memory_analysis() of the step fits 92% of the device's bytes_limit
(BENCH_MEM_LIMIT_GIB overrides that limit), so L uses the largest of 16, 8, 4, ... that fits the card.

Timing: `--warmup` steps (compilation included) are discarded, then `--steps` steps are each timed to
completion (jax: block_until_ready on the outputs; torch: synchronous). tokens/s = B*T / median step time.

MFU = tokens/s * flops_per_token / peak, with flops_per_token from mathlm.train.runtime.flops_per_token:
    6*N + 12*n_layers*d_attn*T   (N = matmul weights of the blocks + output head, embedding excluded;
                                  d_attn = n_heads*head_dim; attention counted as the full unmasked square)
and peak = the measured fp32 matmul peak of this machine (mathlm.train.runtime.measured_matmul_peak, a
1024^3 jnp matmul under the same thread setting) on CPU, or --peak-tflops (dense bf16, default 989 = H100/H200)
with --gpu. The same FLOP count and the same peak are used for the torch figure, so the MFU ratio equals the
throughput ratio.

Peak memory: every framework x config runs in its own child process (this script re-invoked with --_worker);
the parent reads that child's ru_maxrss via os.wait4, i.e. the high-water mark of the child's resident set
size: interpreter + imported libraries + parameters, optimizer state, activations, compiled code, everything.
Nothing is subtracted; the RSS right after the imports is reported too (`rss_import`), for reference. With
--gpu the device's peak_bytes_in_use (from jax memory_stats) is reported as well.

--threads N pins each child to N cores (sched_setaffinity, before jax/torch are imported: XLA's CPU thread
pool sizes itself from the schedulable cores) and sets torch.set_num_threads(N).
Depends only on mathlm + jax (+ torch/transformers for the baseline, imported only in the torch child).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# name: (vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff, seq_len, batch)
CONFIGS = {
    "S": (8192, 256, 4, 4, 4, 704, 256, 16),
    "M": (32000, 512, 8, 8, 8, 1408, 512, 8),
    "L": (32000, 1024, 24, 16, 16, 2816, 2048, 16),  # ~350M params, GPU mode only
}
ROPE_THETA = 10000.0
MARK = "@@BENCH@@"


# ----------------------------------------------------------------------------- workers (one per child process)

def _pin_threads(threads: int | None) -> None:
    if threads and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])


def _rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _mathlm_config(name: str, dtype: str, batch: int | None):
    from mathlm.train.config import load_config
    v, d, l, h, kv, f, t, b = CONFIGS[name]
    overrides = [f"model.vocab_size={v}", f"model.d_model={d}", f"model.n_layers={l}", f"model.n_heads={h}",
                 f"model.n_kv_heads={kv}", f"model.d_ff={f}", f"model.max_seq_len={t}", f"model.dtype={dtype}",
                 f"model.rope_theta={ROPE_THETA}", "model.mask_token=false", "model.tie_embeddings=false",
                 "model.remat=false", f"train.seq_len={t}", f"train.batch_size={batch or b}",
                 "train.micro_batches=1", "train.steps=1000", "train.warmup_steps=0", "mesh.distributed='off'",
                 "mesh.data=1"]
    return load_config(None, overrides)


def _busy_s() -> float:
    """CPU seconds all processes on this machine have used (from /proc/stat), or 0.0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:3]) + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq
    except (OSError, ValueError, IndexError):
        return 0.0


def _timed(step, warmup: int, steps: int, out: dict) -> list[float]:
    """Run `warmup` untimed steps, then time `steps` steps; record in `out` how busy *other* processes were."""
    for _ in range(warmup):
        step()
    times = []
    busy0, own0, wall0 = _busy_s(), os.times(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    busy1, own1, wall = _busy_s(), os.times(), time.perf_counter() - wall0
    own = own1.user + own1.system - own0.user - own0.system
    # Other processes' CPU use during the timed steps, in cores: > ~0.1 means the timings are contended.
    out["other_cores"] = max((busy1 - busy0) - own, 0.0) / wall if busy0 else None
    out["cpu_s_per_step"] = own / steps
    return times


def worker_peak(args) -> dict:
    import jax

    from mathlm.train.runtime import measured_matmul_peak
    # The same measurement as the trainer's, with best of 50 rather than 10 repetitions (robust to a busy machine).
    peak = getattr(measured_matmul_peak, "__wrapped__", measured_matmul_peak)("float32", 1024, 50)
    return {"peak_flops": peak, "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()]}


def _compile_fitting(trainer, cfg, fixed_batch: bool):
    """Build + AOT-compile the real train step; on an accelerator, halve the batch until the step fits memory.

    Compiling first and asking XLA for the step's memory (memory_analysis) avoids an out-of-memory crash.
    """
    import dataclasses

    import jax
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    limit = stats.get("bytes_limit")
    if os.environ.get("BENCH_MEM_LIMIT_GIB"):  # override (testing, or to leave headroom on a shared card)
        limit = float(os.environ["BENCH_MEM_LIMIT_GIB"]) * 2**30
    while True:
        setup = trainer.build(cfg)
        compiled = trainer.compile_step(setup)
        mem = compiled.memory_analysis()
        need = None
        if mem is not None:
            need = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                    + mem.temp_size_in_bytes)
        b = cfg.train.batch_size
        if fixed_batch or not limit or need is None or need <= 0.92 * limit or b == 1:
            return cfg, setup, compiled, need
        print(f"[{jax.devices()[0].device_kind}] batch {b} needs {need / 2**30:.1f} GiB of "
              f"{limit / 2**30:.1f} GiB: trying batch {b // 2}", flush=True)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=b // 2))


def worker_mathlm(args) -> dict:
    import jax
    import numpy as np
    rss_import = _rss_now_kib()
    from mathlm.train import trainer
    from mathlm.train.runtime import flops_per_token
    cfg = _mathlm_config(args._config, "bfloat16" if args.gpu else "float32", args.batch)
    t0 = time.perf_counter()
    cfg, setup, step_fn, need = _compile_fitting(trainer, cfg, fixed_batch=args.batch is not None)
    params, frozen, opt = setup.init_fn(0)  # params: the trainable weights (all of them here)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.train.seq_len
    fields = {
        "inputs": rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32),
        "targets": rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), np.float32),
        "prompt_mask": np.zeros((b, t), np.int32),
    }
    spec = trainer.batch_spec(cfg)
    assert set(spec) == set(fields), f"trainer.batch_spec has fields {sorted(spec)}"
    batch = {k: jax.device_put(v.astype(spec[k].dtype), setup.batch_sh) for k, v in fields.items()}
    state = {"params": params, "opt": opt}
    losses = []

    def step():  # setup.step_fn, compiled ahead of time above (same executable the jit would build)
        p, o, m = step_fn(state["params"], frozen, state["opt"], batch)
        jax.block_until_ready((p, o, m))
        state["params"], state["opt"] = p, o
        losses.append(m["loss"])

    step()
    compile_s = time.perf_counter() - t0  # build + compile + init + first step
    out = {}
    times = _timed(step, max(args.warmup - 1, 0), args.steps, out)
    out.update({"times": times, "compile_s": compile_s, "tokens_per_step": b * t, "rss_import_kib": rss_import,
                "flops_per_token": flops_per_token(cfg.model, t), "params": cfg.model.param_count(),
                "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "batch": b, "seq": t,
                "dtype": cfg.model.dtype, "device": str(jax.devices()[0]), "jax": jax.__version__,
                "xla_step_bytes": need})
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def worker_torch(args) -> dict:
    import torch
    import torch.nn.functional as F
    rss_import = _rss_now_kib()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    v, d, l, h, kv, f, t, b = CONFIGS[args._config]
    b = args.batch or b
    hf = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=l, num_attention_heads=h,
                     num_key_value_heads=kv, max_position_embeddings=t, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     attention_bias=False, mlp_bias=False, use_cache=False,
                     rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    hf._attn_implementation = "eager"
    model = LlamaForCausalLM(hf).float().train()
    assert model.config._attn_implementation == "eager"
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, v, (b, t), generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().view(-1, v), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    out = {}
    times = _timed(step, max(args.warmup - 1, 0), args.steps, out)
    return {**out, "times": times, "compile_s": first_s, "tokens_per_step": b * t, "rss_import_kib": rss_import,
            "params": sum(p.numel() for p in model.parameters()), "loss_first": losses[0], "loss_last": losses[-1],
            "batch": b, "seq": t, "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_worker(args) -> None:
    _pin_threads(args.threads)
    fn = {"peak": worker_peak, "mathlm": worker_mathlm, "torch": worker_torch}[args._worker]
    out = fn(args)
    print(MARK + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- parent: spawn, collect, report

def spawn(kind: str, config: str | None, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if config:
        cmd += ["--_config", config]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.gpu:
        cmd += ["--gpu"]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    env = dict(os.environ)
    if args.gpu:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
        else:
            print(line)
    if proc.returncode != 0 or result is None:
        return {"error": f"{kind} {config or ''} failed with exit code {proc.returncode}"}
    result["peak_rss_kib"] = usage.ru_maxrss  # Linux: KiB
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarise(r: dict, peak: float) -> dict:
    if "error" in r:
        return r
    med = statistics.median(r["times"])
    r["step_s_median"], r["step_s_mean"], r["step_s_min"] = med, statistics.fmean(r["times"]), min(r["times"])
    r["tokens_per_s"] = r["tokens_per_step"] / med
    r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
    return r


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS),
                   help="default: S M (CPU) or S M L (--gpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--threads", type=int, default=None, help="cores per child (CPU; default: all)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--gpu", action="store_true", help="GPU mode: bf16 compute, configs S M L, no torch baseline")
    p.add_argument("--device-config", choices=["cpu", "gpu"], default=None, help="same as --gpu when 'gpu'")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per device for --gpu MFU")
    p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--_worker", choices=["peak", "mathlm", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gpu = args.gpu or args.device_config == "gpu"
    args.steps = args.steps or 10
    if args._worker:
        run_worker(args)
        return 0

    configs = args.configs or (["S", "M", "L"] if args.gpu else ["S", "M"])
    with_torch = not (args.gpu or args.no_torch)
    from mathlm.train.runtime import flops_per_token  # fails early if mathlm is not importable

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cpus']} cores; python {info['python']}")
    if args.gpu:
        peak, peak_src = args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g} (dense bf16)"
    else:
        pk = spawn("peak", None, args)
        if "error" in pk:
            print(pk["error"])
            return 1
        peak = pk["peak_flops"]
        peak_src = "measured fp32 matmul peak (measured_matmul_peak: 1024^3 jnp.matmul, best of 50)"
        info["jax"] = pk["jax"]
    print(f"peak: {peak / 1e9:.1f} GFLOP/s [{peak_src}]")
    print("MFU = tokens/s * (6*N + 12*n_layers*n_heads*head_dim*T) / peak   "
          "(N: matmul weights incl. output head, no embedding)")
    print(f"timing: {args.warmup} warm-up steps (incl. compile) excluded, {args.steps} timed; tokens/s from the "
          f"median step. peak RSS = ru_maxrss of the child process running only that benchmark\n")

    results = {}
    for name in configs:
        r = summarise(spawn("mathlm", name, args), peak)
        results[(name, "mathlm")] = r
        if with_torch:
            tr = spawn("torch", name, args)
            if "error" not in tr:  # the same FLOP count as mathlm's, from the same config
                cfg = _mathlm_config(name, "float32", args.batch)
                tr["flops_per_token"] = flops_per_token(cfg.model, cfg.train.seq_len)
            results[(name, "torch")] = summarise(tr, peak)
            info.setdefault("torch", tr.get("torch"))

    # ---- table
    head = f"{'config':<7}{'framework':<10}{'dtype':<9}{'B x T':>11}{'step ms':>10}{'tokens/s':>11}{'MFU':>8}" \
           f"{'peak RSS':>11}{'RSS@import':>12}{'first step s':>13}{'loss0->last':>16}{'busy':>6}"
    if args.gpu:
        head += f"{'dev peak':>11}"
    print(head)
    print("-" * len(head))
    for (name, fw), r in results.items():
        if "error" in r:
            print(f"{name:<7}{fw:<10}{r['error']}")
            continue
        line = (f"{name:<7}{fw:<10}{r.get('dtype', 'float32'):<9}{str(r['batch']) + ' x ' + str(r['seq']):>11}"
                f"{r['step_s_median'] * 1e3:>10.1f}{r['tokens_per_s']:>11.0f}"
                f"{(r['mfu'] or 0) * 100:>7.1f}%{r['peak_rss_kib'] / 1024:>8.0f} MiB"
                f"{r['rss_import_kib'] / 1024:>8.0f} MiB{r['compile_s']:>13.1f}"
                f"{r['loss_first']:>8.3f}->{r['loss_last']:.3f}"
                f"{'' if r.get('other_cores') is None else format(r['other_cores'], '6.2f')}")
        if args.gpu:
            dev = r.get("device_peak_bytes")
            line += f"{dev / 2**30:>7.1f} GiB" if dev else f"{'-':>11}"
        print(line)
    busy = [f"{n}/{fw}" for (n, fw), r in results.items() if (r.get("other_cores") or 0) > 0.1]
    print("busy = CPU cores used by other processes during the timed steps (0 = a quiet machine)")
    if busy:
        print(f"WARNING: other processes were using the CPU during {', '.join(busy)}: those timings are contended")
    ratios = {}
    if with_torch:
        print()
        for name in configs:
            m, t = results.get((name, "mathlm"), {}), results.get((name, "torch"), {})
            if "tokens_per_s" in m and "tokens_per_s" in t:
                ratios[name] = {"throughput": m["tokens_per_s"] / t["tokens_per_s"],
                                "peak_rss": m["peak_rss_kib"] / t["peak_rss_kib"]}
                print(f"{name}: mathlm/torch tokens/s = {ratios[name]['throughput']:.2f}x   "
                      f"peak RSS mathlm/torch = {ratios[name]['peak_rss']:.2f}x")
    if args.json:
        payload = {"machine": info, "peak_flops": peak, "peak_source": peak_src, "gpu": args.gpu,
                   "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                   "mfu_formula": "tokens/s * (6*N + 12*n_layers*n_heads*head_dim*seq_len) / peak",
                   "results": {f"{n}/{fw}": r for (n, fw), r in results.items()}, "ratios": ratios}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
