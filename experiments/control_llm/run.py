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

Usage: .venv/bin/python experiments/control_llm/run.py {identity|frozen|forgetting|mergeback|all|plot} [options]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import subprocess
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIGS = REPO / "configs"
DEFAULT_RUNS = pathlib.Path("/tmp/control_llm_runs")
MERGES = ("lerp", "slerp", "dlerp", "dlerpin", "moe", "proj", "prog")


# ----------------------------------------------------------------------------- shared

def machine() -> dict:
    """CPU model, cores, load and library versions (wall times on a shared 2-core machine depend on them)."""
    import jax
    cpu = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    import mathlm.train as mt
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "devices": str(jax.devices()), "repo_commit": commit,
            # the mathlm code that ran: the checkout, or a frozen copy of a commit (MATHLM_SNAPSHOT)
            "mathlm_from": str(pathlib.Path(mt.__file__).parent.parent),
            "mathlm_snapshot_commit": os.environ.get("MATHLM_SNAPSHOT_COMMIT")}


def write_results(name: str, res: dict, file: str = "results.json") -> pathlib.Path:
    out = HERE / name
    out.mkdir(parents=True, exist_ok=True)
    path = out / file
    path.write_text(json.dumps(res, indent=1, default=float) + "\n")
    return path


def read_results(name: str) -> dict:
    return json.loads((HERE / name / "results.json").read_text())


def _pure(model) -> dict:
    import jax
    from flax import nnx
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _flat(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = np.asarray(v)
    return out


# ----------------------------------------------------------------------------- 1. identity_at_init

TOL = {"lerp": 1e-6, "proj": 1e-6, "moe": 1e-6, "stack": 1e-6, "slerp": 1e-6, "dlerp": 1e-5, "dlerpin": 1e-5}
IDENTITY_SHAPE = dict(vocab_size=512, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=128,
                      mask_token=False)


def _site_perturbation(model, tokens) -> dict:
    """Per merge site, mean over tokens of |out - h_pre| / |h_pre| (the merge's change of the pretrained branch's
    output), with h_pre the site's own pretrained output in the expanded model (block by block)."""
    import jax
    import jax.numpy as jnp

    from mathlm.models.expand import MergeSite
    from mathlm.models.transformer import attention_mask
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(jnp.ones((b, t), jnp.int32), True)
    x = model.embed(tokens)
    out = {}
    for j, blk in enumerate(model.blocks):
        if isinstance(blk, MergeSite):
            h_pre = blk.pretrained(x, positions, mask)
            y = blk(x, positions, mask)
            rel = jnp.linalg.norm(y - h_pre, axis=-1) / jnp.linalg.norm(h_pre, axis=-1)
            a = float(jax.nn.sigmoid(blk.interpolation_factor[...][0])) if hasattr(blk, "interpolation_factor") \
                else None
            out[str(j)] = {"measured_rel": float(jnp.mean(rel)), "a": a,
                           "mean_abs": float(jnp.mean(jnp.linalg.norm(y - h_pre, axis=-1))),
                           "mean_h_pre_norm": float(jnp.mean(jnp.linalg.norm(h_pre, axis=-1)))}
            x = y
        else:
            x = blk(x, positions, mask)
    return out


def _identity_case(base_cfg, base_params, base_logits, base_decode, tokens, prompts, typ, merge, div_loss="cosine",
                   div_alpha=1.0, decode=True):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mathlm import models
    from mathlm.models import variants
    from mathlm.models.generate import Generator, Sampling
    from mathlm.train.objectives import forward
    opts = dict(type=typ, num_layers=4, merge=merge or "lerp", gate_init=0.0, freeze_gate=False, div_loss=div_loss,
                div_alpha=div_alpha)
    cfg = dataclasses.replace(base_cfg, variant={"name": "expand", **opts})
    params = variants.from_base(cfg, base_cfg, base_params, models.init_params(cfg, 1))
    graphdef = models.abstract(cfg)[0]
    fwd = jax.jit(lambda p, x: forward(nnx.merge(graphdef, p), x))
    logits, aux, diag = jax.device_get(fwd(params, tokens))
    diff = np.abs(np.asarray(logits, np.float64) - base_logits)
    row = {"type": typ, "merge": merge, "div_loss": div_loss if typ != "stack" else None,
           "div_alpha": div_alpha if typ != "stack" else None,
           "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
           "site_div": {k.split("/")[0][4:]: float(v) for k, v in diag.items() if k.endswith("/div")},
           "site_cos": {k.split("/")[0][4:]: float(v) for k, v in diag.items() if k.endswith("/cos")},
           "site_gate": {k.split("/")[0][4:]: float(v) for k, v in diag.items() if k.endswith("/gate")},
           "aux_loss_total": float(aux)}
    key = "stack" if typ == "stack" else merge
    if key in TOL:
        row["tolerance"] = TOL[key]
        row["within_tolerance"] = bool(row["max_abs_logit_diff"] <= TOL[key])
    if merge == "prog":
        d = base_cfg.d_model
        sites = _site_perturbation(nnx.merge(graphdef, params), jnp.asarray(tokens))
        for s in sites.values():
            s["estimate_rel"] = (1 - s["a"]) * 0.01 * d ** 0.5  # (1 - a) 0.01 sqrt(d) |h| / |h|
        row["prog_site_perturbation"] = sites
    if decode:
        gen = Generator(nnx.merge(graphdef, params), eos_id=2, pad_id=0)
        out = gen(prompts, Sampling(24, 0.0))
        row["decode_token_identical"] = out.tokens == base_decode
        row["decode_first_mismatch"] = next((i for i, (x, y) in enumerate(zip(out.tokens, base_decode)) if x != y),
                                            None)
    return row


def identity(args) -> dict:
    import jax
    from flax import nnx

    from mathlm import models
    from mathlm.models.generate import Generator, Sampling
    from mathlm.models.transformer import ModelConfig
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "bases": {}}
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, IDENTITY_SHAPE["vocab_size"], size=(4, 64)).astype(np.int32)
    prompts = [rng.integers(3, IDENTITY_SHAPE["vocab_size"], size=n).tolist() for n in (5, 9, 17, 30)]
    base_cfg = ModelConfig(**IDENTITY_SHAPE)
    base_model = models.build(base_cfg, nnx.Rngs(params=jax.random.key(args.seed)))
    for name, head_scale in (("random_init", 1.0), ("random_init_head_x25", 25.0)):
        # the second base multiplies lm_head by 25: logits of O(5) instead of O(0.2), a stricter absolute test
        base_params = _pure(base_model)
        base_params["lm_head"]["kernel"] = base_params["lm_head"]["kernel"] * head_scale
        bm = nnx.merge(models.abstract(base_cfg)[0], base_params)
        base_logits = np.asarray(jax.jit(lambda m, x: m(x))(bm, tokens), np.float64)
        base_decode = Generator(bm, eos_id=2, pad_id=0)(prompts, Sampling(24, 0.0)).tokens
        rows = []
        cases = [("concat", m) for m in MERGES] + [("hybrid", m) for m in MERGES] + [("stack", None)]
        for typ, merge in cases:
            rows.append(_identity_case(base_cfg, base_params, base_logits, base_decode, tokens, prompts, typ, merge))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "prog_site_perturbation"}), flush=True)
        # the divergence of proj at init, by loss and alpha (P enters only the divergence)
        extra = []
        for div_loss, alpha in (("mse", 1.0), ("cosine", 0.0), ("cosine", -1.0)):
            for merge in ("lerp", "proj"):
                extra.append(_identity_case(base_cfg, base_params, base_logits, base_decode, tokens, prompts,
                                            "concat", merge, div_loss, alpha, decode=False))
        res["bases"][name] = {"lm_head_scale": head_scale, "max_abs_base_logit": float(np.abs(base_logits).max()),
                              "std_base_logit": float(base_logits.std()), "cases": rows, "divergence_cases": extra}
    res["settings"] = {"shape": IDENTITY_SHAPE, "num_layers_k": 4, "gate_init": 0.0, "div_loss": "cosine",
                       "div_alpha": 1.0, "tokens": list(tokens.shape), "decode_prompts": [len(p) for p in prompts],
                       "decode_new_tokens": 24, "dtype": "float32", "seed": args.seed}
    res["wall_seconds"] = time.perf_counter() - t0
    write_results("identity_at_init", res)
    plot_identity(res)
    print(f"identity_at_init: {res['wall_seconds']:.0f} s", flush=True)
    return res


def plot_identity(res: dict) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, base) in enumerate(res["bases"].items()):
        labels = [f"{c['type']}" + (f"/{c['merge']}" if c["merge"] else "") for c in base["cases"]]
        vals = [max(c["max_abs_logit_diff"], 1e-12) for c in base["cases"]]
        x = np.arange(len(labels)) + (i - 0.5) * 0.38
        ax.bar(x, vals, width=0.38, label=f"{name} (max |logit| {base['max_abs_base_logit']:.2g})")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    for tol, style in ((1e-6, "--"), (1e-5, ":")):
        ax.axhline(tol, color="k", ls=style, lw=0.8, label=f"{tol:g}")
    ax.set_ylabel("max |Δlogit| vs base at init (0 shown as 1e-12)", fontsize=8)
    ax.set_title("identity_at_init: expanded model vs its base (k=4 of 8 layers, d=128, f32)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "identity_at_init" / "max_logit_diff.png", dpi=120)


# ----------------------------------------------------------------------------- task data, greedy accuracy

def task_data(runs: pathlib.Path, args) -> dict:
    """Task A (synthetic word problems, `mathlm data synth` with the chosen difficulty) and task B (a skill from
    data/skills.py), as train/validation/test JSONL under runs/data/."""
    from mathlm.data import skills, synth
    a_dir = runs / "data" / f"A-k{args.a_max_steps}-v{args.a_max_value}-n{args.a_n}"
    if not (a_dir / "test.jsonl").is_file():
        synth.write_jsonl(synth.generate(synth.SynthConfig(n=args.a_n, seed=0, max_steps=args.a_max_steps,
                                                           max_value=args.a_max_value)), a_dir)
    b_cfg = skills.SkillConfig(args.b_skill, n=args.b_n, seed=0, min_len=args.b_min_len, max_len=args.b_max_len)
    b_dir = runs / "data" / f"B-{args.b_skill}-{args.b_min_len}-{args.b_max_len}-n{args.b_n}"
    if not (b_dir / "test.jsonl").is_file():
        skills.write_jsonl(skills.generate(b_cfg), b_dir)
    return {"A": {s: a_dir / f"{s}.jsonl" for s in ("train", "validation", "test")},
            "B": {s: b_dir / f"{s}.jsonl" for s in ("train", "validation", "test")}}


class Evaluator:
    """Greedy accuracy on the first n test problems of A (the synth grader, strict "#### N") and of B (exact match,
    data/skills.py). One Generator per network: later checkpoints of the same run swap their weights in, so the
    decode programs compile once per method."""

    def __init__(self, data: dict, n_eval: int, batch_size: int = 100):
        from mathlm.data import skills, tasks
        self.fmt = tasks.resolve_format("synth", 0, None, None)
        self.a = tasks.load_problems(data["A"]["test"], "synth", n_eval)
        self.b = [json.loads(x) for x in data["B"]["test"].read_text().splitlines()[:n_eval]]
        self.b_max = max(len(r["answer"]) for r in self.b) + 3
        self.batch_size = batch_size
        self.skills = skills
        self._engine = None

    def load(self, path: str | pathlib.Path, reuse: bool = False):
        """The engine for a checkpoint; reuse=True swaps the weights into the previous engine's generator."""
        from flax import nnx

        from mathlm.train.eval.inference import load_engine
        from mathlm.train.runs import load_run
        if reuse and self._engine is not None:
            run = load_run(str(path), mesh=self._mesh)
            self._engine.generator.params = nnx.split(run.model)[1]
            self._engine.run = run
            return self._engine
        self._engine = load_engine(str(path))
        self._mesh = self._engine.generator.batch_sharding.mesh
        return self._engine

    def accuracy(self, engine, which: str) -> dict:
        from mathlm.data import tasks
        from mathlm.data.sources import qa_prompt
        from mathlm.models.generate import Sampling
        from mathlm.train.eval.inference import complete
        t0 = time.perf_counter()
        if which == "A":
            prompts = [self.fmt.prompt(p) for p in self.a]
            out = complete(engine, prompts, Sampling(48, 0.0), stop=self.fmt.stop, batch_size=self.batch_size)
            grades = [tasks.grade(c, p.reference, "synth") for c, p in zip(out.texts, self.a)]
            ok = [g["correct"] for g in grades]
            flexible = float(np.mean([g["correct_by"]["flexible-extract"] for g in grades]))
            examples = [{"q": p.question, "completion": c, "reference": p.reference}
                        for c, p in list(zip(out.texts, self.a))[:2]]
        else:
            prompts = [qa_prompt(r["question"]) for r in self.b]
            out = complete(engine, prompts, Sampling(self.b_max, 0.0), stop=("\n",), batch_size=self.batch_size)
            ok = [self.skills.grade(c, r["answer"]) for c, r in zip(out.texts, self.b)]
            flexible = None
            examples = [{"q": r["question"], "completion": c, "reference": r["answer"]}
                        for c, r in list(zip(out.texts, self.b))[:2]]
        return {"accuracy": float(np.mean(ok)), "accuracy_flexible": flexible, "n": len(ok),
                "seconds": time.perf_counter() - t0,
                "examples": examples}


# ----------------------------------------------------------------------------- 3. forgetting: the base

def base_overrides(data: dict, args) -> list[str]:
    return [f"data.train=[{data['A']['train']}]", f"data.validation=[{data['A']['validation']}]", "data.format=sft",
            f"train.steps={args.base_steps}", f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
            f"train.lr={args.base_lr}", "train.warmup_steps=50", "eval.tasks=[]", "train.eval_every=0",
            f"checkpoint.every_steps={args.base_steps}", "checkpoint.keep=1", "train.log_every=25"]


def train_base(args, runs: pathlib.Path, data: dict) -> dict:
    """The plain base (configs/control-base-tiny.yaml's network) trained on task A as (question, answer) pairs."""
    from mathlm.train.config import load_config
    from mathlm.train.loop import train
    base_dir = runs / "base"
    info_path = runs / "base_info.json"
    if info_path.is_file() and (base_dir / "checkpoints").is_dir():
        return json.loads(info_path.read_text())
    if base_dir.exists():
        shutil.rmtree(base_dir)
    overrides = base_overrides(data, args)
    cfg = load_config(CONFIGS / "control-base-tiny.yaml", overrides)
    t0 = time.perf_counter()
    last = train(cfg, base_dir, show_progress=False)
    train_s = time.perf_counter() - t0
    ev = Evaluator(data, args.n_eval)
    eng = ev.load(base_dir)
    acc_a, acc_b = ev.accuracy(eng, "A"), ev.accuracy(eng, "B")
    info = {"run": str(base_dir), "config": "configs/control-base-tiny.yaml", "overrides": overrides,
            "params": cfg.model.param_count(), "train_seconds": train_s, "final_loss": last.get("loss"),
            "task_a_accuracy": acc_a["accuracy"], "task_b_accuracy": acc_b["accuracy"], "eval_A": acc_a,
            "eval_B": acc_b, "wall_seconds": time.perf_counter() - t0}
    info_path.write_text(json.dumps(info, indent=1))
    print("base", json.dumps({k: v for k, v in info.items() if not k.startswith("eval_")}), flush=True)
    return info


# ----------------------------------------------------------------------------- 2. frozen_is_frozen

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


# ----------------------------------------------------------------------------- 3. forgetting: the methods

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


# ----------------------------------------------------------------------------- 4. merge_back_delta

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


# ----------------------------------------------------------------------------- main

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
