"""The recipe's data: split 1 (labelled, trains the weak model), split 2 (questions only for every training
stage), the test split (evaluation only), and, in the synthetic setting, the strong model's pretraining corpus.

Every split is written to <workdir>/data/{split1,split2,test}.jsonl as {id, question, answer?} (answer = the
gold solution; split 2 keeps it only for the analysis columns and `eval`). Training stages read split 2 through
`questions`, which returns ids and question texts and nothing else.
"""
from __future__ import annotations

import pathlib
import random
import re

from mathlm.data import synth, tasks
from mathlm.data.sources import DataError, read_jsonl_records
from mathlm.train.w2s.config import W2SConfig
from mathlm.train.w2s.manifest import write_jsonl

SPLITS = ("split1", "split2", "test")
_CALC_RE = re.compile(r"<<[^<>]*>>")


def paths(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    d = workdir / "data"
    return {**{s: d / f"{s}.jsonl" for s in SPLITS}, "pretrain": d / "pretrain.jsonl"}


def gold_response(task: str, rec: dict) -> str:
    """The SFT target of a labelled record, as the reference builds it: GSM8K solutions without their `<<...>>`
    calculator notes (`data/process.py`), MATH as `solution The answer is: answer`."""
    if task == "math":
        return f"{str(rec['solution']).strip()} The answer is: {tasks.reference_of('math', rec, 'record')}"
    return _CALC_RE.sub("", str(rec["answer"])).strip()


def _normalised(task: str, path: str, prefix: str, need_answer: bool) -> list[dict]:
    out = []
    for i, (where, rec) in enumerate(read_jsonl_records(path)):
        try:
            question = tasks.question_of(task, rec, where)
        except DataError:
            raise DataError(f"{where}: a {task} record needs a question "
                            f"('{'problem' if task == 'math' else 'question'}' field)") from None
        row = {"id": str(rec.get("id", rec.get("unique_id", f"{prefix}-{i:06d}"))), "question": question}
        if need_answer or _has_answer(task, rec):
            row["answer"] = gold_response(task, rec)
            row["reference"] = tasks.reference_of(task, rec, where)
        out.append(row)
    if not out:
        raise DataError(f"{path}: no records")
    if len({r["id"] for r in out}) != len(out):
        raise DataError(f"{path}: question ids are not unique")
    return out


def _has_answer(task: str, rec: dict) -> bool:
    return bool(rec.get("solution" if task == "math" else "answer"))


def _synth_splits(cfg: W2SConfig) -> dict[str, list[dict]]:
    s = cfg.data.synth
    total = s.n_test + s.n_split2 + s.n_split1 + s.n_pretrain
    pool = synth.generate(synth.SynthConfig(n=total, seed=s.seed, max_steps=s.max_steps, max_value=s.max_value,
                                            val_fraction=0.0, test_fraction=0.0))
    rows = sorted((r for rs in pool.values() for r in rs), key=lambda r: r["id"])
    rows = [{"id": r["id"], "question": r["question"], "answer": r["answer"],
             "reference": synth.final_answer(r["answer"])} for r in rows]
    cut = [0, s.n_test, s.n_test + s.n_split2, s.n_test + s.n_split2 + s.n_split1, total]
    out = {name: rows[a:b] for name, a, b in zip(("test", "split2", "split1", "pretrain"), cut, cut[1:])}
    return out


def _pretrain_docs(pretrain: list[dict], held_out: list[dict], per_document: int) -> list[dict]:
    """Several problems per document in the qa layout, so the strong model also reads few-shot-like context."""
    banned = {r["question"] for r in held_out}
    overlap = [r["id"] for r in pretrain if r["question"] in banned]
    assert not overlap, f"pretraining corpus holds split-2/test questions: {overlap[:3]}"
    docs = []
    for i in range(0, len(pretrain), per_document):
        group = pretrain[i: i + per_document]
        docs.append({"text": "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in group)})
    return docs


def prepare(cfg: W2SConfig, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the splits (and the synthetic pretraining corpus); returns their paths."""
    d, out = cfg.data, paths(workdir)
    if d.source == "synth":
        splits = _synth_splits(cfg)
        write_jsonl(out["pretrain"], _pretrain_docs(splits.pop("pretrain"), splits["split2"] + splits["test"],
                                                    d.synth.per_document))
    else:
        splits = {"test": _normalised(cfg.task, d.test, "test", True)}
        if d.train:
            pool = _normalised(cfg.task, d.train, "train", True)
            order = list(range(len(pool)))
            random.Random(d.split_seed).shuffle(order)  # a seeded 50/50 split of the labelled questions
            half = len(pool) // 2
            splits["split1"] = sorted((pool[i] for i in order[:half]), key=lambda r: r["id"])
            splits["split2"] = sorted((pool[i] for i in order[half:]), key=lambda r: r["id"])
        else:
            splits["split1"] = _normalised(cfg.task, d.split1, "split1", True)
            splits["split2"] = _normalised(cfg.task, d.split2, "split2", False)
    if d.limit is not None:
        splits["split2"], splits["test"] = splits["split2"][: d.limit], splits["test"][: d.limit]
    texts = {name: {r["question"] for r in rows} for name, rows in splits.items()}
    if texts["test"] & (texts["split1"] | texts["split2"]):
        raise DataError("test questions also occur in split 1 or split 2: the splits must be disjoint")
    for name in SPLITS:
        write_jsonl(out[name], sorted(splits[name], key=lambda r: r["id"]))
    return out


def questions(path: pathlib.Path) -> list[dict]:
    """{id, question} of a split in id order: what every training stage may read of split 2."""
    rows = [{"id": rec["id"], "question": rec["question"]} for _, rec in read_jsonl_records(path)]
    return sorted(rows, key=lambda r: r["id"])


def labelled(path: pathlib.Path) -> list[dict]:
    """Records with gold (answer and reference); for split 1 SFT, eval and analysis only."""
    return [rec for _, rec in read_jsonl_records(path) if rec.get("answer")]
