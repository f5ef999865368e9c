"""Text sources: JSONL (`text`, or `question`/`answer` pairs), plain text, and Hugging Face datasets (`hf:NAME`).

Every source yields `Example(prompt, response)`. Plain documents have an empty prompt; question/answer pairs use
the zero-shot format our SFT trains and `mathlm eval` prompts with: "Question: …\nAnswer:" + " …".
Preference data (`data.format: pref`) is JSONL (or hf:) records with `prompt`, `chosen` and `rejected`; each
record yields two examples, (prompt, chosen) then (prompt, rejected), texts used verbatim (no chat template).

The one home of two things every reader shares: `read_jsonl_records` (JSON objects, one a line, errors naming
file:line, and for bytes that are not UTF-8 also the byte offset: `not_utf8`, behind `read_utf8` too; task files,
exemplar files, saved completions and prompt files are read through it) and the `hf:NAME[:CONFIG][:SPLIT]`
grammar (`parse_hf`, `load_hf`), whose default split is the caller's: `train` for training data, `test` for
evaluation tasks. `read_prompts` reads `mathlm generate --prompts` files.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import pathlib
import re
from collections.abc import Iterator

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+")


class DataError(ValueError):
    """A user mistake in data files; the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str

    @property
    def text(self) -> str:
        return self.prompt + self.response


def is_uri(path) -> bool:
    """An object-store or other URI (gs://bucket/x, s3://...; also gs:/bucket/x, as pathlib leaves a URI after a
    typed CLI option), not a local path. `hf:NAME` is not one (no slash after the colon)."""
    return _URI.match(os.fspath(path)) is not None


def as_path(path) -> pathlib.Path:
    """A local path as a pathlib.Path; a URI as an etils.epath.Path (gcsfs and the other fsspec stores), its
    "scheme://" restored if pathlib had folded it to "scheme:/". Both have the pathlib methods readers use."""
    s = os.fspath(path)
    if not is_uri(s):
        return pathlib.Path(s)
    from etils import epath
    scheme = _URI.match(s).group(1)
    _check_store(scheme)
    return epath.Path(_URI.sub(lambda m: m.group(1) + "://", s, count=1))


@functools.cache
def _check_store(scheme: str) -> None:
    """A URI whose fsspec store is not installed is one line naming what to install (gs://: the gcs extra)."""
    import fsspec
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        hint = "pip install 'mathlm[gcs]'" if scheme in ("gs", "gcs") else f"install the fsspec store for {scheme}://"
        raise DataError(f"{scheme}:// paths cannot be used here ({(str(e).splitlines() or [''])[0]}); {hint}") from None


def qa_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def expand(patterns: list[str]) -> list[str]:
    """Expand globs (in a URI, in its last part only); `hf:` names pass through. Missing files are an error naming
    them."""
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("hf:"):
            out.append(pat)
            continue
        matches = [pat]
        if any(c in pat for c in "*?["):
            p = as_path(pat)
            matches = sorted(str(m) for m in p.parent.glob(p.name)) if is_uri(pat) else sorted(glob.glob(pat))
        if not matches:
            raise DataError(f"no files match {pat!r}")
        for m in matches:
            if not as_path(m).is_file():
                raise DataError(f"data file not found: {m}")
            out.append(m)
    return out


def cannot_write(folder: str | pathlib.Path, e: OSError) -> str:
    """One line for a folder that cannot be created or written: read-only, or a path that runs through a file."""
    folder = as_path(folder)
    if is_uri(folder):
        return f"cannot write to {folder}: {e.strerror or e}"
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))
    return f"cannot write to {folder}: {why}"


def check_writable(folder: str | pathlib.Path) -> None:
    """Refuse, before anything is read or written, an output folder that could not be created or written: one of
    its parents is a file, or the nearest existing one is read-only (DataError "cannot write to ..."). A URI is
    not checked here: an object store's permissions show at the first write."""
    if is_uri(folder):
        return
    folder = pathlib.Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write to {folder}: {existing} is read-only")


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


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _pair_from_record(rec: dict, where: str) -> tuple[Example, Example]:
    """A preference record -> (prompt, chosen), (prompt, rejected); other fields (id, branch) are ignored."""
    for key in PAIR_FIELDS:
        if not isinstance(rec.get(key), str):
            what = "has no" if key not in rec else "has a non-string"
            raise DataError(f"{where}: a preference record needs string 'prompt', 'chosen' and 'rejected' fields; "
                            f"this one {what} {key!r}")
    return Example(rec["prompt"], rec["chosen"]), Example(rec["prompt"], rec["rejected"])


def not_utf8(path: str | pathlib.Path) -> DataError:
    """The DataError for a file that is not UTF-8 text, naming the file, the line and the byte offset of its first
    bad byte (text-mode reads only say "position N" of some internal chunk, so the file is scanned again)."""
    offset = 0
    with as_path(path).open("rb") as f:
        for lineno, line in enumerate(f, 1):  # b"\n" never occurs inside a multi-byte UTF-8 sequence
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at byte offset "
                                 f"{offset + e.start} of the file, column {e.start + 1} of the line); re-encode "
                                 "it as UTF-8")
            offset += len(line)
    return DataError(f"{path}: not UTF-8 text; re-encode it as UTF-8")


def _lines(path: str | pathlib.Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (universal newlines); DataError from `not_utf8` on a bad byte."""
    with as_path(path).open(encoding="utf-8") as f:
        try:
            yield from f
        except UnicodeDecodeError:
            raise not_utf8(path) from None


def read_utf8(path: str | pathlib.Path) -> str:
    """A whole UTF-8 text file; DataError from `not_utf8` on a bad byte."""
    try:
        return as_path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_jsonl_records(path: str | pathlib.Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a JSONL file, where = "path:line". DataError (one line, naming
    file:line) for a missing file, bytes that are not UTF-8, malformed JSON or a line that is not a JSON object."""
    if not as_path(path).is_file():
        raise DataError(f"file not found: {path}")
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        yield where, rec


def read_jsonl(path: str) -> Iterator[Example]:
    for where, rec in read_jsonl_records(path):
        yield _from_record(rec, where)


def read_prompts(path: str | pathlib.Path) -> list[str]:
    """Prompts for `mathlm generate --prompts`: a .jsonl file has `prompt` (used as is) or `question` (asked as
    "Question: …\nAnswer:") per line; any other file is one prompt per non-blank line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    if path.suffix != ".jsonl":
        return [line for line in read_utf8(path).splitlines() if line.strip()]
    prompts = []
    for where, rec in read_jsonl_records(path):
        if "prompt" in rec:
            prompts.append(str(rec["prompt"]))
        elif "question" in rec:
            prompts.append(qa_prompt(str(rec["question"])))
        else:
            raise DataError(f"{where}: a prompts line needs a 'prompt' (or 'question') field")
    return prompts


def read_text(path: str) -> Iterator[Example]:
    """A plain-text file: documents separated by blank lines."""
    doc: list[str] = []
    for line in _lines(path):
        if line.strip():
            doc.append(line)
        elif doc:
            yield Example("", "".join(doc).rstrip("\n"))
            doc = []
    if doc:
        yield Example("", "".join(doc).rstrip("\n"))


@dataclasses.dataclass(frozen=True)
class HfSpec:
    dataset: str
    config: str | None
    split: str


def parse_hf(name: str, default_split: str) -> HfSpec:
    """`hf:NAME[:CONFIG][:SPLIT]`: two parts are NAME:SPLIT, three NAME:CONFIG:SPLIT; no (or an empty) split means
    default_split, the caller's: `train` for training data, `test` for evaluation tasks."""
    dataset, *rest = name.removeprefix("hf:").split(":")
    if not dataset or len(rest) > 2:
        raise DataError(f"{name}: expected hf:NAME[:CONFIG][:SPLIT]")
    config = rest[0] if len(rest) == 2 else None
    return HfSpec(dataset, config or None, (rest[-1] if rest else "") or default_split)


def load_hf(name: str, default_split: str):
    """The `datasets.Dataset` an hf: name points at (needs `datasets` and the network); DataError if not."""
    spec = parse_hf(name, default_split)
    try:
        import datasets  # optional: only when the network allows
    except ImportError:
        raise DataError(f"{name}: reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
    except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
        first = (str(e).splitlines() or [""])[0]
        raise DataError(f"{name}: could not load from the Hugging Face hub ({type(e).__name__}: {first})") from None


def read_hf(name: str) -> Iterator[Example]:
    """Training examples from a Hugging Face dataset (default split: train)."""
    for i, rec in enumerate(load_hf(name, default_split="train")):
        yield _from_record(dict(rec), f"{name}[{i}]")


def read_pairs(path: str) -> Iterator[Example]:
    """A preference file (JSONL or hf:): chosen then rejected example of each record, in order."""
    if path.startswith("hf:"):
        records = ((f"{path}[{i}]", dict(rec)) for i, rec in enumerate(load_hf(path, default_split="train")))
    elif path.endswith((".jsonl", ".json")):
        records = read_jsonl_records(path)
    else:
        raise DataError(f"{path}: data.format=pref reads JSONL (or hf:) records with prompt/chosen/rejected")
    for where, rec in records:
        yield from _pair_from_record(rec, where)


def read_examples(paths: list[str], fmt: str = "lm") -> Iterator[Example]:
    """All examples of all files, in order (`fmt` = data.format: "pref" reads preference pairs, two examples per
    record; the others read text, question/answer or prompt/response records). Raises DataError for missing,
    empty or malformed input."""
    for path in expand(paths):
        n = 0
        if fmt == "pref":
            reader = read_pairs(path)
        elif path.startswith("hf:"):
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
