"""Stage II: M_plus samples every split-2 question n times, a majority vote against the original weak model's
answer picks preference pairs, and DPO or ORPO trains a new adapter on the merged M_plus (M_pro)
(`construct_majority_voting_data`, `construct_paired_data_{gsm8k,math}`)."""
from __future__ import annotations

import collections
import random

from mathlm.data import answers
from mathlm.data import w2s as sel
from mathlm.data.sources import DataError
from mathlm.train.w2s import generation, models, splits
from mathlm.train.w2s.context import Ctx, zero_shot_items
from mathlm.train.w2s.manifest import read_jsonl, write_json, write_jsonl
from mathlm.train.w2s.stage1 import gold_of


def sample(ctx: Ctx) -> dict:
    """Merge M_plus's adapter into the base (what Stage II samples from and preference training starts from),
    then n samples per split-2 question at stage2.temperature, sample s with seed stage2.seed + s."""
    s2 = ctx.cfg.stage2
    ctx.log(f"  merging {ctx.m_plus} into {ctx.m_plus_merged}")
    models.merge_lora(ctx.m_plus, ctx.m_plus_merged)
    qs = splits.questions(ctx.data["split2"])
    items = [generation.Item(it.id, it.prompt, s2.seed + s, (("sample", s),))
             for s in range(s2.n) for it in zero_shot_items(qs, with_question=False)]
    engine = ctx.engine(ctx.m_plus_merged)
    sampling = ctx.sampled(engine, [it.prompt for it in items[: len(qs)]], s2.temperature, s2.top_p)
    rows = ctx.generate(engine, items, sampling, ctx.stage2 / "samples.jsonl")
    return {"questions": len(qs), "samples": len(rows)}


def _by_id(rows: list[dict]) -> dict[str, list[dict]]:
    out = collections.defaultdict(list)
    for r in rows:
        out[r["id"]].append(r)
    return out


def strong_only_pairs(questions, samples, rule: sel.PairRule) -> tuple[list[dict], dict]:
    """Ablation: pairs from M_plus's samples alone (a positive against a negative of the vote), no weak side."""
    from mathlm.data.sources import qa_prompt
    rng, pairs = random.Random(rule.seed), []
    skips = dict.fromkeys(sel.SKIP_REASONS, 0)
    for q in sorted(questions, key=lambda r: r["id"]):
        v = sel.vote(sorted(samples[q["id"]], key=lambda s: s["sample"]))
        reason = ("no_answer" if not v.answer else "low_confidence" if v.confidence < rule.tau
                  else "no_negatives" if not v.neg else "")
        if reason:
            skips[reason] += 1
            continue
        pairs.append({"id": q["id"], "prompt": qa_prompt(q["question"]), "chosen": rng.choice(v.pos),
                      "rejected": rng.choice(v.neg), "branch": "strong_only"})
    return pairs, {"pairs": len(pairs), "questions": len(questions), "strong_only": len(pairs), "skipped": skips}


def pairs(ctx: Ctx) -> dict:
    """Pairs against w = the original weak model's greedy response (D1_weak), in id order, one RNG."""
    qs = splits.questions(ctx.data["split2"])
    samples = _by_id(read_jsonl(ctx.stage2 / "samples.jsonl"))
    weak = {r["id"]: r for r in read_jsonl(ctx.round_dir(1) / "weak_gen.jsonl")}
    rule = ctx.cfg.pair_rule
    if ctx.cfg.pairs.weak_side:
        made, stats = sel.build_pairs(qs, samples, weak, rule, ctx.cfg.numeric)
    else:
        made, stats = strong_only_pairs(qs, samples, rule)
    write_jsonl(ctx.stage2 / "pairs.jsonl", made)
    stats.update(_pair_analysis(ctx, made))
    write_json(ctx.stage2 / "stats.json", stats)
    ctx.log(f"  {stats['pairs']} pairs ({stats.get('weak_chosen', 0)} weak-chosen, "
            f"{stats.get('weak_rejected', 0)} weak-rejected); skipped {stats['skipped']}"
            + (f"; clean {stats['clean_rate']:.1%}" if "clean_rate" in stats else ""))
    return stats


def _pair_analysis(ctx: Ctx, made: list[dict]) -> dict:
    gold = gold_of(ctx)
    if gold is None or not made:
        return {}
    task, numeric = ctx.cfg.task, ctx.cfg.numeric
    right = lambda p, side: answers.is_correct(sel.final_answer(p[side], task) or None, gold[p["id"]], numeric)  # noqa: E731
    chosen = [right(p, "chosen") for p in made]
    rejected = [right(p, "rejected") for p in made]
    n = len(made)
    return {"chosen_correct": sum(chosen) / n, "rejected_correct": sum(rejected) / n,
            "clean_rate": sum(c and not r for c, r in zip(chosen, rejected)) / n}


def po(ctx: Ctx, method: str) -> dict:
    """M_pro: a new zero-init LoRA adapter on the merged M_plus, trained with DPO (reference = adapters off =
    M_plus exactly) or ORPO (no reference)."""
    made = read_jsonl(ctx.stage2 / "pairs.jsonl")
    if not made:
        raise DataError("stage2/pairs.jsonl has no pairs: nothing for preference optimisation (lower pairs.tau?)")
    data = ctx.stage2 / "models" / f"{method}_data.jsonl"
    # The stored responses are stripped; the space after "Answer:" is put back, as in SFT.
    write_jsonl(data, [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]}
                       for p in made])
    p = ctx.cfg.po
    objective = {"name": "dpo", "beta": p.beta} if method == "dpo" else {"name": "orpo", "lam": p.lam}
    raw = ctx.run_config("strong", models.base_model_section(ctx.m_plus_merged), data, "pref", p.train, len(made),
                         objective=objective, init_from=ctx.m_plus_merged, variant={"name": "lora", **ctx.cfg.lora})
    run = ctx.po_model(method)
    last = models.fit(run, raw, p.train, ctx.key, ctx.log, ctx.show_progress)
    if method == "dpo":
        last["step0_loss"] = check_dpo_start(run)
    return {"pairs": len(made), **{k: last[k] for k in last if k.startswith(("loss", "step0", "rewards"))}}


def check_dpo_start(run) -> float:
    """The DPO loss of the initial policy on the first logged step's batch must be log 2: policy = reference
    (a zero-init adapter on M_plus, the reference being the adapters switched off)."""
    from mathlm.train.objectives.preference import initial_loss
    return initial_loss(run)
