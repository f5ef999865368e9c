"""Small synthetic skills beside the word problems: a "task B" for continual-training experiments
(experiments/control_llm/, the Control-LLM forgetting table).

Each skill turns a random digit string into a (question, answer) pair whose answer is a short digit string:

  reverse  "Reverse the digits 4821." -> "1284"
  sort     "Sort the digits 4821." -> "1248"
  base2    "Write 37 in base 2." -> "100101"   (decimal -> binary; the number has min_len..max_len digits)

Records carry `question` and `answer` (plus `id` and `skill`), the fields `data/sources.py` reads as a
question/answer pair: training on them with `data.format: sft` uses the prompt "Question: {q}\\nAnswer:" and the
response " {answer}", exactly the zero-shot layout of the word problems, so only the skill differs. Digits are
single tokens under mathlm's tokenizer (digits are pre-split), so any tokenizer trained on the word problems reads
them. `grade` is exact match of the completion's first line against the answer. Splits are chosen by a hash of
the question, so a question never appears in two splits.
"""
from __future__ import annotations

import dataclasses
import random

from mathlm.data.synth import split_of, write_jsonl  # noqa: F401  (write_jsonl: the same JSONL splits)

SKILLS = ("reverse", "sort", "base2")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SkillConfig:
    skill: str = "reverse"
    n: int = 20000  # unique problems over all splits
    seed: int = 0
    min_len: int = 3  # digits of the random string
    max_len: int = 6
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    def validate(self) -> None:
        if self.skill not in SKILLS:
            raise ValueError(f"unknown skill {self.skill!r}; choose one of {', '.join(SKILLS)}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}..{self.max_len}")
        if self.n < 0 or self.val_fraction < 0 or self.test_fraction < 0 or \
                self.val_fraction + self.test_fraction >= 1:
            raise ValueError("need n >= 0, fractions >= 0 and val_fraction + test_fraction < 1")
        space = sum(9 * 10 ** (k - 1) for k in range(self.min_len, self.max_len + 1))
        if self.n > space // 2:
            raise ValueError(f"n={self.n} is more than half of the {space} strings of {self.min_len}-"
                             f"{self.max_len} digits; lower n or raise max_len")


def solve(skill: str, digits: str) -> tuple[str, str]:
    """(question, answer) for one digit string (no leading zero)."""
    if skill == "reverse":
        return f"Reverse the digits {digits}.", digits[::-1]
    if skill == "sort":
        return f"Sort the digits {digits}.", "".join(sorted(digits))
    if skill == "base2":
        return f"Write {digits} in base 2.", format(int(digits), "b")
    raise ValueError(f"unknown skill {skill!r}; choose one of {', '.join(SKILLS)}")


def generate(cfg: SkillConfig) -> dict[str, list[dict]]:
    """cfg.n unique problems (lengths uniform in min_len..max_len), split by question hash."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    while len(seen) < cfg.n:
        k = rng.randint(cfg.min_len, cfg.max_len)
        digits = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(k - 1))
        question, answer = solve(cfg.skill, digits)
        if question in seen:
            continue
        seen.add(question)
        split, digest = split_of(question, cfg)
        splits[split].append({"id": f"{cfg.skill}-{digest[:16]}", "question": question, "answer": answer,
                              "skill": cfg.skill})
    return splits


def extract(completion: str) -> str:
    """The answer a completion gives: its first non-empty line, stripped (and a trailing period dropped)."""
    for line in completion.strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".").strip()
    return ""


def grade(completion: str, answer: str) -> bool:
    """Exact match of the extracted answer."""
    return extract(completion) == answer.strip()
