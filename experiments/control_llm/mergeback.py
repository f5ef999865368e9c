"""Experiment 4, merge_back_delta (`run.py mergeback`): the trained concat_lerp and concat_dlerp runs of
`forgetting` merged back into the base architecture (`convert merge-back`), their greedy accuracy on A and B and
their KL against the unmerged model, written to merge_back_delta/results.json and its plot.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time

import numpy as np
from common import HERE, Evaluator, machine, read_results, task_data, write_results


def mergeback(args) -> dict:
    from mathlm.train.expansion import compare, heldout_sequences, merge_back_run
    from mathlm.train.runs import load_run
    t_all = time.perf_counter()
    runs = args.runs
    data = task_data(runs, args)
    fres = read_results("forgetting")
    ev = Evaluator(data, args.n_eval)
    res: dict = {"machine": machine(), "models": {}}
    for name in ("concat_lerp", "concat_dlerp"):
        t0 = time.perf_counter()
        src = pathlib.Path(fres["methods"][name]["run"])
        out = runs / f"merged-{name}"
        if out.exists():
            shutil.rmtree(out)
        report_a = merge_back_run(str(src), out, data=str(data["A"]["validation"]))
        unmerged, merged = load_run(src), load_run(out)
        report_b = compare(unmerged.model, merged.model, heldout_sequences(unmerged, str(data["B"]["validation"])))
        eng = ev.load(out)
        acc_a, acc_b = ev.accuracy(eng, "A"), ev.accuracy(eng, "B")
        um = fres["methods"][name]
        res["models"][name] = {
            "source": str(src), "site_weights": report_a["site_weights"], "weights_from": report_a["weights_from"],
            "unmerged_task_a_accuracy": um["task_a_accuracy_after"], "unmerged_task_b_accuracy": um["task_b_accuracy"],
            "merged_task_a_accuracy": acc_a["accuracy"], "merged_task_b_accuracy": acc_b["accuracy"],
            "kl_vs_unmerged_on_A": report_a["mean_token_kl"], "max_abs_logit_diff_on_A": report_a["max_abs_logit_diff"],
            "next_token_accuracy_change_on_A": report_a["accuracy_change"],
            "kl_vs_unmerged_on_B": report_b["mean_token_kl"], "max_abs_logit_diff_on_B": report_b["max_abs_logit_diff"],
            "next_token_accuracy_change_on_B": report_b["accuracy_change"],
            "report_A": report_a, "report_B": report_b, "examples_A": acc_a["examples"],
            "examples_B": acc_b["examples"], "wall_seconds": time.perf_counter() - t0}
        print(name, json.dumps({k: v for k, v in res["models"][name].items()
                                if not k.startswith(("report", "examples"))}), flush=True)
    res["wall_seconds"] = time.perf_counter() - t_all
    write_results("merge_back_delta", res)
    plot_mergeback(res)
    return res


def plot_mergeback(res: dict) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    names = list(res["models"])
    x = np.arange(len(names))
    bars = (("unmerged_task_a_accuracy", "A unmerged"), ("merged_task_a_accuracy", "A merged"),
            ("unmerged_task_b_accuracy", "B unmerged"), ("merged_task_b_accuracy", "B merged"))
    for i, (key, label) in enumerate(bars):
        ax.bar(x + (i - 1.5) * 0.2, [100 * res["models"][n][key] for n in names], width=0.2, label=label)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("greedy accuracy (%)", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("merge-back: accuracy", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    for i, (key, label) in enumerate((("kl_vs_unmerged_on_A", "on A"), ("kl_vs_unmerged_on_B", "on B"))):
        ax2.bar(x + (i - 0.5) * 0.35, [res["models"][n][key] for n in names], width=0.35, label=label)
    ax2.set_xticks(x, names, fontsize=8)
    ax2.set_ylabel("mean per-token KL(unmerged || merged), nats", fontsize=8)
    ax2.legend(fontsize=7)
    ax2.set_title("merge-back: KL against the unmerged model", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "merge_back_delta" / "merge_back.png", dpi=120)
