"""Evaluation tasks: task files -> problems, prompt formats, answer extractors, and re-grading saved completions.

Tasks and their JSONL fields:

  synth  `id`, `question`, `answer` (worked solution ending in `#### N`; the built-in corpus, data/synth.py)
  gsm8k  `question`, `answer` (GSM8K, Cobbe et al. 2021; reference = the `#### N` line)
  math   `problem`, `solution`, `answer` (MATH, Hendrycks et al. 2021, and MATH-500; without `answer` the
         reference is the last `\\boxed{}` of `solution`); id from `unique_id`
  svamp  `ID`, `Body`, `Question`, `Answer` (Patel et al. 2021; question = Body + " " + Question)
  mawps  `input`, `target` (MAWPS, Koncel-Kedziorski et al. 2016, as released by PAL)

Prompt styles (exemplar files and their provenance: data/exemplars/README.md):

  qa       zero-shot "Question: {q}\\nAnswer:", the layout our SFT trains (sources.qa_prompt)
  boxed    zero-shot qa with the instruction "Please reason step by step, and put your final answer within
           \\boxed{}." (the Qwen2.5-Math / DeepSeek-R1 evaluation prompt)
  lm-eval  GSM8K 5-shot of lm-evaluation-harness `gsm8k`: "Question: …\\nAnswer: …" blocks, "\\n\\n" apart
  cot      GSM8K 8-shot chain of thought of Wei et al. 2022 (lm-eval `gsm8k-cot`): "Q: …\\nA: … The answer is N."
  minerva  MATH 4-shot of Lewkowycz et al. 2022 (lm-eval `minerva_math`): "Problem:\\n…\\n\\nSolution: …"

Default style by shot count: 0 -> qa; GSM8K-like tasks 5 -> lm-eval, 8 -> cot; math 4 -> minerva.
Each task and style has an ordered tuple of extractors (answers.EXTRACTORS); the first gives `correct`
(accuracy), the others are reported alongside, as lm-evaluation-harness reports strict and flexible match.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Iterable, Iterator

from mathlm.data import answers
from mathlm.data.sources import DataError, qa_prompt, read_jsonl_records, read_utf8

EXEMPLAR_DIR = pathlib.Path(__file__).parent / "exemplars"
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_NUMERIC_EXTRACTORS = {
    "qa": ("strict-match", "flexible-extract"),
    "lm-eval": ("strict-match", "flexible-extract"),
    "cot": ("answer-is", "flexible-extract"),
    "boxed": ("boxed", "flexible-extract"),
}
_MATH_EXTRACTORS = {"qa": ("boxed", "minerva"), "minerva": ("minerva", "boxed"), "boxed": ("boxed", "minerva")}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    numeric: bool  # graded by the GSM8K number rule; False: MATH normalisation + symbolic equivalence
    id_field: str
    reference_fields: tuple[str, ...]  # any one of them gives the reference
    default_styles: dict[int, str]  # shots -> style
    extractors: dict[str, tuple[str, ...]]  # style -> extractor names, primary first


_GSM_LIKE = {"numeric": True, "default_styles": {0: "qa", 5: "lm-eval", 8: "cot"}, "extractors": _NUMERIC_EXTRACTORS}
TASKS = {
    "synth": Task("synth", id_field="id", reference_fields=("answer",), **_GSM_LIKE),
    "gsm8k": Task("gsm8k", id_field="id", reference_fields=("answer",), **_GSM_LIKE),
    "svamp": Task("svamp", id_field="ID", reference_fields=("Answer",), **_GSM_LIKE),
    "mawps": Task("mawps", id_field="id", reference_fields=("target",), **_GSM_LIKE),
    "math": Task("math", numeric=False, id_field="unique_id", reference_fields=("answer", "solution"),
                 default_styles={0: "qa", 4: "minerva"}, extractors=_MATH_EXTRACTORS),
}


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    header: str  # how a problem starts; the model writing it again means it moved on to a new problem
    exemplar_file: str | None  # None: zero-shot

    def render(self, question: str) -> str:
        q = question.strip()
        if self.name == "boxed":
            return qa_prompt(f"{q} {BOXED_INSTRUCTION}")
        if self.name == "cot":
            return f"Q: {q}\nA:"
        if self.name == "minerva":
            return f"Problem:\n{q}\n\nSolution:"
        return qa_prompt(q)  # qa and lm-eval share "Question: {q}\nAnswer:"


STYLES = {
    "qa": Style("qa", "Question:", None),
    "boxed": Style("boxed", "Question:", None),
    "lm-eval": Style("lm-eval", "Question:", "gsm8k_5shot_lm_eval.json"),
    "cot": Style("cot", "Q:", "gsm8k_cot_8shot_wei2022.json"),
    "minerva": Style("minerva", "Problem:", "minerva_math_4shot.json"),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str
    reference: str  # the gold final answer, parsed out of the record
    record: dict = dataclasses.field(compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """A resolved task + style + shot count; build once, then call `prompt` per problem."""
    task: str
    style: str
    shots: int
    prefix: str  # the rendered exemplars and their delimiter; "" when zero-shot
    stop: tuple[str, ...]
    extractors: tuple[str, ...]

    def prompt(self, problem: Problem | str) -> str:
        question = problem.question if isinstance(problem, Problem) else problem
        return self.prefix + STYLES[self.style].render(question)


def get_task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def _check_style(spec: Task, style: str) -> Style:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    if style not in spec.extractors:
        raise ValueError(f"prompt style {style!r} does not apply to {spec.name}; use one of "
                         f"{', '.join(spec.extractors)}")
    return STYLES[style]


def extractor_names(task: str, style: str = "qa") -> tuple[str, ...]:
    """The task's extractors for this style, the primary (accuracy) one first."""
    spec = get_task(task)
    _check_style(spec, style)
    return spec.extractors[style]


def stop_strings(task: str, style: str = "qa") -> list[str]:
    """Where generation should stop: the model starting the next problem of the layout."""
    header = _check_style(get_task(task), style).header
    if STYLES[style].exemplar_file is None:
        return [f"\n{header}"]
    return [f"\n\n{header}", f"\n{header}"]  # the exemplar delimiter, and a model that drops one newline


def load_exemplars(path: str | pathlib.Path) -> list[tuple[str, str]]:
    """(question, worked answer) pairs from a JSON object with `exemplars`, a JSON list, or JSONL."""
    path = pathlib.Path(path)
    try:
        text = read_utf8(path)
    except OSError as e:
        raise DataError(f"exemplar file not found: {path} ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSONL
    if (isinstance(data, dict) and "exemplars" in data) or isinstance(data, list):
        records = data["exemplars"] if isinstance(data, dict) else data
        wheres = [f"{path}: exemplar {i + 1}" for i in range(len(records) if isinstance(records, list) else 0)]
    else:
        pairs = list(read_jsonl_records(path))
        wheres, records = [w for w, _ in pairs], [r for _, r in pairs]
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: no exemplars (expected {{'exemplars': [...]}}, a JSON list or JSONL)")
    out = []
    for where, rec in zip(wheres, records):
        question = _first_field(rec, ("question", "problem"), where)
        answer = _first_field(rec, ("answer", "target", "solution"), where)
        out.append((str(question).strip(), str(answer).strip()))
    return out


@functools.lru_cache(maxsize=64)
def resolve_format(task: str, shots: int | None = None, style: str | None = None,
                   exemplars: str | pathlib.Path | None = None) -> PromptFormat:
    """Validate a task/shots/style/exemplars combination (ValueError with one clear line) and render the
    few-shot prefix. shots=None means the style's own count (0, or every exemplar of its file)."""
    spec = get_task(task)
    if shots is not None and shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    few_shot = {s: STYLES[s].exemplar_file for s in spec.extractors if STYLES[s].exemplar_file}
    if style is None:
        style = spec.default_styles.get(shots or 0)
        if style is None:
            raise ValueError(f"no default prompt style for {shots}-shot {task}; pick a few-shot style "
                             f"({', '.join(few_shot)}) and at most as many shots as its file has")
    chosen = _check_style(spec, style)
    if chosen.exemplar_file is None:
        if shots:
            raise ValueError(f"prompt style {style!r} is zero-shot; use 0 shots or a few-shot style "
                             f"({', '.join(few_shot)})")
        if exemplars is not None:
            raise ValueError(f"an exemplar file needs a few-shot style ({', '.join(few_shot)}), not {style!r}")
        return PromptFormat(task, style, 0, "", tuple(stop_strings(task, style)), spec.extractors[style])
    source = pathlib.Path(exemplars) if exemplars is not None else EXEMPLAR_DIR / chosen.exemplar_file
    pairs = load_exemplars(source)
    if shots is None:
        shots = len(pairs)
    if shots == 0:
        raise ValueError(f"prompt style {style!r} is few-shot; use 1 to {len(pairs)} shots")
    if shots > len(pairs):
        raise ValueError(f"{shots} shots requested but {source} has only {len(pairs)} exemplars")
    blocks = [f"{chosen.render(q)} {a}" for q, a in pairs[:shots]]  # lm-eval target_delimiter " "
    prefix = "\n\n".join(blocks) + "\n\n"  # lm-eval fewshot_delimiter
    return PromptFormat(task, style, shots, prefix, tuple(stop_strings(task, style)), spec.extractors[style])


def build_prompt(problem: Problem | str, task: str, shots: int | None = None, style: str | None = None,
                 exemplars: str | pathlib.Path | None = None) -> str:
    return resolve_format(task, shots, style, exemplars).prompt(problem)


# ---------------------------------------------------------------- task files

def _field(rec: dict, name: str, where: str):
    if rec.get(name) is None:
        raise DataError(f"{where}: missing field '{name}'")
    return rec[name]


def _first_field(rec, names: tuple[str, ...], where: str):
    for name in names:
        if isinstance(rec, dict) and rec.get(name) is not None:
            return rec[name]
    raise DataError(f"{where}: missing field '{names[0]}'" + (f" (or {', '.join(names[1:])})" if names[1:] else ""))


def _number(rec: dict, name: str, where: str) -> str:
    value = _field(rec, name, where)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: field '{name}' is not a number")
    return answers.format_number(value)


def question_of(task: str, rec: dict, where: str) -> str:
    if task == "svamp":
        return f"{str(_field(rec, 'Body', where)).strip()} {str(_field(rec, 'Question', where)).strip()}"
    name = {"math": "problem", "mawps": "input"}.get(task, "question")
    return str(_field(rec, name, where)).strip()


def reference_of(task: str, rec: dict, where: str) -> str:
    """The gold final answer of a task record (rules in the module docstring)."""
    if task == "svamp":
        return _number(rec, "Answer", where)
    if task == "mawps":
        return _number(rec, "target", where)
    if task == "math":
        if str(rec.get("answer") or "").strip():
            return str(rec["answer"]).strip()
        boxed = answers.last_boxed(str(_first_field(rec, ("solution", "answer"), where)))
        if boxed is None:
            raise DataError(f"{where}: field 'solution' has no \\boxed{{}} answer and there is no 'answer'")
        return boxed
    reference = answers.gsm8k_reference(str(_field(rec, "answer", where)))
    if reference is None:
        raise DataError(f"{where}: field 'answer' has no '#### N' line")
    return reference


def load_problems(path: str | pathlib.Path, task: str, limit: int | None = None) -> list[Problem]:
    """The problems of a task file, in file order; `limit` keeps the first N. DataError names file:line."""
    get_task(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    problems: list[Problem] = []
    for where, rec in read_jsonl_records(path):
        if limit is not None and len(problems) >= limit:
            break
        own_id = rec.get(TASKS[task].id_field, rec.get("id"))
        problems.append(Problem(id=str(own_id) if own_id is not None else f"{task}-{len(problems)}",
                                question=question_of(task, rec, where), reference=reference_of(task, rec, where),
                                record=rec))
    if not problems and limit != 0:
        raise DataError(f"{path}: no problems (empty file?)")
    return problems


# ---------------------------------------------------------------- grading saved completions

def grade(completion: str, reference: str, task: str, style: str = "qa") -> dict:
    """Every extractor of the task/style on one completion; `extracted`/`correct` are the primary's."""
    spec = get_task(task)
    names = extractor_names(task, style)
    extracted_by = {name: answers.EXTRACTORS[name](completion) for name in names}
    correct_by = {name: answers.is_correct(value, reference, spec.numeric) for name, value in extracted_by.items()}
    return {"extracted": extracted_by[names[0]], "correct": correct_by[names[0]],
            "extracted_by": extracted_by, "correct_by": correct_by}


def _score(pairs: Iterable[tuple[str, dict]], task: str, style: str | None) -> Iterator[dict]:
    spec = get_task(task)
    for where, rec in pairs:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        rec_style = style or rec.get("style") or "qa"
        if rec.get("reference") is not None:
            if not isinstance(rec["reference"], (str, int, float)) or isinstance(rec["reference"], bool):
                raise DataError(f"{where}: 'reference' must be a string or a number, got {rec['reference']!r}")
            reference = answers.format_number(rec["reference"])
        elif any(rec.get(f) is not None for f in spec.reference_fields):
            reference = reference_of(task, rec, where)
        else:
            raise DataError(f"{where}: missing field 'reference' (or the {task} field "
                            f"{' / '.join(repr(f) for f in spec.reference_fields)})")
        if isinstance(rec.get("completion"), str):
            yield {**rec, "reference": reference, **grade(rec["completion"], reference, task, rec_style)}
        elif isinstance(rec.get("completions"), list):  # several samples of one problem
            grades = [grade(str(c), reference, task, rec_style) for c in rec["completions"]]
            yield {**rec, "reference": reference, "extracted": [g["extracted"] for g in grades],
                   "correct": [g["correct"] for g in grades], "n_correct": sum(g["correct"] for g in grades)}
        else:
            raise DataError(f"{where}: missing field 'completion'")


def score_records(records: Iterable[dict], task: str, style: str | None = None,
                  source: str = "record") -> Iterator[dict]:
    """Re-grade saved completions: each record has `completion` (or a list `completions`) and `reference` or
    the task's reference fields. Yields the record with `reference`, `extracted`, `correct` and, for a single
    completion, `extracted_by`/`correct_by` per extractor. The style comes from the argument, else the
    record's `style`, else qa. Errors name `{source}:{n}` (n counts records from 1)."""
    return _score(((f"{source}:{n}", rec) for n, rec in enumerate(records, 1)), task, style)


def score_file(path: str | pathlib.Path, task: str, style: str | None = None) -> Iterator[dict]:
    """score_records over a JSONL file, errors naming file:line."""
    return _score(read_jsonl_records(path), task, style)


def rescore_file(path: str | pathlib.Path, task: str, style: str | None = None,
                 out: str | pathlib.Path | None = None) -> tuple[int, int]:
    """`mathlm eval score`: score_file, the graded lines written to `out` when given; returns (correct, total) over
    every completion. Bad input is a DataError of one line (unknown task, missing file, file:line, no lines)."""
    try:
        scored = list(score_file(path, task, style))
    except ValueError as e:
        raise DataError(str(e)) from None
    if not scored:
        raise DataError(f"{path}: no lines")
    if out:
        with open(out, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in scored)
    flags = [c for rec in scored for c in (rec["correct"] if isinstance(rec["correct"], list) else [rec["correct"]])]
    return sum(flags), len(flags)


def accuracy_by_extractor(scored: Iterable[dict]) -> dict[str, float]:
    """Mean correctness per extractor over single-completion records from score_records."""
    totals: dict[str, list[int]] = {}
    for rec in scored:
        for name, ok in rec.get("correct_by", {}).items():
            hit = totals.setdefault(name, [0, 0])
            hit[0] += bool(ok)
            hit[1] += 1
    return {name: hits / n for name, (hits, n) in totals.items()}
