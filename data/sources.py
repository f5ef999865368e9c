"""Text sources: JSONL (`text`, or `question`/`answer` pairs), plain text, and Hugging Face datasets (`hf:NAME`).

Every source yields `Example(prompt, response)`. Plain documents have an empty prompt; question/answer pairs use
the zero-shot format our SFT trains and `mathlm eval` prompts with: "Question: …\nAnswer:" + " …".
"""
from __future__ import annotations

import dataclasses
import glob
import json
import pathlib
from typing import Iterator


class DataError(ValueError):
    """A user mistake in data files; the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str

    @property
    def text(self) -> str:
        return self.prompt + self.response


def qa_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def expand(patterns: list[str]) -> list[str]:
    """Expand globs; `hf:` names pass through. Missing files are an error naming them."""
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("hf:"):
            out.append(pat)
            continue
        matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not matches:
            raise DataError(f"no files match {pat!r}")
        for m in matches:
            if not pathlib.Path(m).is_file():
                raise DataError(f"data file not found: {m}")
            out.append(m)
    return out


def _from_record(rec: dict, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    if isinstance(rec.get("text"), str):
        return Example("", rec["text"])
    if "question" in rec and "answer" in rec:
        return Example(qa_prompt(str(rec["question"])), " " + str(rec["answer"]).strip())
    if "prompt" in rec and "response" in rec:
        return Example(str(rec["prompt"]), str(rec["response"]))
    raise DataError(f"{where}: needs a 'text' field or 'question'/'answer' (or 'prompt'/'response') fields")


def read_jsonl(path: str) -> Iterator[Example]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            yield _from_record(rec, f"{path}:{lineno}")


def read_text(path: str) -> Iterator[Example]:
    """A plain-text file: documents separated by blank lines."""
    doc: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc.append(line)
            elif doc:
                yield Example("", "".join(doc).rstrip("\n"))
                doc = []
    if doc:
        yield Example("", "".join(doc).rstrip("\n"))


def read_hf(name: str) -> Iterator[Example]:
    spec = name[3:]
    dataset, _, split = spec.partition(":")
    try:
        import datasets  # optional: only when the network allows
    except ImportError:
        raise DataError(f"{name}: Hugging Face datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(dataset, split=split or "train")
    except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
        raise DataError(f"{name}: could not load from the Hugging Face hub ({type(e).__name__})") from None
    for i, rec in enumerate(ds):
        yield _from_record(dict(rec), f"{name}[{i}]")


def read_examples(paths: list[str]) -> Iterator[Example]:
    """All examples of all files, in order. Raises DataError for missing, empty or malformed input."""
    for path in expand(paths):
        n = 0
        if path.startswith("hf:"):
            reader = read_hf(path)
        elif path.endswith((".jsonl", ".json")):
            reader = read_jsonl(path)
        else:
            reader = read_text(path)
        for ex in reader:
            n += 1
            yield ex
        if n == 0:
            raise DataError(f"{path}: no examples (empty file?)")
