"""Final-answer extraction and grading for math problems (no model involved).

Extractors take a model completion and return the final answer as a string, or None when the completion
has none in that format. Their names and regexes follow lm-evaluation-harness (EleutherAI, MIT), so numbers
are comparable with published results:

  strict-match      GSM8K `#### N`                       lm-eval gsm8k  `#### (\\-?[0-9\\.\\,]+)`, first match
  flexible-extract  last number anywhere                 lm-eval gsm8k  `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match
  answer-is         "The answer is N" (Wei et al. 2022)  lm-eval gsm8k-cot `The answer is (\\-?[0-9\\.\\,]+).`,
                    first match, widened to allow a currency sign and a missing final period
  boxed             last `\\boxed{…}` / `\\fbox{…}` with balanced braces (Hendrycks et al. 2021,
                    `last_boxed_only_string`)
  minerva           "Final Answer: The final answer is $X$. I hope it is correct." (Lewkowycz et al. 2022;
                    lm-eval minerva_math `get_unnormalized_answer`)

Grading (`is_correct`): an extraction of None is always wrong. Numeric tasks (GSM8K and friends) compare
numbers exactly after removing `,`, `$` and a trailing `.` (lm-eval gsm8k exact_match `regexes_to_ignore`).
MATH answers are compared after the Hendrycks `_strip_string` / Minerva `normalize_final_answer`
normalisation, then, when the strings still differ and are not both plain numbers, symbolically with
math-verify (HuggingFace, Apache-2.0). The symbolic check runs in a worker process with a hard timeout,
because math-verify's own timeout uses signal.alarm, which only works on the main thread and would also
clobber any SIGALRM the host program relies on.
"""
from __future__ import annotations

import atexit
import decimal
import functools
import logging
import multiprocessing.connection as mpc
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable

STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
ANSWER_IS_RE = re.compile(r"[Tt]he (?:final )?answer is:?\s*\\?\$?\s*(-?[0-9.,]*[0-9])")
# lm-eval's minerva_math regex verbatim, dots unescaped (so "$5$ I hope it is correct." also matches).
MINERVA_RE = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
_MINERVA_END = "I hope it is correct."

SYMBOLIC_TIMEOUT_S = 5
_log = logging.getLogger(__name__)


def extract_strict(text: str) -> str | None:
    m = STRICT_RE.search(text)
    return m.group(1) if m else None


def extract_flexible(text: str) -> str | None:
    matches = FLEXIBLE_RE.findall(text)
    if not matches:
        return None
    first_group, second_group = matches[-1]
    return first_group or second_group


def extract_answer_is(text: str) -> str | None:
    m = ANSWER_IS_RE.search(text)
    return m.group(1) if m else None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` or `\\fbox{…}` (braces balanced), or of `\\boxed N` up to `$`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):  # Hendrycks: "\boxed 5$" is the space-delimited form
        return rest[1:].split("$")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i].strip() or None
    return None  # unbalanced: the completion was cut off inside the box


def extract_minerva(text: str) -> str | None:
    # lm-eval appends the end sentence so a completion cut at the stop string still matches.
    m = MINERVA_RE.search(text + _MINERVA_END)
    if m is None:
        return None
    answer = m.group(1).strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer[1:-1].strip()
    return answer or None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "strict-match": extract_strict,
    "flexible-extract": extract_flexible,
    "answer-is": extract_answer_is,
    "boxed": extract_boxed,
    "minerva": extract_minerva,
}


def last_boxed(solution: str) -> str | None:
    """The MATH reference answer: the last `\\boxed{}` of a worked solution."""
    return extract_boxed(solution)


# ---------------------------------------------------------------- numbers (GSM8K rule)

_PLAIN_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?")


def parse_number(text: str, drop_all_commas: bool = True) -> decimal.Decimal | None:
    """`text` as an exact decimal after removing `$`, commas and a trailing `.`, else None.

    lm-eval's gsm8k exact_match removes every comma; for MATH (`drop_all_commas=False`) only thousands
    separators go, because "1,2" there is a list of two answers, not 12.
    """
    s = text.strip().replace("\\$", "").replace("$", "").strip()
    s = s.removesuffix(".")
    if drop_all_commas or _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    return decimal.Decimal(s)


def canonical_number(value: decimal.Decimal) -> str:
    """One spelling per value: "18.00" -> "18", "1E+3" -> "1000"."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "+0") else text


def format_number(value) -> str:
    """A JSON number or numeric string as a reference: 51.0 -> "51", 3.33333 -> "3.33333"."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def gsm8k_reference(answer_text: str) -> str | None:
    """The gold number of a GSM8K-style answer: the text after `####` (lm-eval gsm8k doc_to_target), commas
    removed. Falls back to the last number when there is no `####` line. Never a bare number search first:
    the `<<48/2=24>>` calculator notes in the worked solution would fool it."""
    if "####" in answer_text:
        final = answer_text.split("####")[-1].strip()
    else:
        final = extract_flexible(answer_text) or ""
    number = parse_number(final)
    if number is not None:
        return canonical_number(number)
    return final or None


# ---------------------------------------------------------------- MATH normalisation (Hendrycks / Minerva)

_TEXT_GROUP = r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"
_SUBSTITUTIONS = [  # (pattern, replacement), applied in order
    (r"\n", ""), (r"\\[!,;:]", ""), (r"\\ ", " "), (r"~", " "),
    (r"\\[dt]frac", r"\\frac"), (r"\\left(?![a-zA-Z])", ""), (r"\\right(?![a-zA-Z])", ""),
    (r"\^\{?\\circ\}?", ""), ("°", ""), (r"\\?%", ""), (r"\\\$", ""), (r"\$", ""),
    (r"\\(?:ldots|dots|cdots)", ""),
    (rf"(?<=\S)\s*{_TEXT_GROUP}\s*$", ""),  # trailing units: "5\text{ cm}" -> "5" (Hendrycks _remove_right_units)
    (_TEXT_GROUP, r"\1"),  # other text, e.g. "\text{(C)}" -> "(C)"
    (r"\\frac(\d)(\d)", r"\\frac{\1}{\2}"), (r"\\frac(\d)\{", r"\\frac{\1}{"),
    (r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}"),  # Hendrycks _fix_fracs: \frac12, \frac1{2}, \frac{1}2
    (r"\\sqrt(\w)", r"\\sqrt{\1}"),  # Hendrycks _fix_sqrt: \sqrt2 -> \sqrt{2}
    (r"(^|[\s{(\[,=])\.(\d)", r"\g<1>0.\2"),  # ".5" -> "0.5"
]
_SUBSTITUTIONS = [(re.compile(p), r) for p, r in _SUBSTITUTIONS]
_SLASH_FRACTION_RE = re.compile(r"(-?\d+)/(\d+)")
_SHORT_LHS_RE = re.compile(r"^\s*[a-zA-Z]\w?\s*=(?!=)")


def clean_math_answer(text: str) -> str:
    """Hendrycks/Minerva normalisation that keeps spaces (LaTeX needs them for `\\cdot b`); see normalize."""
    s = text.strip()
    for pattern, repl in _SUBSTITUTIONS:
        s = pattern.sub(repl, s)
    s = s.strip()
    if s.count("=") == 1 and _SHORT_LHS_RE.match(s):  # "x = 3" -> "3"; Hendrycks: lhs of at most 2 chars
        s = s.split("=", 1)[1].strip()
    s = s.rstrip(".").strip()
    if _SLASH_FRACTION_RE.fullmatch(s):  # Hendrycks _fix_a_slash_b
        s = _SLASH_FRACTION_RE.sub(r"\\frac{\1}{\2}", s)
    number = parse_number(s, drop_all_commas=False)
    return canonical_number(number) if number is not None else s


def normalize_math_answer(text: str) -> str:
    """The comparison key of a MATH answer: `clean_math_answer` without whitespace."""
    return re.sub(r"\s+", "", clean_math_answer(text))


def answer_key(answer: str | None, numeric: bool) -> str | None:
    """A canonical spelling for majority voting: equal keys are the same answer. Numbers become their
    canonical decimal ("1,000.0" -> "1000"); other answers their MATH normalisation. Answers that are only
    symbolically equal (\\frac12 vs 0.5) keep different keys."""
    if answer is None or not re.search(r"[0-9A-Za-z]", answer):  # debris such as ",," is no answer
        return None
    if numeric:
        number = parse_number(answer)
        if number is not None:
            return canonical_number(number)
    return normalize_math_answer(answer) or None


# ---------------------------------------------------------------- grading

def is_correct(extracted: str | None, reference: str, numeric: bool) -> bool:
    """Whether an extracted answer matches the reference (rules in the module docstring)."""
    if extracted is None or not extracted.strip():
        return False
    if numeric:
        got, want = parse_number(extracted), parse_number(reference)
        if got is not None and want is not None:
            return got == want
    return math_equal(extracted, reference)


def math_equal(candidate: str, reference: str, timeout_s: int = SYMBOLIC_TIMEOUT_S) -> bool:
    """MATH-style equivalence: normalised strings, then exact numbers, then math-verify."""
    got, want = normalize_math_answer(candidate), normalize_math_answer(reference)
    if not re.search(r"[0-9A-Za-z]", got):  # punctuation debris of a loose extraction
        return False
    if got == want:
        return True
    got_number = parse_number(got, drop_all_commas=False)
    want_number = parse_number(want, drop_all_commas=False)
    if got_number is not None and want_number is not None:
        return got_number == want_number
    return symbolic_equal(clean_math_answer(reference), clean_math_answer(candidate), timeout_s)


@functools.lru_cache(maxsize=65536)
def symbolic_equal(reference: str, candidate: str, timeout_s: int = SYMBOLIC_TIMEOUT_S) -> bool:
    """math-verify equivalence of two LaTeX answers, evaluated in the worker process; False on timeout.

    Safe from any thread. The worker also applies math-verify's own per-step alarm (it is the worker's main
    thread); the parent kills the worker if the whole check overruns, so a pathological expression cannot
    hang grading."""
    try:
        return bool(_call_in_worker(_math_verify_equal, (reference, candidate, timeout_s), 3 * timeout_s + 1))
    except (TimeoutError, GradingWorkerError) as e:  # one odd answer must not stop an evaluation
        _log.warning("symbolic check of %r against %r failed (%s); graded wrong", candidate, reference, e)
        return False


def _math_verify_equal(reference: str, candidate: str, timeout_s: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${reference}$", configs, parsing_timeout=timeout_s)
    pred = parse(f"${candidate}$", configs, parsing_timeout=timeout_s)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout_s))


# ---------------------------------------------------------------- the worker process

class GradingWorkerError(RuntimeError):
    """A call in the grading worker raised, or the worker died during it."""


class _Worker:
    """A child interpreter (`python -c`, not multiprocessing: spawn would re-run an unguarded __main__ script)
    that runs picklable calls sent over a pair of pipes."""

    def __init__(self):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = f"from mathlm.data.answers import _serve; _serve({to_child_r}, {from_child_w})"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.owner_pid = os.getpid()
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.send = mpc.Connection(to_child_w, readable=False)
        self.recv = mpc.Connection(from_child_r, writable=False)
        try:  # the child's imports are not part of any call's timeout
            ready = self.recv.poll(120) and self.recv.recv() == "ready"
        except EOFError:  # it died while importing (math-verify missing?)
            ready = False
        if not ready:
            self.close()
            raise RuntimeError("the grading worker process did not start (is math-verify installed?)")

    def call(self, fn, args, timeout_s: float):
        self.send.send((fn, args))
        if not self.recv.poll(timeout_s):
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} took longer than {timeout_s:g}s")
        ok, value = self.recv.recv()
        if not ok:
            raise GradingWorkerError(value)
        return value

    def close(self):
        self.process.kill()
        self.process.wait()
        self.send.close()
        self.recv.close()


def _serve(recv_fd: int, send_fd: int) -> None:
    import math_verify  # noqa: F401 - pay the import before reporting ready

    recv, send = mpc.Connection(recv_fd, writable=False), mpc.Connection(send_fd, readable=False)
    send.send("ready")
    while True:
        try:
            fn, args = recv.recv()
        except EOFError:  # the parent closed the pipe or exited
            return
        try:
            reply = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - re-raised in the parent
            reply = (False, f"{type(e).__name__}: {e}")
        send.send(reply)


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _call_in_worker(fn, args: tuple, timeout_s: float):
    """Run fn(*args) in the worker; on timeout (or a dead worker) kill it, so the next call gets a fresh one."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker.owner_pid != os.getpid():  # a forked child must not share our pipes
            _worker = _Worker()
        try:
            return _worker.call(fn, args, timeout_s)
        except (TimeoutError, EOFError, OSError) as e:
            _worker.close()
            _worker = None
            if isinstance(e, TimeoutError):
                raise
            raise GradingWorkerError("the grading worker process died") from e


@atexit.register
def _stop_worker() -> None:
    global _worker
    if _worker is not None and _worker.owner_pid == os.getpid():
        _worker.close()
        _worker = None
