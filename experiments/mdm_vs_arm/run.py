"""MDM vs ARM on the synthetic word problems at equal size and equal training FLOPs (SMDM, Nie et al., ICLR 2025).

Pretrain + SFT an ARM (configs/math-tiny.yaml -> math-tiny-sft.yaml) and an MDM (configs/mdm-tiny.yaml ->
mdm-tiny-sft.yaml) with the same shape, steps, batch and seq_len (so the same C = 6·N·D), then
  * greedy accuracy on the same fixed subset of the synthetic test split via mathlm.train.eval.evaluate.evaluate
    (ARM: KV-cache decoding; MDM: low-confidence diffusion sampling with steps = L and steps = L/4);
  * sampling wall time at equal generated length L on one batch of test prompts (ARM forced to emit exactly L
    tokens by an unreachable EOS id; the MDM always fills its L-slot canvas).
Writes results.json and accuracy_vs_time.png next to this file. Training runs go to experiments/mdm_vs_arm/runs/,
which the script deletes when it has finished (checkpoints, corpora and eval samples are not kept).

Usage: /work/venv/bin/python experiments/mdm_vs_arm/run.py [--pre-steps 300] [--sft-steps 300] [--synth-n 20000]
       [--n-eval 100] [--gen-len 128]   |   --plot-only (redraw the PNG from results.json)
The defaults are the shipped configs' own steps and corpus size, and the canvas of mdm-tiny-sft's eval (about
25 min on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shutil
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIGS = REPO / "configs"


def last_metrics(workdir: pathlib.Path) -> dict:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_lines = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval/loss" in m]
    return {"last": train_lines[-1] if train_lines else {}, "eval": evals[-1] if evals else {}}


def plot(res: dict, path: pathlib.Path) -> None:
    """Accuracy vs sampling wall time (equal generated length), from a results dict."""
    from matplotlib.figure import Figure
    L, n_eval = res["settings"]["gen_len"], res["settings"]["n_eval"]
    acc = {a["name"]: a for a in res["accuracy"]}
    tmap = {t["name"]: t for t in res["timing"]}
    c_total = res["models"]["arm"]["flops_6nd_pretrain"] + res["models"]["arm"]["flops_6nd_sft"]
    fig = Figure(figsize=(6.5, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for aname, tname, color, label in (("arm", "arm_kv_cache", "C0", "ARM, KV cache"),
                                       (f"mdm_steps{L}", f"mdm_steps{L}", "C1", f"MDM, {L} steps"),
                                       (f"mdm_steps{L // 4}", f"mdm_steps{L // 4}", "C2", f"MDM, {L // 4} steps")):
        x, y = tmap[tname]["seconds"], 100 * acc[aname]["accuracy"]
        ax.scatter(x, y, s=60, color=color, label=label)
        ax.annotate(f"{y:.1f}%, {x:.2f} s\n{tmap[tname]['tokens_per_sec']:.0f} tok/s", (x, y),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    secs = [t["seconds"] for t in res["timing"]]
    ax.set_xlim(min(secs) / 3, max(secs) * 4)
    ax.set_ylim(-0.5, max(5.0, 100 * max(a["accuracy"] for a in res["accuracy"]) + 2))
    ax.set_xlabel(f"sampling wall time for a batch of {res['settings']['timing_batch']} prompts x {L} new tokens "
                  "(s, log; CPU)", fontsize=8)
    ax.set_ylabel(f"greedy accuracy on {n_eval} synth test problems (%)", fontsize=8)
    ax.set_title(f"MDM vs ARM: {res['models']['arm']['params'] / 1e6:.2f}M params each, equal training "
                 f"C = 6ND = {c_total:.2e} (pretrain + SFT)", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pre-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--synth-n", type=int, default=20000)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--timing-batch", type=int, default=16)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from results.json (no training)")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((HERE / "results.json").read_text()), HERE / "accuracy_vs_time.png")
        return

    import jax

    from mathlm.models.diffusion import DiffusionSampling
    from mathlm.models.generate import Generator, Sampling
    from mathlm.train.config import load_config
    from mathlm.train.eval.evaluate import EvalRequest, evaluate
    from mathlm.train.eval.inference import encode_prompt, load_engine
    from mathlm.train.loop import train

    t_start = time.perf_counter()
    runs = HERE / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    common = [f"data.synth_n={args.synth_n}", "eval.tasks=[]", "train.eval_every=0", "checkpoint.keep=1"]
    plan = {
        "arm": ("math-tiny.yaml", "math-tiny-sft.yaml"),
        "mdm": ("mdm-tiny.yaml", "mdm-tiny-sft.yaml"),
    }
    res: dict = {"models": {}}
    for kind, (pre_cfg, sft_cfg) in plan.items():
        info: dict = {}
        pre_dir, sft_dir = runs / f"{kind}-pre", runs / f"{kind}-sft"
        t0 = time.perf_counter()
        cfg = load_config(CONFIGS / pre_cfg, common + [f"train.steps={args.pre_steps}",
                                                       f"checkpoint.every_steps={args.pre_steps}",
                                                       f"train.warmup_steps={min(50, args.pre_steps // 5)}"])
        train(cfg, pre_dir, show_progress=False)
        info["pretrain_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cfg_s = load_config(CONFIGS / sft_cfg, common + [f"train.steps={args.sft_steps}",
                                                         f"checkpoint.every_steps={args.sft_steps}",
                                                         f"model.init_from={pre_dir}"])
        train(cfg_s, sft_dir, show_progress=False)
        info["sft_seconds"] = time.perf_counter() - t0
        pm, sm = last_metrics(pre_dir), last_metrics(sft_dir)
        info["params"] = cfg.model.param_count()
        info["params_non_embedding"] = cfg.model.param_count(embeddings=False)
        info["flops_6nd_pretrain"] = pm["last"].get("flops_6nd")
        info["flops_6nd_sft"] = sm["last"].get("flops_6nd")
        info["pretrain_final_loss"] = pm["last"].get("loss")
        info["sft_final_loss"] = sm["last"].get("loss")
        from mathlm.train.objectives import objective_name
        info["objectives"] = [objective_name(cfg), objective_name(cfg_s)]
        info["train_tokens"] = (args.pre_steps + args.sft_steps) * cfg.train.batch_size * cfg.train.seq_len
        res["models"][kind] = info
        print(kind, json.dumps(info), flush=True)

    # --- accuracy on the same fixed subset of the synthetic test split ---------------------------------------------
    L = args.gen_len
    settings = [("arm", None), ("mdm", L), ("mdm", L // 4)]
    acc_rows = []
    engines = {k: load_engine(str(runs / f"{k}-sft")) for k in ("arm", "mdm")}
    for kind, steps in settings:
        name = kind if steps is None else f"mdm_steps{steps}"
        req = EvalRequest("synth", limit=args.n_eval, max_new_tokens=L, batch_size=16, steps=steps)
        summary = evaluate(engines[kind], req, runs / "eval" / name)
        samples = [json.loads(x) for x in (runs / "eval" / name / "samples.jsonl").read_text().splitlines()]
        acc_rows.append({"name": name, "kind": kind, "steps": steps, "n": summary["n"],
                         "accuracy": summary["metrics"]["accuracy"],
                         "eval_seconds": summary["throughput"]["seconds"],
                         "problems_per_sec": summary["throughput"]["problems_per_sec"],
                         "ids_first3": [s["id"] for s in samples[:3]],
                         "empty_completions": float(np.mean([s["completion"].strip() == "" for s in samples])),
                         "has_####_line": float(np.mean(["####" in s["completion"] for s in samples])),
                         "mean_completion_chars": float(np.mean([len(s["completion"]) for s in samples])),
                 "examples": [{"prompt": s["prompt"], "completion": s["completion"], "reference": s["reference"]}
                                      for s in samples[:3]],
                         "example": {"prompt": samples[0]["prompt"], "completion": samples[0]["completion"],
                                     "reference": samples[0]["reference"]}})
        print(json.dumps(acc_rows[-1]), flush=True)
    res["accuracy"] = acc_rows
    assert acc_rows[0]["ids_first3"] == acc_rows[1]["ids_first3"], "ARM and MDM evaluated different problems"

    # How many reference solutions fit in L tokens (the generation budget of both models).
    tok = engines["arm"].tokenizer
    refs = [json.loads(x) for x in (runs / "eval" / "arm" / "samples.jsonl").read_text().splitlines()]
    # reference solution text is not in samples.jsonl: re-read the test split
    from mathlm.train.eval.evaluate import synth_test_file
    test = [json.loads(x) for x in synth_test_file(engines["arm"]).read_text().splitlines()][:args.n_eval]
    sol_len = np.array([len(tok.encode(" " + r["answer"])) + 1 for r in test]) if hasattr(tok, "encode") else None
    if sol_len is not None:
        res["solution_tokens"] = {"median": float(np.median(sol_len)), "p90": float(np.percentile(sol_len, 90)),
                                  "fraction_within_L": float(np.mean(sol_len <= L))}

    # --- sampling wall time at equal generated length ---------------------------------------------------------------
    prompts = [encode_prompt(tok, r["prompt"]) for r in refs[:args.timing_batch]]
    arm_run = engines["arm"].run
    no_eos = arm_run.cfg.model.vocab_size + 7  # never produced: every row decodes exactly L tokens
    arm_gen = Generator(arm_run.model, eos_id=no_eos, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    mdm_gen = engines["mdm"].generator
    timing = []

    def bench(name, fn, reps=3):
        out = fn()  # compile + warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        sec = float(np.median(ts))
        n_tok = len(prompts) * L
        row = {"name": name, "batch": len(prompts), "gen_len": L, "seconds": sec, "tokens_per_sec": n_tok / sec,
               "all_seconds": ts}
        timing.append(row)
        print(json.dumps(row), flush=True)
        return out

    o = bench("arm_kv_cache", lambda: arm_gen(prompts, Sampling(L, 0.0)))
    assert all(len(r) == L for r in o.tokens), [len(r) for r in o.tokens]
    for steps in (L, L // 4):
        bench(f"mdm_steps{steps}", lambda s=steps: mdm_gen(prompts, DiffusionSampling(L, s, 0.0)))
    res["timing"] = timing
    res["settings"] = {"pre_steps": args.pre_steps, "sft_steps": args.sft_steps, "synth_n": args.synth_n,
                       "n_eval": args.n_eval, "gen_len": L, "timing_batch": args.timing_batch,
                       "batch_size": 16, "seq_len": 256, "unmask": "low_confidence", "temperature": 0.0}
    res["flops_equal"] = (res["models"]["arm"]["flops_6nd_sft"] == res["models"]["mdm"]["flops_6nd_sft"])
    res["runtime_seconds"] = time.perf_counter() - t_start
    res["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                      "jax": jax.__version__, "devices": str(jax.devices())}
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    plot(res, HERE / "accuracy_vs_time.png")
    shutil.rmtree(runs)  # checkpoints and corpora: not needed after the measurement
    print(f"done in {res['runtime_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
