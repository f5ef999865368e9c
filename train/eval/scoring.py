"""Sampling metrics for `mathlm eval`: pass@k, maj@k, and the coverage power law with its plot.

- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
  Codex paper, fig. 3): 1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i),
  which never forms the huge binomials.
- maj@k: majority vote (self-consistency, Wang et al. 2022) over k-subsets of the n samples, averaged.
- coverage: pass@k as a function of k follows log(coverage) ≈ a·k^b ("Large Language Monkeys", Brown et al.
  2024, eq. 2); we fit it by least squares on log(-log coverage) = log(-a) + b·log k.
"""
from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Sequence

from mathlm.data.sources import as_path

MAJ_SUBSETS = 1000


def check_sample_budget(n_samples: int, ks: Sequence[int]) -> None:
    """ValueError with one line when a requested k exceeds the samples drawn per problem."""
    if n_samples < 1:
        raise ValueError(f"need at least 1 sample per problem, got {n_samples}")
    bad = [k for k in ks if k < 1 or k > n_samples]
    if bad:
        raise ValueError(f"pass@{bad[0]} needs 1 <= k <= samples per problem, but only {n_samples} are drawn; "
                         f"raise the sample count to {max(bad)} or drop k={', '.join(map(str, bad))}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn without replacement from n of which c are correct,
    is correct (Chen et al. 2021). 1.0 when fewer than k samples are wrong."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(correct_counts: Sequence[int], n_samples: int | Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems, for each k. `n_samples` is one count for all problems or one per problem."""
    if not correct_counts:
        raise ValueError("no problems to summarize")
    ns = [n_samples] * len(correct_counts) if isinstance(n_samples, int) else list(n_samples)
    if len(ns) != len(correct_counts):
        raise ValueError(f"{len(correct_counts)} correct counts but {len(ns)} sample counts")
    check_sample_budget(min(ns), ks)
    return {k: sum(pass_at_k(n, c, k) for n, c in zip(ns, correct_counts)) / len(ns) for k in ks}


def _vote(indices: Sequence[int], answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer among `indices` (in ascending sample order) is correct."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i in indices:
        a = answers[i]
        if a is None:  # an invalid extraction never gets a vote
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return False
    best = max(counts.values())
    winner = min((first[a], a) for a, n in counts.items() if n == best)[1]  # tie: earliest sample wins
    return bool(correct[first[winner]])


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int, n_subsets: int = MAJ_SUBSETS,
             seed: int = 0) -> float:
    """Majority-vote accuracy with k of the n samples, averaged over k-subsets.

    Grouping: answers are grouped by exact string equality, so pass canonical keys
    (mathlm.data.answers.answer_key: "1,000" and "1000.0" become "1000"); None (no extraction) never wins,
    and a subset with only None votes counts as wrong. Ties: the tied answer that appears first in sample
    order wins. A group's correctness is that of its earliest sample (equal keys grade alike).
    Subsets: when C(n, k) <= n_subsets every subset is enumerated (exact; k == n is the single full set),
    otherwise n_subsets uniform random subsets are drawn with `seed`.
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"{n} answers but {len(correct)} correctness flags")
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} needs 1 <= k <= n samples, got n={n}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    if math.comb(n, k) <= n_subsets:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [sorted(rng.sample(range(n), k)) for _ in range(n_subsets)]
    return sum(_vote(s, answers, correct) for s in subsets) / len(subsets)


def summarize_majority(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]],
                       ks: Sequence[int], n_subsets: int = MAJ_SUBSETS, seed: int = 0) -> dict[int, float]:
    """Mean maj@k over problems (one list of answer keys and correctness flags per problem)."""
    if not answers:
        raise ValueError("no problems to summarize")
    return {k: sum(maj_at_k(a, c, k, n_subsets, seed + i) for i, (a, c) in enumerate(zip(answers, correct)))
            / len(answers) for k in ks}


def coverage_fit(ks: Sequence[float], coverage: Sequence[float]) -> tuple[float, float]:
    """(a, b) of coverage ≈ exp(a·k^b) (Brown et al. 2024), by least squares of log(-log c) on log k.

    Points with coverage 0 or 1 carry no finite information on that scale and are left out; with fewer than
    two usable points (or all at one k) the fit is (nan, nan). Exact power-law data is recovered exactly.
    """
    points = [(math.log(k), math.log(-math.log(c))) for k, c in zip(ks, coverage) if k > 0 and 0 < c < 1]
    if len(points) < 2:
        return math.nan, math.nan
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return math.nan, math.nan
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    a = -math.exp(mean_y - b * mean_x)
    return a, b


def plot_coverage(path: str, ks: Sequence[float], coverage: Sequence[float],
                  fit: tuple[float, float] | None = None, title: str = "coverage") -> str:
    """Write a PNG of coverage (pass@k) against k on a log2 axis, with the fitted curve if it is finite."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("the coverage plot needs matplotlib (pip install matplotlib)") from None
    # Figure + Agg canvas directly, not pyplot: no global state, no display backend, safe off the main thread.
    fig = Figure(figsize=(5, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(ks, coverage, "o", label="measured")
    if fit is not None and all(math.isfinite(v) for v in fit):
        lo, hi = min(ks), max(ks)
        grid = [lo * (hi / lo) ** (i / 99) for i in range(100)] if hi > lo else [lo]
        a, b = fit
        ax.plot(grid, [math.exp(a * k**b) for k in grid], "-", label=f"exp({a:.3g}·k^{b:.3g})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("samples k")
    ax.set_ylabel("coverage (pass@k)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()  # rendered in memory, then written whole: `path` may be a URI (a gs:// run folder)
    fig.savefig(buf, format="png")
    as_path(path).write_bytes(buf.getvalue())
    return path
