"""Control-LLM experiments in miniature (issue 13, "Experiments"; docs/control-llm.md): four subcommands, each
writing experiments/control_llm/<name>/results.json and its PNG plots.

  identity   identity_at_init: every merge of concat and hybrid, and stack, on a tiny random base: max |Δlogit|
             of the expanded model against the base, each site's divergence at init, prog's per-site
             perturbation against its estimate (1 - a) 0.01 sqrt(d) |h|, and cached greedy decoding vs the base's.
  frozen     frozen_is_frozen: 50 steps of the control-csft-tiny and control-cpt-tiny recipes (and cpt with the
             gate frozen): frozen leaves bit-identical, trainable leaves changed, optimizer state only for
             trainable leaves.
  forgetting forgetting: pretrain a plain base on task A (synthetic word problems), continue on task B (a
             data/skills.py skill) with full FT, partial, stack, hybrid and four concat variants; greedy accuracy
             on A and B at a few checkpoints; per-site cos(h_pre, h_exp) and gate curves.
  mergeback  merge_back_delta: merge the trained concat_lerp and concat_dlerp runs back (`convert merge-back`),
             their accuracy on A and B and KL against the unmerged model.
  all        the four in order (identity, forgetting's base, frozen, forgetting, mergeback).
  plot       redraw every PNG from the results.json files.

Runs (checkpoints, corpora) go to --runs (default /tmp/control_llm_runs), never into the repo. The base of
`frozen` and the runs of `mergeback` are `forgetting`'s (its base is trained first if missing).

The code is split by experiment beside this file: common.py (paths, results I/O, task data, the Evaluator, the
task-A base), identity.py, frozen.py, forgetting.py and mergeback.py; this file holds the argument parsing.

Usage: .venv/bin/python experiments/control_llm/run.py {identity|frozen|forgetting|mergeback|all|plot} [options]
"""
from __future__ import annotations

import argparse
import json
import pathlib

from common import HERE, read_results, task_data, train_base
from forgetting import forgetting, plot_forgetting
from frozen import frozen_check, plot_frozen
from identity import identity, plot_identity
from mergeback import mergeback, plot_mergeback

DEFAULT_RUNS = pathlib.Path("/tmp/control_llm_runs")


def _add_task_args(p):
    p.add_argument("--runs", type=pathlib.Path, default=DEFAULT_RUNS)
    p.add_argument("--a-max-steps", type=int, default=1)
    p.add_argument("--a-max-value", type=int, default=10)
    p.add_argument("--a-n", type=int, default=20000)
    p.add_argument("--b-skill", default="reverse")
    p.add_argument("--b-min-len", type=int, default=3)
    p.add_argument("--b-max-len", type=int, default=6)
    p.add_argument("--b-n", type=int, default=20000)
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=72)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--methods", default="all", help="comma-separated subset of the forgetting methods")
    p.add_argument("--b-steps", type=int, default=300)
    p.add_argument("--b-evals", type=int, default=3, help="checkpoints evaluated on A and B (evenly spaced)")
    p.add_argument("--b-seq-len", type=int, default=32)
    p.add_argument("--b-batch", type=int, default=32)
    p.add_argument("--b-lr", type=float, default=None, help="default: the recipe's lr (1e-3)")
    p.add_argument("--tag", default="", help="an ablation: forgetting/results_<tag>.json and *_<tag>.png")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("identity")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("base")
    _add_task_args(p)
    p = sub.add_parser("frozen")
    _add_task_args(p)
    p.add_argument("--frozen-steps", type=int, default=50)
    p.add_argument("--frozen-seq-len", type=int, default=128)
    p = sub.add_parser("forgetting")
    _add_task_args(p)
    p = sub.add_parser("mergeback")
    _add_task_args(p)
    sub.add_parser("plot")
    args = ap.parse_args()
    if args.cmd == "identity":
        identity(args)
    elif args.cmd == "base":
        args.runs.mkdir(parents=True, exist_ok=True)
        train_base(args, args.runs, task_data(args.runs, args))
    elif args.cmd == "frozen":
        frozen_check(args)
    elif args.cmd == "forgetting":
        forgetting(args)
    elif args.cmd == "mergeback":
        mergeback(args)
    elif args.cmd == "plot":
        for name, fn in (("identity_at_init", plot_identity), ("frozen_is_frozen", plot_frozen),
                         ("forgetting", plot_forgetting), ("merge_back_delta", plot_mergeback)):
            if (HERE / name / "results.json").is_file():
                fn(read_results(name))
        for path in sorted((HERE / "forgetting").glob("results_*.json")):  # ablations (--tag)
            plot_forgetting(json.loads(path.read_text()), "_" + path.stem.removeprefix("results_"))


if __name__ == "__main__":
    main()
