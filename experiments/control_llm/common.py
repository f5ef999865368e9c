"""Shared by the Control-LLM experiments (run.py and its siblings): the paths, the machine record and results.json
I/O, the task data (task A: synthetic word problems; task B: a data/skills.py skill) with the greedy-accuracy
Evaluator, and the plain task-A base that `frozen`, `forgetting` and `mergeback` start from (trained once under
--runs, then reused).
"""
from __future__ import annotations

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
