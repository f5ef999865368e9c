"""Issue 16: every user mistake is one line on stderr (`error: ...`), a non-zero exit, no traceback, and nothing
written: one table of bad inputs, each run through the real CLI in a fresh interpreter.

"Nothing written": the watched folder (the workdir, the run, the output folder) has the same file tree before and
after (names, kinds, sizes, mtimes of everything below it), or, if it did not exist, still does not exist. The
watched folder's own mtime is not compared: a trainer that is refused after taking the lock (a resume the
checkpoints cannot do) creates and removes train.lock there.

Read-only folders: chmod 555 does not stop root, so when it does not (probed) the folder is made immutable
(`chattr +i`, which stops root too); where neither works the case is skipped. A workdir under a regular file
(mkdir fails with NotADirectoryError) needs neither.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_overrides

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = "configs/math-tiny.yaml"
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device unless a case asks for more


def _cli(args: list[str], env_extra: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathlm.cli.main", *args], cwd=ROOT, env={**ENV, **(env_extra or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """Bad files shared by the cases (each names its file in the message)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    files = {
        "bad.txt": b"first document\nstill the first\n\nsecond \xff\xfe document\n",  # 0xff at byte offset 39
        "bad.jsonl": b'{"text": "ok"}\n{"question": "caf\xe9?", "answer": "#### 1"}\n',  # 0xe9 at byte offset 32
        "malformed.jsonl": b'{"text": "ok"}\n{oops}\n',
        "empty.jsonl": b"",
        "garbage_tokenizer.json": b"garbage {{{\n",
        "list.yaml": b"- model\n- train\n",
        "scalar.yaml": b"42\n",
        "invalid.yaml": b"model: [1, 2\n",
        "latin1.yaml": b"model:\n  d_model: 64  # caf\xe9\n",
        "a_file": b"not a folder\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    """A tiny run trained 2 steps by the CLI (checkpoint at step 2): for resume, eval, generate and convert."""
    wd = tmp_path_factory.mktemp("bad_inputs_run") / "run"
    r = _cli(["train", CONFIG, *tiny_overrides(corpus, "train.steps=2"), "--workdir", str(wd), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


@dataclasses.dataclass
class Ctx:
    corpus: dict
    inputs: pathlib.Path
    run: pathlib.Path
    tmp: pathlib.Path  # this case's own folder
    undo: list = dataclasses.field(default_factory=list)

    def train(self, workdir: pathlib.Path, *extra: str) -> list[str]:
        overrides = [e for e in extra if not e.startswith("-")]
        flags = [e for e in extra if e.startswith("-")]
        return ["train", CONFIG, *tiny_overrides(self.corpus, "train.steps=2", *overrides), "--workdir",
                str(workdir), "--no-progress", *flags]

    def new(self, name: str = "wd") -> pathlib.Path:
        return self.tmp / name

    def file(self, name: str) -> str:
        return str(self.inputs / name)

    def copy_of_run(self) -> pathlib.Path:
        dst = self.tmp / "run_copy"
        shutil.copytree(self.run, dst)
        return dst

    def readonly(self, folder: pathlib.Path) -> pathlib.Path:
        """`folder` made unwritable for this user, really (probed); skips the case where that is not possible."""
        folder.chmod(0o555)
        self.undo.append(lambda: folder.chmod(0o755))
        if _writable(folder):  # root: chmod does not apply; an immutable folder stops root too
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
                self.undo.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
        if _writable(folder):
            pytest.skip("cannot make a read-only folder here (root, and no chattr +i)")
        return folder


def _writable(folder: pathlib.Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


@dataclasses.dataclass
class Case:
    args: list[str]
    watched: pathlib.Path  # must not change (or, if absent before, must stay absent)
    needles: tuple[str, ...]  # in the error line
    env: dict | None = None


def _ro_parent(c: Ctx) -> Case:
    parent = c.tmp / "ro"
    parent.mkdir()
    c.readonly(parent)
    return Case(c.train(parent / "wd"), parent / "wd", ("cannot write to", str(parent / "wd")))


def _ro_existing(c: Ctx) -> Case:
    wd = c.readonly(c.copy_of_run())
    return Case(c.train(wd, "train.steps=3"), wd, ("cannot write to", str(wd)))


def _non_empty_export(c: Ctx) -> Case:
    out = c.tmp / "hf"
    out.mkdir()
    (out / "stray.bin").write_text("from an earlier export")
    return Case(["convert", "to-hf", str(c.run), str(out)], out, ("is not empty", "--overwrite"))



def _bad_data_for_a_run(c):
    wd = c.copy_of_run()
    return Case(c.train(wd, f"data.train=[{c.file('bad.txt')}]", "train.steps=4"), wd, ("bad.txt:4",))


def _existing_eval(c):
    folder = c.copy_of_run() / "eval" / "synth" / "limit2"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    return Case(["eval", str(folder.parent.parent.parent), "--task", "synth", "--limit", "2"], folder.parent.parent,
                ("already holds an evaluation", "--overwrite"))


CASES: list = [
    # --- the config and its overrides (nothing is touched: the workdir is never created)
    ("override-without-equals", lambda c: Case(c.train(c.new(), "train.steps"), c.new(), ("section.key=value",))),
    ("unknown-config-key", lambda c: Case(c.train(c.new(), "model.d_modle=64"), c.new(),
                                          ("unknown config key 'model.d_modle'", "model.d_model"))),
    ("wrong-value-type", lambda c: Case(c.train(c.new(), "train.steps=many"), c.new(), ("train.steps", "integer"))),
    ("unknown-objective", lambda c: Case(c.train(c.new(), "train.objective=nope"), c.new(),
                                         ("unknown objective 'nope'",))),
    ("unknown-data-format", lambda c: Case(c.train(c.new(), "data.format=bogus"), c.new(), ("data.format",))),
    ("unknown-eval-task", lambda c: Case(c.train(c.new(), "eval.tasks=[nope]"), c.new(), ("unknown task 'nope'",))),
    ("negative-steps", lambda c: Case(c.train(c.new(), "train.steps=-3"), c.new(), ("train.steps must be >= 1",))),
    ("micro-batches-do-not-divide", lambda c: Case(c.train(c.new(), "train.micro_batches=3"), c.new(),
                                                   ("not divisible by train.micro_batches=3",))),
    ("missing-config-file", lambda c: Case(["train", str(c.tmp / "nope.yaml"), "--workdir", str(c.new())], c.new(),
                                           ("config file not found",))),
    ("yaml-top-level-list", lambda c: Case(["train", c.file("list.yaml"), "--workdir", str(c.new())], c.new(),
                                           ("list.yaml", "expected a mapping", "a list"))),
    ("yaml-top-level-scalar", lambda c: Case(["train", c.file("scalar.yaml"), "--workdir", str(c.new())], c.new(),
                                             ("scalar.yaml", "expected a mapping"))),
    ("yaml-invalid", lambda c: Case(["train", c.file("invalid.yaml"), "--workdir", str(c.new())], c.new(),
                                    ("invalid.yaml", "invalid YAML"))),
    ("yaml-not-utf8", lambda c: Case(["train", c.file("latin1.yaml"), "--workdir", str(c.new())], c.new(),
                                     ("latin1.yaml:2", "not UTF-8", "byte offset 27"))),
    # --- the mesh and the topology
    ("mesh-does-not-match-devices", lambda c: Case(c.train(c.new(), "mesh.data=3"), c.new(),
                                                   ("does not match the 1 available devices",))),
    ("batch-not-divisible-over-data", lambda c: Case(
        c.train(c.new(), "train.batch_size=12"), c.new(), ("train.batch_size=12", "data-parallel size 8"),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})),
    ("topology-without-dry-run", lambda c: Case(c.train(c.new(), "--topology=v5e-8"), c.new(),
                                                ("--topology needs --dry-run",))),
    ("unknown-topology", lambda c: Case(c.train(c.new(), "--topology=v99-8", "--dry-run"), c.new(),
                                        ("unknown TPU topology 'v99-8'",))),
    ("zero-slices", lambda c: Case(c.train(c.new(), "--topology=v5e-8", "--slices=0", "--dry-run"), c.new(),
                                   ("--slices must be >= 1",))),
    # --- the workdir, its checkpoints, model.init_from
    ("workdir-under-a-file", lambda c: Case(c.train(pathlib.Path(c.file("a_file")) / "wd"),
                                            pathlib.Path(c.file("a_file")), ("cannot write to", "is a file"))),
    ("workdir-in-read-only-folder", _ro_parent),
    ("workdir-on-a-store-not-installed", lambda c: Case(c.train("zz://bucket/run"), c.tmp,
                                                        ("zz:// paths cannot be used here",))),
    ("existing-read-only-workdir", _ro_existing),
    ("resume-from-missing-step", lambda c: Case(c.train(c.run, "train.steps=3", "--resume-from=7"), c.run,
                                                ("--resume-from 7: no such checkpoint", "have: 2"))),
    ("resume-with-other-model", lambda c: Case(c.train(c.run, "train.steps=3", "model.d_ff=96"), c.run,
                                               ("does not fit this config",))),
    ("init-from-nothing", lambda c: Case(c.train(c.new(), f"model.init_from={c.tmp / 'nothing'}"), c.new(),
                                         ("no checkpoint found",))),
    # --- training data and tokenizer (a new workdir: a failed start leaves none behind)
    ("missing-data-file", lambda c: Case(c.train(c.new(), f"data.train=[{c.tmp / 'missing.jsonl'}]"), c.new(),
                                         ("data file not found", "missing.jsonl"))),
    pytest.param("empty-data-file", lambda c: Case(c.train(c.new(), f"data.train=[{c.file('empty.jsonl')}]"),
                                                   c.new(), ("empty.jsonl", "no examples"))),
    pytest.param("malformed-jsonl", lambda c: Case(c.train(c.new(), f"data.train=[{c.file('malformed.jsonl')}]"),
                                                   c.new(), ("malformed.jsonl:2", "malformed JSON"))),
    pytest.param("train-text-not-utf8", lambda c: Case(c.train(c.new(), f"data.train=[{c.file('bad.txt')}]"),
                                                       c.new(), ("bad.txt:4", "0xff", "byte offset 39"))),
    pytest.param("train-jsonl-not-utf8", lambda c: Case(c.train(c.new(), f"data.train=[{c.file('bad.jsonl')}]"),
                                                        c.new(), ("bad.jsonl:2", "0xe9", "byte offset 32"))),
    ("missing-tokenizer", lambda c: Case(c.train(c.new(), f"data.tokenizer={c.tmp / 'nope.json'}"), c.new(),
                                         ("tokenizer not found",))),
    ("corrupt-tokenizer", lambda c: Case(c.train(c.new(), f"data.tokenizer={c.file('garbage_tokenizer.json')}"),
                                         c.new(), ("garbage_tokenizer.json", "not a tokenizer.json"))),
    # --- eval
    ("eval-missing-checkpoint", lambda c: Case(["eval", str(c.tmp / "nope"), "--task", "synth"], c.tmp,
                                               ("not a mathlm run",))),
    ("eval-unknown-task", lambda c: Case(["eval", str(c.run), "--task", "nope"], c.run, ("unknown task 'nope'",))),
    ("eval-missing-data", lambda c: Case(["eval", str(c.run), "--task", "gsm8k", "--data", str(c.tmp / "x.jsonl")],
                                         c.run, ("data file not found",))),
    ("eval-data-not-utf8", lambda c: Case(["eval", str(c.run), "--task", "gsm8k", "--data", c.file("bad.jsonl")],
                                          c.run, ("bad.jsonl:2", "0xe9", "byte offset 32"))),
    ("eval-zero-samples", lambda c: Case(["eval", str(c.run), "--task", "synth", "--samples", "0"], c.run,
                                         ("--samples must be >= 1",))),
    ("eval-score-not-utf8", lambda c: Case(["eval", "score", c.file("bad.jsonl"), "--task", "gsm8k", "--out",
                                            str(c.tmp / "scored.jsonl")], c.tmp / "scored.jsonl",
                                           ("bad.jsonl:2", "byte offset 32"))),
    # --- generate
    ("generate-missing-checkpoint", lambda c: Case(["generate", str(c.tmp / "nope"), "--prompt", "1 + 1 ="], c.tmp,
                                                   ("not a mathlm run",))),
    ("generate-empty-prompt", lambda c: Case(["generate", str(c.run), "--prompt", ""], c.run,
                                             ("--prompt is empty",))),
    ("generate-prompts-not-utf8", lambda c: Case(["generate", str(c.run), "--prompts", c.file("bad.txt")], c.run,
                                                 ("bad.txt:4", "byte offset 39"))),
    # --- convert
    ("convert-missing-run", lambda c: Case(["convert", "to-hf", str(c.tmp / "nope"), str(c.new("hf"))],
                                           c.new("hf"), ("not a mathlm run",))),
    ("convert-into-non-empty-folder", _non_empty_export),
    ("convert-under-a-file", lambda c: Case(["convert", "to-hf", str(c.run), c.file("a_file") + "/hf"],
                                            pathlib.Path(c.file("a_file")), ("cannot write to", "is a file"))),
    ("convert-from-hf-missing-folder", lambda c: Case(["convert", "from-hf", str(c.tmp / "nope"), str(c.new())],
                                                      c.new(), ("no config.json",))),
    # --- the command line itself (click's usage errors: one line, not the usage box)
    ("unknown-option", lambda c: Case(["train", CONFIG, "--bogus", "x"], c.tmp, ("No such option: --bogus",))),
    ("option-value-of-wrong-type", lambda c: Case(["data", "synth", "--out", str(c.new("s")), "--n", "abc"],
                                                  c.new("s"), ("--n", "valid integer"))),
    ("eval-k-not-integers", lambda c: Case(["eval", str(c.run), "--task", "synth", "--k", "1,x"], c.run,
                                           ("--k takes comma-separated integers",))),
    ("eval-existing-evaluation", lambda c: _existing_eval(c)),
    # --- an existing run with bad new data: config.yaml and everything else stay as they were
    ("existing-run-bad-data", lambda c: _bad_data_for_a_run(c)),
    # --- data and tokenizer commands
    ("synth-zero-problems", lambda c: Case(["data", "synth", "--out", str(c.new("s")), "--n", "0"], c.new("s"),
                                           ("--n must be >= 1",))),
    ("synth-bad-steps", lambda c: Case(["data", "synth", "--out", str(c.new("s")), "--n", "10", "--min-steps", "9"],
                                       c.new("s"), ("min_steps",))),
    ("tokenizer-vocab-too-small", lambda c: Case(["tokenizer", "train", c.file("bad.txt"), "--vocab-size", "10",
                                                  "--out", str(c.new("tok") / "t.json")], c.new("tok"),
                                                 ("--vocab-size must be at least 260",))),
    ("tokenizer-input-not-utf8", lambda c: Case(["tokenizer", "train", c.file("bad.jsonl"), "--vocab-size", "300",
                                                 "--out", str(c.new("tok") / "t.json")], c.new("tok"),
                                                ("bad.jsonl:2", "byte offset 32"))),
    ("prepare-input-not-utf8", lambda c: Case(["data", "prepare", c.file("bad.txt"), "--tokenizer",
                                               str(c.corpus["tokenizer"]), "--out", str(c.new("store"))],
                                              c.new("store"), ("bad.txt:4", "byte offset 39"))),
    ("prepare-corrupt-tokenizer", lambda c: Case(["data", "prepare", str(c.corpus["jsonl"]["train"]), "--tokenizer",
                                                  c.file("garbage_tokenizer.json"), "--out", str(c.new("store"))],
                                                 c.new("store"), ("garbage_tokenizer.json", "not a tokenizer.json"))),
]


def _tree(path: pathlib.Path) -> dict | None:
    if not path.exists():
        return None
    if path.is_file():
        st = path.stat()
        return {".": ("file", st.st_size, st.st_mtime_ns)}
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = ("dir" if p.is_dir() else "file", 0 if p.is_dir() else st.st_size,
                                         st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name,build", CASES, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(name, build, corpus, inputs, trained, tmp_path):
    ctx = Ctx(corpus, inputs, trained, tmp_path)
    try:
        case = build(ctx)
        before = _tree(case.watched)
        r = _cli(case.args, case.env)
        after = _tree(case.watched)
    finally:
        for undo in reversed(ctx.undo):
            undo()
    lines = r.stderr.splitlines()  # blank lines count too
    assert r.returncode != 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    assert after == before, (errors[0], before, after)
    assert lines == errors, r.stderr[-3000:]
