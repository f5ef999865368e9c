"""`mathlm w2s status W`: one line per unit of the pipeline the workdir's saved config describes."""
from __future__ import annotations

import json
import pathlib

from mathlm.data.sources import DataError
from mathlm.train.w2s import pipeline
from mathlm.train.w2s.config import load
from mathlm.train.w2s.context import Ctx
from mathlm.train.w2s.manifest import Manifests


def _partial(ctx: Ctx, unit: pipeline.Unit) -> str | None:
    for out in unit.outputs(ctx):
        p = out.with_name(out.name + ".partial")
        if p.is_file():
            lines = p.read_text(encoding="utf-8").splitlines()
            try:
                total = json.loads(lines[0])["batches"]
            except (IndexError, ValueError, KeyError):
                return "partial"
            return f"partial ({len(lines) - 1}/{total} batches)"
    return None


def table(workdir: pathlib.Path) -> str:
    cfg_file = workdir / "config.yaml"
    if not cfg_file.is_file():
        raise DataError(f"{workdir}: not a w2s workdir (no config.yaml; start one with `mathlm w2s run CONFIG "
                        f"--workdir {workdir}`)")
    cfg = load(cfg_file)
    ctx = Ctx(cfg, workdir.absolute())
    units = pipeline.units_of(cfg)
    states, man = pipeline.states(ctx, units), Manifests(ctx.workdir)
    width = max(len(u.name) for u in units)
    lines = [f"{'step':9s} {'unit':{width}s} state"]
    for u in units:
        state = states[u.name]
        if state == "done":
            m = man.read(u.name)
            state = f"done  {m['finished']}  {m['seconds']:.0f} s"
        elif state == "pending":
            state = _partial(ctx, u) or "pending"
        lines.append(f"{u.step:9s} {u.name:{width}s} {state}")
    n_done = sum(s == "done" for s in states.values())
    lines.append(f"{n_done} of {len(units)} units done")
    return "\n".join(lines)
