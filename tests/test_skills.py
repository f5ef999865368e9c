"""data/skills.py: the task-B generators of experiments/control_llm (answers, splits, grading)."""
import json

import pytest

from mathlm.data import skills
from mathlm.data.sources import read_jsonl


def test_solve_each_skill():
    assert skills.solve("reverse", "4821") == ("Reverse the digits 4821.", "1284")
    assert skills.solve("sort", "4821") == ("Sort the digits 4821.", "1248")
    assert skills.solve("base2", "37") == ("Write 37 in base 2.", "100101")
    with pytest.raises(ValueError, match="unknown skill"):
        skills.solve("rot13", "12")


def test_generate_unique_disjoint_deterministic():
    cfg = skills.SkillConfig("reverse", n=400, seed=3, min_len=3, max_len=5)
    a, b = skills.generate(cfg), skills.generate(cfg)
    assert a == b
    questions = [r["question"] for split in a.values() for r in split]
    assert len(questions) == len(set(questions)) == 400
    assert a["test"] and a["validation"]  # ~5% each
    for split in a.values():
        for r in split:
            digits = r["question"].removeprefix("Reverse the digits ").removesuffix(".")
            assert 3 <= len(digits) <= 5 and digits[0] != "0"
            assert r["answer"] == digits[::-1]


def test_bad_configs():
    with pytest.raises(ValueError, match="min_len"):
        skills.SkillConfig(min_len=4, max_len=3).validate()
    with pytest.raises(ValueError, match="more than half"):
        skills.SkillConfig(n=100, min_len=1, max_len=2).validate()


def test_grade_exact_first_line():
    assert skills.grade(" 1284", "1284")
    assert skills.grade(" 1284.\nQuestion: more", "1284")
    assert not skills.grade(" 12845", "1284")
    assert not skills.grade(" He has 1284 stickers.\n#### 1284", "1284")
    assert not skills.grade("", "1284")


def test_jsonl_reads_as_qa_pairs(tmp_path):
    paths = skills.write_jsonl(skills.generate(skills.SkillConfig("sort", n=50)), tmp_path)
    first = json.loads(paths["train"].read_text().splitlines()[0])
    ex = next(read_jsonl(str(paths["train"])))
    assert ex.prompt == f"Question: {first['question']}\nAnswer:" and ex.response == " " + first["answer"]
