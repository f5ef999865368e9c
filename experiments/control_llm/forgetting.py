"""Experiment 3, forgetting (`run.py forgetting`): continual training on task B from the task-A base with full
fine-tuning, partial, stack, hybrid and four concat variants; greedy accuracy on A and B at a few checkpoints,
per-site cos(h_pre, h_exp) and gate curves, written to forgetting/results[_<tag>].json and its plots.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import numpy as np
from common import CONFIGS, HERE, Evaluator, machine, task_data, train_base, write_results

CSFT, CPT = "control-csft-tiny.yaml", "control-cpt-tiny.yaml"
METHODS = {  # name: (recipe, extra overrides); full/partial use the csft recipe's optimizer without its expand:
    "full": (CSFT, ["expand=null"]),
    "partial": (CSFT, ["expand=null"]),  # + train.trainable (added below, from E)
    "stack": (CSFT, ["expand.type=stack"]),
    "hybrid": (CSFT, ["expand.type=hybrid"]),
    "concat_lerp": (CSFT, []),
    "concat_dlerp": (CPT, []),
    "concat_lerp_alpha0": (CSFT, ["expand.div_alpha=0"]),
    "concat_dlerp_alpha0": (CPT, ["expand.div_alpha=0"]),
}


def method_overrides(name: str, base_dir: pathlib.Path, data: dict, args) -> tuple[str, list[str]]:
    recipe, extra = METHODS[name]
    steps, every = args.b_steps, args.b_steps // args.b_evals
    ov = [f"model.init_from={base_dir}", f"data.tokenizer={base_dir / 'tokenizer.json'}",
          f"data.train=[{data['B']['train']}]", f"data.validation=[{data['B']['validation']}]", "data.format=sft",
          f"train.steps={steps}", f"train.horizon_steps={20 * steps}", f"train.seq_len={args.b_seq_len}",
          f"train.batch_size={args.b_batch}", f"train.eval_every={every}", "train.eval_batches=2",
          "train.log_every=10", f"checkpoint.every_steps={every}", "checkpoint.keep=20", "eval.tasks=[]", *extra]
    if args.b_lr is not None:
        ov.append(f"train.lr={args.b_lr}")
    if name == "partial":
        from mathlm.models.expand import expansion_points
        pts = expansion_points(8, 4)
        ov.append("train.trainable=[" + ",".join([f"^blocks/({'|'.join(map(str, pts))})/", "^embed/",
                                                  "^final_norm/", "^lm_head/"]) + "]")
    return recipe, ov


def count_params(cfg) -> tuple[int, int]:
    import jax

    from mathlm import models
    from mathlm.train.state import partition
    _, like = models.abstract(cfg.model)
    tr, _ = partition(like, models.trainable_filter(cfg.model, cfg.train.trainable))
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    return n(tr), n(like)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def forgetting(args) -> dict:
    from mathlm.train.config import load_config
    from mathlm.train.loop import train
    from mathlm.train.runs import adopt_init_variant
    t_all = time.perf_counter()
    runs = args.runs
    data = task_data(runs, args)
    base = train_base(args, runs, data)
    base_dir = pathlib.Path(base["run"])
    ev = Evaluator(data, args.n_eval)
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    suffix = f"_{args.tag}" if args.tag else ""
    path = HERE / "forgetting" / f"results{suffix}.json"
    old = json.loads(path.read_text()) if path.is_file() and args.methods != "all" else {}
    methods = old.get("methods", {})
    for name in names:
        t0 = time.perf_counter()
        recipe, ov = method_overrides(name, base_dir, data, args)
        cfg = adopt_init_variant(load_config(CONFIGS / recipe, ov))
        wd = runs / f"B-{name}{suffix}"
        if wd.exists():
            shutil.rmtree(wd)
        last = train(cfg, wd, show_progress=False)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        curve = [{"step": 0, "task_a_accuracy": base["task_a_accuracy"], "task_b_accuracy": base["task_b_accuracy"],
                  "from": "base"}]
        steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
        for i, step in enumerate(steps):
            eng = ev.load(wd / "checkpoints" / str(step), reuse=i > 0)
            a, b = ev.accuracy(eng, "A"), ev.accuracy(eng, "B")
            curve.append({"step": step, "task_a_accuracy": a["accuracy"], "task_b_accuracy": b["accuracy"],
                          "task_a_accuracy_flexible": a["accuracy_flexible"],
                          "examples_A": a["examples"], "examples_B": b["examples"]})
            print(name, step, f"A {a['accuracy']:.3f} B {b['accuracy']:.3f}", flush=True)
        eval_s = time.perf_counter() - t1
        n_train, n_all = count_params(cfg)
        rows = read_metrics(wd)
        sites = sorted({k.split("/")[0] for r in rows for k in r if k.startswith("site") and k.endswith("/cos")},
                       key=lambda s: int(s[4:]))
        per_site = {s: {"step": [r["step"] for r in rows if f"{s}/cos" in r],
                        "cos": [r[f"{s}/cos"] for r in rows if f"{s}/cos" in r],
                        "gate": [r[f"{s}/gate"] for r in rows if f"{s}/gate" in r],
                        "div": [r[f"{s}/div"] for r in rows if f"{s}/div" in r]} for s in sites}
        eval_gates = {s: [(r["step"], r[f"eval/{s}/gate"]) for r in rows if f"eval/{s}/gate" in r] for s in sites}
        methods[name] = {
            "recipe": f"configs/{recipe}", "overrides": ov, "run": str(wd),
            "variant": cfg.model.variant, "trainable_regexes": cfg.train.trainable,
            "task_a_accuracy_before": base["task_a_accuracy"], "task_a_accuracy_after": curve[-1]["task_a_accuracy"],
            "task_b_accuracy_before": base["task_b_accuracy"], "task_b_accuracy": curve[-1]["task_b_accuracy"],
            "task_a_accuracy_after_flexible": curve[-1]["task_a_accuracy_flexible"],
            "mathlm_snapshot_commit": os.environ.get("MATHLM_SNAPSHOT_COMMIT"),
            "trainable_params": n_train, "total_params": n_all,
            "final_loss": last.get("loss"), "final_eval_loss_B": last.get("eval/loss"),
            "curve": curve, "sites": per_site, "eval_gates": eval_gates,
            "loss_curve": {"step": [r["step"] for r in rows if "loss" in r], "loss": [r["loss"] for r in rows
                                                                                       if "loss" in r]},
            "train_seconds": train_s, "eval_seconds": eval_s, "wall_seconds": time.perf_counter() - t0}
        print(name, json.dumps({k: v for k, v in methods[name].items()
                                if k in ("task_a_accuracy_after", "task_b_accuracy", "trainable_params",
                                         "wall_seconds")}), flush=True)
        res = {"machine": machine(), "base": base, "methods": methods,
               "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
                            if k != "func"},
               "task_a": {"source": "data/synth.py (mathlm data synth)", "max_steps": args.a_max_steps,
                          "max_value": args.a_max_value, "n": args.a_n, "format": "sft (question, answer)"},
               "task_b": {"source": "data/skills.py", "skill": args.b_skill, "min_len": args.b_min_len,
                          "max_len": args.b_max_len, "n": args.b_n, "format": "sft (question, answer)"},
               "wall_seconds_this_invocation": time.perf_counter() - t_all}
        write_results("forgetting", res, path.name)
    res["wall_seconds_methods"] = sum(m["wall_seconds"] for m in methods.values())
    res["wall_seconds_total"] = res["wall_seconds_methods"] + (0 if args.tag else base["wall_seconds"])
    write_results("forgetting", res, path.name)
    plot_forgetting(res, suffix)
    return res


COLORS = {"full": "C3", "partial": "C1", "stack": "C4", "hybrid": "C5", "concat_lerp": "C0", "concat_dlerp": "C2",
          "concat_lerp_alpha0": "C9", "concat_dlerp_alpha0": "C8"}


def plot_forgetting(res: dict, suffix: str = "") -> None:
    from matplotlib.figure import Figure
    out = HERE / "forgetting"
    fig = Figure(figsize=(11, 4.2))
    axa, axb = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, m in res["methods"].items():
        st = [c["step"] for c in m["curve"]]
        ls = "--" if "alpha0" in name else "-"
        axa.plot(st, [100 * c["task_a_accuracy"] for c in m["curve"]], ls, marker="o", ms=3, color=COLORS.get(name),
                 label=name)
        axb.plot(st, [100 * c["task_b_accuracy"] for c in m["curve"]], ls, marker="o", ms=3, color=COLORS.get(name),
                 label=name)
    n = res["settings"]["n_eval"]
    axa.set_title(f"task A (synthetic word problems, {n} test problems): retention", fontsize=9)
    axb.set_title(f"task B ({res['task_b']['skill']} {res['task_b']['min_len']}-{res['task_b']['max_len']} digits, "
                  f"{n} test problems): learning", fontsize=9)
    for ax in (axa, axb):
        ax.set_xlabel("step of continual training on B", fontsize=8)
        ax.set_ylabel("greedy accuracy (%)", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axb.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"accuracy_vs_step{suffix}.png", dpi=120)

    site_methods = [(n, m) for n, m in res["methods"].items() if m["sites"]]
    fig = Figure(figsize=(11, 4.2))
    axc, axg = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, m in site_methods:
        ls = "--" if "alpha0" in name else "-"
        for i, (site, v) in enumerate(m["sites"].items()):
            kw = dict(color=COLORS.get(name), ls=ls, alpha=0.35 + 0.65 * (i + 1) / len(m["sites"]), lw=1)
            axc.plot(v["step"], v["cos"], label=f"{name} {site}", **kw)
            axg.plot(v["step"], v["gate"], label=f"{name} {site}", **kw)
    axc.set_title("per-site cos(h_pre, h_exp) (training batches; darker = deeper site)", fontsize=9)
    axg.set_title("per-site mean gate a (training batches)", fontsize=9)
    for ax in (axc, axg):
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axg.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"sites_cos_gate{suffix}.png", dpi=120)
