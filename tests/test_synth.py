"""Tests for the built-in synthetic GSM8K-style corpus (mathlm.data.synth)."""
import collections
import json
import re

import pytest

from mathlm.data import synth

SPLITS = ("train", "validation", "test")


def _records(splits):
    return [r for name in SPLITS for r in splits[name]]


@pytest.fixture(scope="module")
def default_splits():
    return synth.generate(synth.SynthConfig(n=3000, seed=0))


@pytest.mark.parametrize("cfg", [
    synth.SynthConfig(n=1500, seed=0),
    synth.SynthConfig(n=500, seed=1, min_steps=1, max_steps=1),
    synth.SynthConfig(n=500, seed=2, min_steps=5, max_steps=5),
    synth.SynthConfig(n=500, seed=3, min_steps=2, max_steps=3, max_value=20),
], ids=["default", "one-step", "five-step", "small-values"])
def test_every_record_verifies_and_is_well_formed(cfg):
    records = _records(synth.generate(cfg))
    assert len(records) == cfg.n
    for r in records:
        assert set(r) >= {"id", "question", "answer", "steps"}
        assert synth.verify(r), r
        n = synth.final_answer(r["answer"])
        assert re.fullmatch(r"\d+", n) and int(n) >= 0, r
        lines = r["answer"].split("\n")
        assert len(lines) == r["steps"] + 1 and lines[-1] == f"#### {n}"
        assert cfg.min_steps <= r["steps"] <= cfg.max_steps
        # No GSM8K calculator notes, no unfilled template fields, a real question at the end.
        text = r["question"] + r["answer"]
        assert "<<" not in text and "{" not in text and "}" not in text
        assert r["question"].endswith("?") and r["question"][0].isupper()
        # max_value bounds every number the question states.
        assert all(int(v) <= cfg.max_value for v in re.findall(r"\d+", r["question"])), r


def test_deterministic_by_seed():
    cfg = synth.SynthConfig(n=400, seed=7)
    assert synth.generate(cfg) == synth.generate(cfg)
    other = synth.generate(synth.SynthConfig(n=400, seed=8))
    assert other != synth.generate(cfg)
    assert {r["question"] for r in _records(other)} != {r["question"] for r in _records(synth.generate(cfg))}


def test_splits_disjoint_nonempty_and_follow_fractions(default_splits):
    questions = {name: {r["question"] for r in default_splits[name]} for name in SPLITS}
    assert all(questions[name] for name in SPLITS)
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    total = sum(len(default_splits[name]) for name in SPLITS)
    assert total == 3000 == sum(len(q) for q in questions.values())  # deduplicated
    assert abs(len(default_splits["validation"]) / total - 0.05) < 0.02
    assert abs(len(default_splits["test"]) / total - 0.05) < 0.02
    ids = [r["id"] for r in _records(default_splits)]
    assert len(set(ids)) == len(ids)


def test_split_depends_only_on_question_text():
    # Small numbers and one step make the two runs share questions; they must land in the same split.
    def split_of(seed):
        splits = synth.generate(synth.SynthConfig(n=2000, seed=seed, min_steps=1, max_steps=1, max_value=10,
                                                  val_fraction=0.2, test_fraction=0.2))
        return {r["question"]: name for name in SPLITS for r in splits[name]}

    a, b = split_of(0), split_of(1)
    shared = a.keys() & b.keys()
    assert len(shared) > 20
    assert all(a[q] == b[q] for q in shared)


def test_steps_vary_within_knobs(default_splits):
    counts = collections.Counter(r["steps"] for r in _records(default_splits))
    assert set(counts) == {1, 2, 3, 4, 5}
    assert min(counts.values()) > 300  # roughly uniform, not a token appearance
    narrow = synth.generate(synth.SynthConfig(n=600, seed=4, min_steps=2, max_steps=4))
    assert {r["steps"] for r in _records(narrow)} == {2, 3, 4}


def test_many_templates_appear(default_splits):
    templates = collections.Counter(r["template"] for r in _records(default_splits))
    assert len(templates) >= 8
    assert set(templates) == set(synth.TEMPLATE_NAMES)


def test_verify_rejects_tampering(default_splits):
    record = next(r for r in _records(default_splits) if r["steps"] >= 3)
    assert synth.verify(record)
    lines = record["answer"].split("\n")

    def with_lines(new_lines):
        return {**record, "answer": "\n".join(new_lines)}

    final = int(synth.final_answer(record["answer"]))
    assert not synth.verify(with_lines(lines[:-1] + [f"#### {final + 1}"]))
    # An intermediate result that is off by one.
    a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", lines[0]).groups()
    bad_first = lines[0].replace(f"{a} {op} {b} = {c}", f"{a} {op} {b} = {int(c) + 1}")
    assert not synth.verify(with_lines([bad_first] + lines[1:]))
    # A correct-looking equation whose operand appears nowhere in the question or earlier steps.
    forged = lines[0].replace(f"{a} {op} {b} = {c}", "987 + 1 = 988")
    assert not synth.verify(with_lines([forged] + lines[1:]))
    # Missing final line, or a step line without an equation.
    assert not synth.verify(with_lines(lines[:-1]))
    assert not synth.verify(with_lines(["We think hard about it."] + lines[1:]))
    assert not synth.verify({"question": record["question"]})


def test_final_answer():
    assert synth.final_answer("2 + 3 = 5 apples.\n#### 5") == "5"
    assert synth.final_answer("So 1000 + 234 = 1234.\n#### 1,234\n") == "1234"
    with pytest.raises(ValueError):
        synth.final_answer("no answer line")


def test_write_jsonl_round_trip(tmp_path):
    splits = synth.generate(synth.SynthConfig(n=300, seed=5))
    paths = synth.write_jsonl(splits, tmp_path / "out" / "synth")
    assert set(paths) == set(SPLITS)
    for name, path in paths.items():
        assert path == tmp_path / "out" / "synth" / f"{name}.jsonl"
        with open(path, encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == splits[name]


def test_rejects_bad_configs():
    with pytest.raises(ValueError):
        synth.generate(synth.SynthConfig(n=10, min_steps=3, max_steps=2))
    with pytest.raises(ValueError):
        synth.generate(synth.SynthConfig(n=10, max_steps=6))
    with pytest.raises(ValueError):
        synth.generate(synth.SynthConfig(n=10, val_fraction=0.6, test_fraction=0.5))


def test_raises_when_dedup_cannot_reach_n(monkeypatch):
    fixed = {"question": "Mia has 2 apples. How many apples does Mia have?", "answer": "#### 2",
             "steps": 1, "template": "collecting"}
    monkeypatch.setattr(synth, "_make_problem", lambda rng, cfg: dict(fixed))
    with pytest.raises(ValueError, match="unique problems"):
        synth.generate(synth.SynthConfig(n=5))


def test_data_section_chooses_the_max_value_and_names_its_folder(tmp_path):
    from mathlm.train.config import load_config
    cfg = load_config(None, ["data.synth_max_value=10", "data.synth_n=200"])
    sc = synth.SynthConfig.from_data(cfg.data)
    assert sc.max_value == 10
    paths = synth.ensure_splits(tmp_path, sc)
    assert paths["train"].parent.name == "synth-n200-s0-k5-v10"
    default = synth.split_paths(tmp_path, synth.SynthConfig.from_data(load_config(None, []).data))
    assert default["train"].parent.name == "synth-n20000-s0-k5"  # earlier runs' cached corpora keep their names
