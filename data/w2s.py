"""Weak-to-strong data selection, no model involved (Yang, Ma, Liu 2024; GAIR-NLP/weak-to-strong-reasoning).

  final_answer   the reference's `src/eval/evaluation.py::test_answer`: cut at "Question", a last-line `#### X`
                 (gsm8k, synth) or `The answer is: X` (math), else the first number after a last-line
                 `The answer is `; then `canonical` (its `normalize_final_answer`). "" = no answer.
  agree          exact string equality of canonical answers (the reference; no sympy), or `equiv`: the grader's
                 equivalence (a documented option).
  keep           Stage I's final-answer consistency filter (`construct_weak_icl_data`).
  vote / pairs   Stage II's majority vote and preference pairs (`construct_majority_voting_data`,
                 `construct_paired_data_{gsm8k,math}`).
"""
from __future__ import annotations

import collections
import dataclasses
import random
import re
from collections.abc import Sequence

from mathlm.data import answers

NUMERIC_KEY, MATH_KEY = "####", "The answer is:"
_NUMBER_RE = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+")
# Minerva's normalize_final_answer lists (Lewkowycz et al. 2022, appendix), which the reference's normaliser uses.
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
            "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
            "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots"]
AGREE_MODES = ("exact", "equiv")


def canonical(answer: str) -> str:
    """One spelling per final answer: the text after the last `=`, spaces, `$`, `,` in numbers and units removed,
    `\\boxed{}`/`\\text{}` unwrapped, `3.00` -> `3`, `50%` -> `50`."""
    s = answer.strip().removesuffix("</s>").split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        s = s.replace(before, after)
    for expr in _REMOVED:
        s = s.replace(expr, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", s)
    for macro in ("text", "textbf", "overline"):
        s = re.sub(rf"(\\{macro}\{{)(.*?)(\}})", r"\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", s)  # greedy, as Minerva's: the box may hold braces
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)
    s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)
    s = s.replace("$", "").replace("\\%", "").replace("%", "").strip().rstrip(".")
    if s.replace(",", "").replace(".", "", 1).lstrip("-").isdigit():
        number = answers.parse_number(s)
        if number is not None:
            return answers.canonical_number(number)
    return s


def final_answer(text: str, task: str) -> str:
    """The canonical final answer of a response ("" when it states none), as the reference's test_answer."""
    text = text.split("Question")[0].strip()
    key = MATH_KEY if task == "math" else NUMERIC_KEY
    found = re.findall(rf"{re.escape(key)} (.*)$", text)  # no MULTILINE: only a key on the last line counts
    if found:
        return canonical(found[0])
    last = text.split("\n")[-1]
    if "The answer is " in last:  # the reference's answer_cleansing fallback
        number = _NUMBER_RE.search(last.split("The answer is ", 1)[1])
        return canonical(number.group(0)) if number else ""
    return ""


def clean_response(text: str) -> str:
    """The stored response: the reference's `text.strip().strip(".")` (after generation stopped)."""
    return text.strip().strip(".")


def agree(a: str, b: str, mode: str = "exact", numeric: bool = True) -> bool:
    """Whether two canonical answers are the same answer; an empty answer agrees with nothing."""
    if not a or not b:
        return False
    if mode == "exact":
        return a == b
    return answers.is_correct(a, b, numeric)


# ----------------------------------------------------------------------------- Stage I: consistency filter

def keep(weak_answer: str, icl_answer: str, mode: str = "exact", numeric: bool = True) -> bool:
    """Keep q iff the weak answer is non-empty and agrees with the ICL answer."""
    return agree(weak_answer, icl_answer, mode, numeric)


def filter_sets(weak: Sequence[dict], icl: Sequence[dict], mode: str = "exact",
                numeric: bool = True) -> dict[str, list[dict]]:
    """weak/icl: {id, question, response, answer} per question (same ids). Returns the three training sets on
    the kept questions in id order: weak, icl and hybrid ([weak, icl] per question), as {id, prompt, response}."""
    from mathlm.data.sources import qa_prompt
    icl_by = {r["id"]: r for r in icl}
    if set(icl_by) != {r["id"] for r in weak}:
        raise ValueError("weak and ICL generations cover different questions")
    sets: dict[str, list[dict]] = {"weak": [], "icl": [], "hybrid": []}
    for w in sorted(weak, key=lambda r: r["id"]):
        i = icl_by[w["id"]]
        if not keep(w["answer"], i["answer"], mode, numeric):
            continue
        prompt = qa_prompt(w["question"])
        pair = [{"id": w["id"], "prompt": prompt, "response": r["response"]} for r in (w, i)]
        sets["weak"].append(pair[0])
        sets["icl"].append(pair[1])
        sets["hybrid"].extend(pair)
    return sets


# ----------------------------------------------------------------------------- Stage II: vote and pairs

@dataclasses.dataclass(frozen=True)
class Vote:
    answer: str  # a+: the most common non-empty answer ("" when every sample has none)
    confidence: float  # votes(a+) / n, n counting the samples without an answer
    pos: list[str]  # responses whose answer is a+
    neg: list[str]  # all other responses, answerless ones included


def vote(samples: Sequence[dict]) -> Vote:
    """samples: {response, answer} in sample order. Ties go to the first-seen answer (Counter.most_common)."""
    counts = collections.Counter(s["answer"] for s in samples if s["answer"])
    if not counts:
        return Vote("", 0.0, [], [s["response"] for s in samples])
    top, n_top = counts.most_common(1)[0]
    pos = [s["response"] for s in samples if s["answer"] == top]
    neg = [s["response"] for s in samples if s["answer"] != top]
    return Vote(top, n_top / len(samples), pos, neg)


@dataclasses.dataclass(frozen=True)
class PairRule:
    tau: float = 0.6  # skip below this confidence
    tau_flip: float = 0.8  # the strong answer overrules a disagreeing weak one from this confidence
    max_per_question: int = 1  # 1 for gsm8k and synth (construct_paired_data_gsm8k), 3 for math
    seed: int = 42
    agree: str = "exact"

    def validate(self) -> None:
        if not 0 < self.tau <= self.tau_flip <= 1:
            raise ValueError(f"need 0 < tau <= tau_flip <= 1, got tau={self.tau}, tau_flip={self.tau_flip}")
        if self.max_per_question < 1:
            raise ValueError(f"pairs.max_per_question must be >= 1, got {self.max_per_question}")


SKIP_REASONS = ("low_confidence", "no_answer", "no_negatives", "uncertain_disagreement")


def _pairs_for(weak: dict, v: Vote, rule: PairRule, rng: random.Random, numeric: bool) -> tuple[list, str]:
    """(pairs as (chosen, rejected, branch), skip reason or "")."""
    m = rule.max_per_question
    if not v.answer:
        return [], "no_answer"
    if v.confidence < rule.tau:
        return [], "low_confidence"
    w = weak["response"]
    if agree(weak["answer"], v.answer, rule.agree, numeric):
        if not v.neg:
            return [], "no_negatives"  # "too easy"
        # gsm8k: random.sample(neg, 1) always; math: random.sample(neg, 3) only when there are more than 3.
        negs = rng.sample(v.neg, min(m, len(v.neg))) if m == 1 or len(v.neg) > m else list(v.neg)
        return [(w, r, "weak_chosen") for r in negs], ""
    if v.confidence >= rule.tau_flip:  # an empty weak answer always lands here
        first = rng.sample(v.pos, 1)[0]
        chosen = [first]
        # deviation: the reference compares a further positive's text with the first one only; we require it to
        # differ from every positive taken, so the (up to 3) pairs are distinct.
        for p in v.pos:  # further positives, in sample order
            if len(chosen) >= m:
                break
            if p not in chosen:
                chosen.append(p)
        return [(c, w, "weak_rejected") for c in chosen], ""
    return [], "uncertain_disagreement"


def build_pairs(questions: Sequence[dict], samples: dict[str, list[dict]], weak: dict[str, dict],
                rule: PairRule, numeric: bool = True) -> tuple[list[dict], dict]:
    """questions: {id, question}; samples[id]: {sample, response, answer}; weak[id]: the original weak model's
    greedy {response, answer}. Questions are visited in id order with one random.Random(rule.seed), as the
    reference (which seeds once per call and walks its file in order)."""
    from mathlm.data.sources import qa_prompt
    rule.validate()
    rng = random.Random(rule.seed)
    pairs, skips = [], dict.fromkeys(SKIP_REASONS, 0)
    for q in sorted(questions, key=lambda r: r["id"]):
        rows = sorted(samples[q["id"]], key=lambda s: s["sample"])
        made, reason = _pairs_for(weak[q["id"]], vote(rows), rule, rng, numeric)
        if reason:
            skips[reason] += 1
        for chosen, rejected, branch in made:
            pairs.append({"id": q["id"], "prompt": qa_prompt(q["question"]), "chosen": chosen,
                          "rejected": rejected, "branch": branch})
    stats = {"pairs": len(pairs), "questions": len(questions),
             "weak_chosen": sum(p["branch"] == "weak_chosen" for p in pairs),
             "weak_rejected": sum(p["branch"] == "weak_rejected" for p in pairs), "skipped": skips}
    return pairs, stats
