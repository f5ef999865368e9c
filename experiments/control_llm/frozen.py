"""Experiment 2, frozen_is_frozen (`run.py frozen`): a few steps of the tiny csft and cpt recipes (and cpt with the
gate frozen) from the task-A base, checking that frozen leaves stay bit-identical (and equal to the base
checkpoint), trainable leaves change, and the optimizer holds state for trainable leaves only; written to
frozen_is_frozen/results.json and its loss plot.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time

import numpy as np
from common import CONFIGS, HERE, _flat, _pure, machine, task_data, train_base, write_results

FROZEN_RUNS = {  # name: (recipe, extra overrides)
    "csft": ("control-csft-tiny.yaml", []),
    "cpt": ("control-cpt-tiny.yaml", []),
    "cpt_freeze_gate": ("control-cpt-tiny.yaml", ["expand.freeze_gate=true"]),
}


def _keys(tree) -> list[str]:
    import jax
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def frozen_check(args) -> dict:
    import jax

    from mathlm.data.pipeline import train_dataset
    from mathlm.train.config import load_config
    from mathlm.train.init_from import params_from_init as _params_from_init
    from mathlm.train.loop import _data
    from mathlm.train.runs import adopt_init_variant, load_run
    from mathlm.train.state import combine
    from mathlm.train.trainer import build, to_global
    t_all = time.perf_counter()
    runs = args.runs
    data = task_data(runs, args)
    base = train_base(args, runs, data)
    base_dir = pathlib.Path(base["run"])
    base_flat = _flat(_pure(load_run(base_dir).model))
    res: dict = {"machine": machine(), "base": str(base_dir), "steps": args.frozen_steps, "runs": {}}
    for name, (recipe, extra) in FROZEN_RUNS.items():
        t0 = time.perf_counter()
        wd = runs / f"frozen-{name}"
        if wd.exists():
            shutil.rmtree(wd)
        wd.mkdir(parents=True)
        overrides = [f"model.init_from={base_dir}", f"data.tokenizer={base_dir / 'tokenizer.json'}",
                     f"train.steps={args.frozen_steps}", f"train.seq_len={args.frozen_seq_len}", "eval.tasks=[]",
                     "train.eval_every=0", *extra]
        cfg = adopt_init_variant(load_config(CONFIGS / recipe, overrides))
        setup = build(cfg)
        _, src, _ = _data(cfg, wd, True, lambda m: None)
        trainable, frozen, opt = setup.init_fn(cfg.train.seed)
        params, _, _ = _params_from_init(setup, combine(trainable, frozen["model"]), lambda m: None)
        p0 = _flat(jax.device_get(params))
        trainable, frozen_model = setup.split(params)
        frozen = setup.frozen_from(params, frozen_model)
        train_keys, frozen_keys = set(_flat(jax.device_get(trainable))), set(_flat(jax.device_get(frozen_model)))
        it = iter(train_dataset(src, global_batch=cfg.train.batch_size, process_index=0, process_count=1,
                                seed=cfg.train.seed, threads=0, prefetch=2))
        losses = []
        for _ in range(args.frozen_steps):
            trainable, opt, m = setup.step_fn(trainable, frozen, opt, to_global(setup, next(it)))
            losses.append(float(m["loss"]))
        p1 = _flat(jax.device_get(combine(trainable, frozen_model)))
        changed = {k: bool(np.any(p1[k] != p0[k])) for k in p0}
        # frozen blocks against the base checkpoint itself: a site's pretrained block and the original blocks
        from mathlm.models.expand import ExpandOptions, layout
        from mathlm.models.variants import options_of
        opts = ExpandOptions.parse(options_of(cfg.model))
        lay = layout(cfg.model.n_layers, opts)
        vs_base = {}
        for k in frozen_keys:
            parts = k.split("/")
            if parts[0] != "blocks":
                vs_base[k] = bool(np.array_equal(p1[k], base_flat[k]))
            else:
                role, i = lay[int(parts[1])]
                rest = parts[3:] if parts[2] == "pretrained" else parts[2:]
                src_key = "/".join(["blocks", str(i), *rest])
                if src_key in base_flat:
                    vs_base[k] = bool(np.array_equal(p1[k], base_flat[src_key]))
        # optimizer state: every array leaf belongs to a trainable weight (its path ends with that weight's path)
        tk, fk = _keys(trainable), _keys(frozen_model)
        opt_leaves = jax.tree_util.tree_flatten_with_path(opt["state"])[0]
        arrays = [(jax.tree_util.keystr(p), v) for p, v in opt_leaves if np.ndim(v) > 0]
        of_trainable = [k for k, _ in arrays if any(k.endswith(t) for t in tk)]
        of_frozen = [k for k, _ in arrays if any(k.endswith(f) for f in fk)]
        n_train = sum(int(np.prod(p0[k].shape)) for k in train_keys)
        n_frozen = sum(int(np.prod(p0[k].shape)) for k in frozen_keys)
        n_opt = sum(int(np.prod(np.shape(v))) for _, v in arrays)
        gate_leaves = {k: {"trainable": k in train_keys, "changed": changed[k]} for k in p0
                       if k.split("/")[-1] in ("interpolation_factor", "interp_w", "interp_b")}
        row = {"recipe": f"configs/{recipe}", "overrides": overrides,
               "expansion": {k: getattr(opts, k) for k in ("type", "num_layers", "merge", "gate_init",
                                                           "freeze_gate", "div_loss", "div_alpha")},
               "n_leaves_trainable": len(train_keys), "n_leaves_frozen": len(frozen_keys),
               "params_trainable": n_train, "params_frozen": n_frozen,
               "frozen_bit_identical": all(not changed[k] for k in frozen_keys),
               "frozen_changed": sorted(k for k in frozen_keys if changed[k]),
               "frozen_equal_to_base_checkpoint": all(vs_base.values()), "frozen_compared_to_base": len(vs_base),
               "trainable_all_changed": all(changed[k] for k in train_keys),
               "trainable_unchanged": sorted(k for k in train_keys if not changed[k]),
               "gate_leaves": gate_leaves,
               "opt_state_array_leaves": len(arrays), "opt_state_elements": n_opt,
               "opt_state_elements_over_trainable": n_opt / n_train,
               "opt_leaves_matching_trainable": len(of_trainable), "opt_leaves_matching_frozen": len(of_frozen),
               "frozen_have_no_opt_state": len(of_frozen) == 0 and len(of_trainable) == len(arrays),
               "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
               "wall_seconds": time.perf_counter() - t0}
        res["runs"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k not in ("losses", "gate_leaves", "overrides")}),
              flush=True)
        shutil.rmtree(wd)
    res["wall_seconds"] = time.perf_counter() - t_all
    res["deviation"] = (f"train.seq_len={args.frozen_seq_len} (the recipes: 256) to fit the time budget; the "
                        "recipes' data (synth, max_value 100, 1-5 steps) otherwise as shipped, tokenized with the "
                        "base's tokenizer")
    write_results("frozen_is_frozen", res)
    plot_frozen(res)
    return res


def plot_frozen(res: dict) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for name, r in res["runs"].items():
        ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"],
                label=f"{name}: {r['params_trainable']:,} trainable / {r['params_frozen']:,} frozen; "
                      f"frozen identical={r['frozen_bit_identical']}, no opt state={r['frozen_have_no_opt_state']}")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss (CE + divergence)", fontsize=8)
    ax.set_title("frozen_is_frozen: 50 steps of the tiny csft / cpt recipes", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(HERE / "frozen_is_frozen" / "loss.png", dpi=120)
