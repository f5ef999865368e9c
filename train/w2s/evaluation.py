"""`w2s eval` and `w2s report`: greedy zero-shot test accuracy of every model of the recipe and its baselines,
pass@k at temperature 1, performance gap recovered, and results.json (+ a Figure-4-style PNG).

Baselines trained here (they read labels or all of D1_weak, so they are evaluation, not training stages): naive =
M fine-tuned on all of D1_weak (wrong and empty answers included); ceiling = M fine-tuned with the same recipe on
split-2 gold solutions. Gold is read only here and by the stage statistics' analysis columns."""
from __future__ import annotations

import json
import pathlib

from mathlm.data import answers
from mathlm.data.sources import qa_prompt
from mathlm.train.w2s import generation, splits
from mathlm.train.w2s.context import Ctx, demo_prefix, zero_shot_items
from mathlm.train.w2s.manifest import read_jsonl, write_json
from mathlm.train.w2s.stage1 import sft_records, sft_strong


def baseline_model(ctx: Ctx, name: str) -> pathlib.Path:
    return ctx.workdir / "eval" / "models" / name


def train_baseline(ctx: Ctx, name: str) -> dict:
    if name == "naive":
        rows = read_jsonl(ctx.round_dir(1) / "weak_gen.jsonl")
        records = sft_records([{"prompt": qa_prompt(r["question"]), "response": r["response"]} for r in rows])
    else:
        gold = splits.labelled(ctx.data["split2"])
        records = [{"prompt": qa_prompt(r["question"]), "response": " " + r["answer"]} for r in gold]
    return sft_strong(ctx, records, baseline_model(ctx, name), f"{name} baseline")


def has_gold_split2(ctx: Ctx) -> bool:
    rows = read_jsonl(ctx.data["split2"]) if ctx.data["split2"].is_file() else []
    return bool(rows) and all(r.get("answer") for r in rows)


def models_to_score(ctx: Ctx) -> dict[str, tuple[pathlib.Path, bool]]:
    """name -> (run, with the weak demonstrations)."""
    cfg = ctx.cfg
    out = {"weak": (ctx.weak, False), "strong": (ctx.strong, False), "weak_icl": (ctx.strong, True)}
    if cfg.eval.naive:
        out["naive"] = (baseline_model(ctx, "naive"), False)
    for r in range(1, cfg.stage1.rounds + 1):
        for v in cfg.stage1.variants:
            out[f"round{r}_{v}"] = (ctx.round_model(r, v), False)
    for m in cfg.po.methods:
        out[m] = (ctx.po_model(m), False)
    if cfg.eval.ceiling:
        out["ceiling"] = (baseline_model(ctx, "ceiling"), False)
    return out


def pass_models(ctx: Ctx) -> list[str]:
    names = [f"round{ctx.cfg.stage1.rounds}_hybrid", *ctx.cfg.po.methods]
    return names + (["ceiling"] if ctx.cfg.eval.ceiling else [])


def score(ctx: Ctx, name: str, samples: bool = False) -> dict:
    """Greedy accuracy (or, `samples`, pass@k at T = 1) of one model on the test split -> eval/<name>.json."""
    run, icl = models_to_score(ctx)[name]
    test = splits.labelled(ctx.data["test"])
    prefix = demo_prefix(json.loads(ctx.demos_file.read_text())) if icl else ""
    base = [generation.Item(it.id, prefix + it.prompt, 0, it.extra) for it in zero_shot_items(test, False)]
    engine = ctx.engine(run)
    folder = ctx.workdir / "eval"
    if samples:
        k = ctx.cfg.eval.pass_k
        # deviation: seeds 1000 + s (the reference's vLLM seeds are 0..9), apart from Stage II's stage2.seed + s
        items = [generation.Item(it.id, it.prompt, 1000 + s, (("sample", s),)) for s in range(k) for it in base]
        sampling = ctx.sampled(engine, [it.prompt for it in base], 1.0, 1.0)
        rows = ctx.generate(engine, items, sampling, folder / f"{name}_pass{k}.jsonl")
    else:
        rows = ctx.generate(engine, base, ctx.greedy(engine, [it.prompt for it in base]), folder / f"{name}.jsonl")
    gold = {r["id"]: r["reference"] for r in test}
    correct = {}
    for r in rows:
        ok = answers.is_correct(r["answer"] or None, gold[r["id"]], ctx.cfg.numeric)
        correct[r["id"]] = correct.get(r["id"], False) or ok
    result = {"model": str(run), "problems": len(test), "accuracy": sum(correct.values()) / len(test)}
    key = f"pass@{ctx.cfg.eval.pass_k}" if samples else "accuracy"
    result = {**result, key: result.pop("accuracy")}
    write_json(folder / f"{name}{'_pass' if samples else ''}.json", result)
    ctx.log(f"  {name}: {key} {result[key]:.1%}")
    return result


def pgr(acc: float, weak: float, ceiling: float) -> float | None:
    """Performance gap recovered (Burns et al. 2023)."""
    return None if ceiling == weak else (acc - weak) / (ceiling - weak)


def report(ctx: Ctx) -> dict:
    cfg, folder = ctx.cfg, ctx.workdir / "eval"
    acc = {n: json.loads((folder / f"{n}.json").read_text())["accuracy"] for n in models_to_score(ctx)}
    k = cfg.eval.pass_k
    passk = {n: json.loads((folder / f"{n}_pass.json").read_text())[f"pass@{k}"] for n in pass_models(ctx)
             if (folder / f"{n}_pass.json").is_file()}
    m_plus = f"round{cfg.stage1.rounds}_hybrid"
    rounds = [json.loads((ctx.round_dir(r) / "stats.json").read_text()) for r in range(1, cfg.stage1.rounds + 1)]
    out = {"task": cfg.task, "accuracy": acc, f"pass@{k}": passk, "m_plus": m_plus, "rounds": rounds,
           "pairs": json.loads((ctx.stage2 / "stats.json").read_text())}
    if "weak_accuracy" in rounds[0]:
        out["weak_label_accuracy"] = rounds[0]["weak_accuracy"]
        out["kept_label_accuracy"] = rounds[0]["kept_label_accuracy"]
    if "ceiling" in acc:
        out["pgr"] = {n: pgr(acc[n], acc["weak"], acc["ceiling"])
                      for n in ["naive", m_plus, *cfg.po.methods] if n in acc}
    write_json(ctx.workdir / "results.json", out)
    _plot(ctx, out)
    return {"models": len(acc)}


def _plot(ctx: Ctx, res: dict) -> None:
    """Figure-4-style: accuracy per round for weak/icl/hybrid-ft, weak floor and ceiling lines; Stage II bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        ctx.log("  [yellow]matplotlib is not installed: results.json written, no plot")
        return
    acc, cfg = res["accuracy"], ctx.cfg
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = list(range(1, cfg.stage1.rounds + 1))
    for v in cfg.stage1.variants:
        left.plot(rounds, [100 * acc[f"round{r}_{v}"] for r in rounds], marker="o", label=f"{v}-ft")
    lines = (("weak", "--", "gray"), ("ceiling", ":", "gray"), ("naive", "-.", "gray"),
             ("weak_icl", (0, (1, 3)), "gray"), ("strong", "--", "tab:red"))
    for name, style, color in lines:
        if name in acc:
            left.axhline(100 * acc[name], linestyle=style, color=color,
                         label="strong zero-shot" if name == "strong" else name)
    left.set(xlabel="round", ylabel="test accuracy (%)", xticks=rounds, title="Stage I")
    left.legend(fontsize=8)
    bars = [n for n in ["weak", "naive", "strong", "weak_icl", res["m_plus"], *cfg.po.methods, "ceiling"]
            if n in acc]
    right.bar(range(len(bars)), [100 * acc[n] for n in bars], color="tab:blue")
    right.set_xticks(range(len(bars)), [n.replace("_hybrid", "\nhybrid") for n in bars], fontsize=8)
    right.set(ylabel="test accuracy (%)", title="M_plus -> M_pro (Stage II)")
    fig.tight_layout()
    fig.savefig(ctx.workdir / "results.png", dpi=110)
    plt.close(fig)
