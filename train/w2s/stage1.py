"""Stage I: the weak model's and the strong model's (4-shot) answers, the final-answer consistency filter, LoRA
SFT of the strong base on each kept set, and the next rounds' regeneration (Figure 3 of the paper;
`construct_weak_icl_data`)."""
from __future__ import annotations

import json
import random

from mathlm.data import answers
from mathlm.data import w2s as sel
from mathlm.data.sources import DataError
from mathlm.train.w2s import generation, models, splits
from mathlm.train.w2s.context import Ctx, demo_prefix, zero_shot_items
from mathlm.train.w2s.manifest import read_jsonl, write_json, write_jsonl

# ----------------------------------------------------------------------------- models of the synthetic setting


def prepare_data(ctx: Ctx) -> dict:
    out = splits.prepare(ctx.cfg, ctx.workdir)
    return {name: sum(1 for _ in open(p)) for name, p in out.items() if p.is_file()}


def pretrain(ctx: Ctx, which: str) -> dict:
    """Pretrain the strong (or weak) network on the synthetic corpus (causal LM on packed documents)."""
    section = getattr(ctx.cfg, which)
    run = ctx.strong if which == "strong" else ctx.weak_base
    n_docs = sum(1 for _ in open(ctx.data["pretrain"]))
    model = {"vocab_size": 1024, "max_seq_len": 512, **section.model, "init_from": None, "variant": None}
    raw = ctx.run_config(which, model, ctx.data["pretrain"], "lm", section.pretrain, n_docs, objective="causal_lm")
    return models.fit(run, raw, section.pretrain, ctx.key, ctx.log, ctx.show_progress)


def weak_sft(ctx: Ctx) -> dict:
    """m = the weak base fine-tuned on split-1 gold solutions (full fine-tuning)."""
    base = ctx.weak_base if ctx.cfg.weak.pretrain is not None else ctx.cfg.weak.run
    gold = splits.labelled(ctx.data["split1"])
    data = ctx.workdir / "models" / "weak_sft.jsonl"
    write_jsonl(data, [{"question": r["question"], "answer": r["answer"]} for r in gold])
    raw = ctx.run_config("weak", models.base_model_section(base), data, "sft", ctx.cfg.weak.sft, len(gold),
                              objective="sft", init_from=base)
    return models.fit(ctx.weak, raw, ctx.cfg.weak.sft, ctx.key, ctx.log, ctx.show_progress)


# ----------------------------------------------------------------------------- generation


def weak_gen(ctx: Ctx, r: int = 1) -> dict:
    """D^r_weak: round 1 the weak model m, later rounds M^{r-1}_weak-ft; zero-shot, greedy."""
    run = ctx.weak if r == 1 else ctx.round_model(r - 1, "weak")
    return _zero_shot(ctx, run, ctx.round_dir(r) / "weak_gen.jsonl")


def _zero_shot(ctx: Ctx, run, out) -> dict:
    qs = splits.questions(ctx.data["split2"])
    engine = ctx.engine(run)
    items = zero_shot_items(qs)
    rows = ctx.generate(engine, items, ctx.greedy(engine, [it.prompt for it in items]), out)
    return {"questions": len(rows), "answered": sum(bool(r["answer"]) for r in rows)}


def draw_demos(ctx: Ctx) -> list[dict]:
    """k split-2 questions with a non-empty weak answer, drawn with demos.seed; their D1_weak solutions verbatim
    (not checked for correctness: the reference's Llama2-7b demos are 3 of 4 wrong). demos.file overrides."""
    d = ctx.cfg.demos
    if d.file:
        try:
            demos = json.loads(open(d.file, encoding="utf-8").read())
            demos = [{"id": x.get("id", f"demo-{i}"), "question": x["question"], "response": x["response"]}
                     for i, x in enumerate(demos)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"demos.file {d.file}: expected a JSON list of {{question, response}} ({e})") from None
    else:
        usable = [r for r in read_jsonl(ctx.round_dir(1) / "weak_gen.jsonl") if r["answer"]]
        if d.k > len(usable):
            raise DataError(f"demos.k={d.k} is more than the {len(usable)} split-2 questions the weak model "
                            "answered")
        demos = [{"id": r["id"], "question": r["question"], "response": r["response"]}
                 for r in random.Random(d.seed).sample(usable, d.k)]
    write_json(ctx.demos_file, demos)
    return demos


def icl_gen(ctx: Ctx, r: int = 1) -> dict:
    """D1_icl: the strong base M, 4-shot with the weak demonstrations; later rounds M^{r-1}_icl-ft zero-shot."""
    if r > 1:
        return _zero_shot(ctx, ctx.round_model(r - 1, "icl"), ctx.round_dir(r) / "icl_gen.jsonl")
    demos = draw_demos(ctx)
    prefix = demo_prefix(demos)
    qs = splits.questions(ctx.data["split2"])
    items = [generation.Item(it.id, prefix + it.prompt, 0, it.extra) for it in zero_shot_items(qs)]
    engine = ctx.engine(ctx.strong)
    rows = ctx.generate(engine, items, ctx.greedy(engine, [it.prompt for it in items]),
                        ctx.round_dir(1) / "icl_gen.jsonl")
    return {"questions": len(rows), "answered": sum(bool(x["answer"]) for x in rows), "demos": len(demos)}


def regen(ctx: Ctx, r: int) -> dict:
    """Round r >= 2: D^r_weak from M^{r-1}_weak-ft and D^r_icl from M^{r-1}_icl-ft, both zero-shot."""
    return {"weak": weak_gen(ctx, r), "icl": icl_gen(ctx, r)}


# ----------------------------------------------------------------------------- filter


def filter_round(ctx: Ctx, r: int) -> dict:
    rd = ctx.round_dir(r)
    weak, icl = read_jsonl(rd / "weak_gen.jsonl"), read_jsonl(rd / "icl_gen.jsonl")
    sets = sel.filter_sets(weak, icl, ctx.cfg.stage1.agree, ctx.cfg.numeric)
    for name, rows in sets.items():
        write_jsonl(rd / f"kept_{name}.jsonl", rows)
    kept = len(sets["weak"])
    stats = {"round": r, "questions": len(weak), "kept": kept, "kept_fraction": kept / max(len(weak), 1),
             **_label_analysis(ctx, weak, icl, {x["id"] for x in sets["weak"]})}
    write_json(rd / "stats.json", stats)
    ctx.log(f"  round {r}: kept {kept} of {len(weak)} questions ({stats['kept_fraction']:.1%})"
            + (f"; kept-label accuracy {stats['kept_label_accuracy']:.1%} (weak accuracy "
               f"{stats['weak_accuracy']:.1%})" if "kept_label_accuracy" in stats else ""))
    return stats


def gold_of(ctx: Ctx) -> dict[str, str] | None:
    """Split-2 gold final answers, for the analysis columns only (None when split 2 has no labels)."""
    rows = [rec for rec in read_jsonl(ctx.data["split2"])]
    if not rows or not all(rec.get("reference") for rec in rows):
        return None
    return {rec["id"]: rec["reference"] for rec in rows}


def _label_analysis(ctx: Ctx, weak: list[dict], icl: list[dict], kept: set[str]) -> dict:
    gold = gold_of(ctx)
    if gold is None:
        return {}
    ok = lambda rec: answers.is_correct(rec["answer"] or None, gold[rec["id"]], ctx.cfg.numeric)  # noqa: E731
    weak_ok = {x["id"] for x in weak if ok(x)}
    icl_ok = {x["id"] for x in icl if ok(x)}
    n_kept = max(len(kept), 1)
    return {"weak_accuracy": len(weak_ok) / max(len(weak), 1), "icl_accuracy": len(icl_ok) / max(len(icl), 1),
            "kept_label_accuracy": len(kept & weak_ok) / n_kept, "kept_icl_label_accuracy": len(kept & icl_ok) / n_kept,
            "correct_weak_recall": len(kept & weak_ok) / max(len(weak_ok), 1)}


# ----------------------------------------------------------------------------- SFT


def sft_records(rows: list[dict]) -> list[dict]:
    """{prompt, response} training records: the prompt line ends at "Answer:"; the stored response is stripped,
    so the separating space the model generates is put back (the response is what follows the prompt).
    deviation: LLaMA-Factory's `vanilla` template with Llama's SentencePiece needs no such space; our byte-level
    BPE encodes it as part of the response (docs/w2s.md)."""
    return [{"prompt": x["prompt"], "response": " " + x["response"]} for x in rows]


def sft_strong(ctx: Ctx, records: list[dict], run, data_name: str) -> dict:
    """Fresh LoRA adapters on the original strong base M (every round starts again from M)."""
    if not records:
        raise DataError(f"{data_name}: no training examples (the filter kept no question)")
    data = run.parent / f"{run.name}_data.jsonl"
    write_jsonl(data, records)
    lora = {"name": "lora", **ctx.cfg.lora}
    raw = ctx.run_config("strong", models.base_model_section(ctx.strong), data, "sft", ctx.cfg.stage1.sft,
                         len(records), objective="sft", init_from=ctx.strong, variant=lora)
    return models.fit(run, raw, ctx.cfg.stage1.sft, ctx.key, ctx.log, ctx.show_progress)
