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

from mathlm.train.paths import LineLog, is_remote, run_path

# soft_wrap: a pod job's log (stderr not a terminal, rich's width 80) keeps each line whole
console = Console(stderr=True, soft_wrap=True)


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
        workdir = run_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        self.progress = None
        if not enabled:
            return
        # Every step appears once: rows past the restored step are dropped, and a start from step 0 (no
        # checkpoint yet, e.g. killed before the first save) begins the log again.
        if start_step:
            truncate_after(self.path, start_step)
        elif self.path.is_file():
            self.path.write_text("")
        self.file = LineLog(self.path)
        self.total, self.start_step, self.t0 = total_steps, start_step, time.perf_counter()
        show_progress = show_progress and console.is_terminal  # a bar only on a terminal; else plain lines
        try:
            from tensorboardX import SummaryWriter
            self.tb = None if is_remote(workdir) else SummaryWriter(str(workdir / "tb"))  # local runs only
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
            self.info(self.plain_line(step, row))

    def plain_line(self, step: int, row: dict) -> str:
        """One line per logging interval for logs that are not a terminal: step, loss, tok/s, MFU, ETA."""
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / done * (self.total - step) if done > 0 else 0.0
        h, rem = divmod(int(eta), 3600)
        return (f"step {step}/{self.total}  loss {row['loss']:.4f}  {row.get('tokens_per_sec', 0):,.0f} tok/s  "
                f"MFU {100 * row.get('mfu', 0):.1f}%  ETA {h}:{rem // 60:02d}:{rem % 60:02d}")

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
