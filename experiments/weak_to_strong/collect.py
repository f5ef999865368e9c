"""Collect the synthetic weak-to-strong experiment: the pipeline's results.json and PNG, the six checks of the
expected shape (issue 14 / the paper's Llama2-7b -> 70b GSM8K run) with the figures measured, and the run times.

    mathlm w2s run configs/w2s-synth.yaml --workdir runs/w2s-synth      # the experiment itself
    python experiments/weak_to_strong/collect.py runs/w2s-synth        # -> experiments/weak_to_strong/
"""
from __future__ import annotations

import json
import pathlib
import platform
import shutil
import sys

HERE = pathlib.Path(__file__).parent
# The paper, GSM8K, Llama2-7b weak -> Llama2-70b strong (greedy %; ORPO secondhand; ../shared/research/w2s.md §4).
PAPER = {"weak": 33.81, "naive": 42.38, "weak_icl": 59.06, "m_plus": 62.62, "orpo": 68.16, "ceiling": 71.95,
         "weak_label_accuracy": 41.37, "kept_label_accuracy": 89.82, "kept_fraction_round1": 38.3,
         "kept_fraction_round2": 57.5, "clean_rate": 79.5, "pgr_naive": 22.5, "pgr_m_plus": 75.5}


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def checks(res: dict) -> list[dict]:
    acc, rounds, pairs = res["accuracy"], res["rounds"], res["pairs"]
    m_plus, pgr = res["m_plus"], res.get("pgr", {})
    best_po = max(acc.get("dpo", 0), acc.get("orpo", 0))
    out = [
        ("filter label accuracy far above the weak model's, on 30-55% of the questions",
         f"weak {res.get('weak_label_accuracy', 0):.1%} -> kept {res.get('kept_label_accuracy', 0):.1%} on "
         f"{rounds[0]['kept_fraction']:.1%}",
         res.get("kept_label_accuracy", 0) > res.get("weak_label_accuracy", 1) + 0.2
         and 0.30 <= rounds[0]["kept_fraction"] <= 0.55),
        ("naive only a little above the weak floor (PGR ~10-25%)", f"PGR naive {_pct(pgr.get('naive'))}",
         pgr.get("naive") is not None and 0.0 <= pgr["naive"] <= 0.30),
        ("M_plus far above naive (PGR ~65-75%)", f"PGR M_plus {_pct(pgr.get(m_plus))}",
         pgr.get(m_plus) is not None and pgr[m_plus] >= 0.5 and acc[m_plus] > acc.get("naive", 0)),
        ("round 2 at least as good as round 1 and keeps more questions",
         f"hybrid {acc['round1_hybrid']:.1%} -> {acc.get('round2_hybrid', 0):.1%}; kept "
         f"{rounds[0]['kept']} -> {rounds[-1]['kept']}",
         len(rounds) > 1 and acc.get("round2_hybrid", 0) >= acc["round1_hybrid"]
         and rounds[1]["kept"] > rounds[0]["kept"]),
        ("DPO and ORPO at least as good as M_plus", f"M_plus {acc[m_plus]:.1%}, DPO {acc.get('dpo', 0):.1%}, "
         f"ORPO {acc.get('orpo', 0):.1%}", best_po >= acc[m_plus]),
        ("about 80% of the pairs clean", f"clean {pairs.get('clean_rate', 0):.1%} of {pairs['pairs']} pairs",
         0.7 <= pairs.get("clean_rate", 0) <= 0.9),
    ]
    return [{"expected": e, "measured": m, "holds": bool(h)} for e, m, h in out]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(workdir: str) -> None:
    wd = pathlib.Path(workdir)
    res = json.loads((wd / "results.json").read_text())
    seconds = {}
    for p in sorted((wd / "done").glob("*.json")):
        m = json.loads(p.read_text())
        seconds[m["unit"]] = m["seconds"]
    out = {"config": "configs/w2s-synth.yaml", "cpu": _cpu(), "results": res, "checks": checks(res),
           "paper_gsm8k_llama2_7b_70b": PAPER, "seconds_per_unit": seconds,
           "minutes_total": round(sum(seconds.values()) / 60, 1)}
    (HERE / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.copy(wd / "results.png", HERE / "results.png")
    for c in out["checks"]:
        print(f"[{'x' if c['holds'] else ' '}] {c['expected']}: {c['measured']}")
    print(f"total {out['minutes_total']} min on {out['cpu']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/w2s-synth")
