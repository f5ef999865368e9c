"""Run output: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), and a rich progress bar on stderr.

Only process 0 writes. Log lines go through the progress bar's console so they never garble the bar.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def truncate_after(path: pathlib.Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(k + "\n" for k in keep))


class RunLogger:
    def __init__(self, workdir: pathlib.Path, total_steps: int, enabled: bool = True, start_step: int = 0,
                 show_progress: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        self.progress = None
        if not enabled:
            return
        if start_step:
            truncate_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # optional
            self.tb = None
        if show_progress:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=False, refresh_per_second=4)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def info(self, msg: str) -> None:
        if self.enabled:
            console.print(msg, highlight=False)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if not isinstance(v, str) else v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.progress is not None and "loss" in row:
            stats = (f"loss {row['loss']:.4f}  {row.get('tokens_per_sec', 0):,.0f} tok/s  "
                     f"MFU {100 * row.get('mfu', 0):.1f}%")
            self.progress.update(self.task, completed=step, stats=stats)
        elif self.progress is None and "loss" in row:
            self.info(f"step {step}: loss {row['loss']:.4f}")

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


class Throughput:
    """Tokens/s and MFU over a logging interval, from wall time between host syncs."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.t0 = time.perf_counter()

    def interval(self, tokens: int) -> dict:
        now = time.perf_counter()
        dt, self.t0 = max(now - self.t0, 1e-9), now
        tps = tokens / dt
        return {"tokens_per_sec": tps, "mfu": tps * self.flops_per_token / self.peak if self.peak else 0.0}

    def reset(self) -> None:
        self.t0 = time.perf_counter()
