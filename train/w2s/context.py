"""Where everything lives in a w2s workdir, and the pieces every step shares (engines, prompts, sampling)."""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from mathlm.data.sources import DataError, qa_prompt
from mathlm.models.generate import Sampling
from mathlm.train.eval.inference import Engine, encode_prompt, load_engine
from mathlm.train.w2s import generation, splits
from mathlm.train.w2s.config import W2SConfig


@dataclasses.dataclass
class Ctx:
    cfg: W2SConfig
    workdir: pathlib.Path
    log: Callable[[str], None] = print
    show_progress: bool = False
    key: str = ""  # the running step's key (generation partial files and run folders carry it)
    should_stop: Callable[[], bool] = lambda: False  # a SIGTERM came: generation passes stop between batches

    @property
    def data(self) -> dict[str, pathlib.Path]:
        return splits.paths(self.workdir)

    def round_dir(self, r: int) -> pathlib.Path:
        return self.workdir / f"round{r}"

    def round_model(self, r: int, variant: str) -> pathlib.Path:
        return self.round_dir(r) / "models" / variant

    @property
    def stage2(self) -> pathlib.Path:
        return self.workdir / "stage2"

    @property
    def m_plus(self) -> pathlib.Path:
        """M_plus = the last round's hybrid model (its adapter, on the strong base)."""
        return self.round_model(self.cfg.stage1.rounds, "hybrid")

    @property
    def m_plus_merged(self) -> pathlib.Path:
        return self.stage2 / "models" / "m_plus"

    def po_model(self, method: str) -> pathlib.Path:
        return self.stage2 / "models" / method

    @property
    def weak_base(self) -> pathlib.Path:
        return self.workdir / "models" / "weak_base"

    @property
    def weak(self) -> pathlib.Path:
        """m: the weak model that answers split 2 (fine-tuned on split 1 here, or given ready)."""
        c = self.cfg.weak
        if c.sft is not None:
            return self.workdir / "models" / "weak"
        return self.weak_base if c.pretrain is not None else pathlib.Path(c.run)

    @property
    def strong(self) -> pathlib.Path:
        """M: the strong base model; it never sees a label."""
        c = self.cfg.strong
        return self.workdir / "models" / "strong" if c.pretrain is not None else pathlib.Path(c.run)

    @property
    def demos_file(self) -> pathlib.Path:
        return self.workdir / "demos.json"

    def run_config(self, which: str, model: dict, data: pathlib.Path, fmt: str, spec, n: int, **kw) -> dict:
        """A `mathlm train` config for a run of the weak or strong network (its runtime keys and the mesh)."""
        from mathlm.train.w2s.models import train_config
        model = {**model, **getattr(self.cfg, which).runtime}
        return train_config(model, data, fmt, spec, n, mesh=self.cfg.mesh, **kw)

    def engine(self, run: pathlib.Path) -> Engine:
        return load_engine(str(run))

    def greedy(self, engine: Engine, prompts: list[str]) -> Sampling:
        return Sampling(self.budget(engine, prompts), temperature=0.0)

    def sampled(self, engine: Engine, prompts: list[str], temperature: float, top_p: float) -> Sampling:
        return Sampling(self.budget(engine, prompts), temperature=temperature, top_p=top_p)

    def budget(self, engine: Engine, prompts: list[str]) -> int:
        """generation.max_new_tokens, or what the model's context leaves after the longest prompt (one budget
        for the whole pass, so a row never depends on its batch)."""
        want = self.cfg.generation.max_new_tokens
        longest = max(len(encode_prompt(engine.tokenizer, p)) for p in prompts)
        room = engine.run.cfg.model.max_seq_len - longest
        if room < 1:
            raise DataError(f"a prompt of {longest} tokens leaves no room in {engine.run.run_dir.name}'s context "
                            f"of {engine.run.cfg.model.max_seq_len}")
        if room < want:
            self.log(f"  [yellow]new-token budget {want} cut to {room}: the longest prompt has {longest} tokens "
                     f"and {engine.run.run_dir.name}'s context is {engine.run.cfg.model.max_seq_len}")
        return min(want, room)

    def generate(self, engine: Engine, items: list[generation.Item], sampling: Sampling, out: pathlib.Path,
                 **kw) -> list[dict]:
        g = self.cfg.generation
        return generation.generate(engine, items, sampling, out, key=self.key, task=self.cfg.task, stop=g.stop,
                                   batch_size=g.batch_size, log=self.log,
                                   should_stop=self.should_stop, **kw)


def zero_shot_items(questions: list[dict], with_question: bool = True) -> list[generation.Item]:
    return [generation.Item(q["id"], qa_prompt(q["question"]), 0,
                            (("question", q["question"]),) if with_question else ()) for q in questions]


def demo_prefix(demos: list[dict]) -> str:
    """The reference's few-shot prompt: "Question: {q_i}\\nAnswer: {sol_i}\\n\\n" per demonstration."""
    return "".join(f"Question: {d['question'].strip()}\nAnswer: {d['response']}\n\n" for d in demos)
