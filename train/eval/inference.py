"""Text in, text out: load a run onto a mesh, batch prompts through its generator, cut completions at stop strings.

Used by `mathlm generate` (`generate_texts`) and `mathlm eval`. The checkpoint's model kind picks the generator:
KV-cache decoding (`arm`) or diffusion sampling (`mdm`); `make_sampling` turns CLI-style options into that kind's
settings. The mesh for inference is data-parallel over every device by default (weights replicated, batch rows
split); `fsdp > 1` shards the weights too, for models that do not fit one device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mathlm.data.sources import DataError
from mathlm.data.tokenizer import Tokenizer
from mathlm.models.diffusion import DiffusionGenerator, DiffusionSampling
from mathlm.models.generate import ContextOverflow, Generator, Sampling
from mathlm.train.checkpoint import CheckpointError
from mathlm.train.config import MeshConfig
from mathlm.train.runs import LoadedRun, load_run
from mathlm.train.runtime import make_mesh


@dataclasses.dataclass
class Engine:
    run: LoadedRun
    generator: Generator | DiffusionGenerator  # KV-cache decoding (causal) or diffusion sampling (bidirectional)
    batch_multiple: int  # batch rows are split over this many devices

    @property
    def tokenizer(self) -> Tokenizer:
        return self.run.tokenizer

    @property
    def kind(self) -> str:
        """"arm" or "mdm" (ModelConfig.kind), read from the checkpoint's config."""
        return self.run.cfg.model.kind


# Settings fields as the CLI spells them, so that a bad value is reported by the flag the user typed. The guidance
# weight has two names on each side: `guidance/cfg_scale` (cfg_scale is the reference samplers' name) and the flag
# `--guidance`, alias `--cfg`.
GUIDANCE_FLAG = "--guidance/--cfg"
_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
          "top_p": "--top-p", "steps": "--steps", "rule": "--unmask", "guidance/cfg_scale": GUIDANCE_FLAG}


def make_sampling(kind: str, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, steps: int | None = None, guidance: float | None = None,
                  unmask: str | None = None) -> Sampling | DiffusionSampling:
    """Sampling settings for the model kind. None means "not given": an option of the other kind that was given at
    all (even `--steps 0` or `--top-k 0`) is refused, as is a bad value (ValueError, one line, named by its flag)."""
    if kind == "arm":
        given = [f for f, v in (("--steps", steps), (GUIDANCE_FLAG, guidance), ("--unmask", unmask)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} is for masked diffusion checkpoints; this one is autoregressive")
        sampling = Sampling(max_new_tokens, temperature, 0 if top_k is None else top_k,
                            1.0 if top_p is None else top_p)
    else:
        given = [f for f, v in (("--top-k", top_k), ("--top-p", top_p)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} is for autoregressive checkpoints; this one is a masked diffusion model")
        # The paper's default: as many sampling steps as generated tokens.
        sampling = DiffusionSampling(max_new_tokens, steps if steps is not None else max_new_tokens, temperature,
                                     "low_confidence" if unmask is None else unmask,
                                     0.0 if guidance is None else guidance)
    try:
        sampling.validate()
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        raise ValueError(f"{_FLAGS.get(field, field)} {rest}") from None
    return sampling


def new_token_budget(engine: Engine, prompts: Sequence[str], max_new_tokens: int) -> int:
    """The new-token budget (a diffusion model's canvas length) for a whole prompt set: the request, shortened to
    what the context leaves after the set's longest prompt. One budget for every row, so that a completion never
    depends on which prompts share its batch. Raises ContextOverflow when a prompt leaves no room at all."""
    longest = max(len(encode_prompt(engine.tokenizer, p)) for p in prompts)
    room = engine.run.cfg.model.max_seq_len - longest
    if room < 1:
        raise ContextOverflow(f"a prompt of {longest} tokens leaves no room in the model's context of "
                              f"{engine.run.cfg.model.max_seq_len}")
    return min(max_new_tokens, room)


def load_engine(path: str, fsdp: int = 1, chunk: int = 32) -> Engine:
    if fsdp < 1:
        raise CheckpointError(f"--fsdp must be >= 1, got {fsdp}")
    mesh_cfg = MeshConfig(data=-1, fsdp=fsdp, tensor=1, distributed="off")
    mesh = make_mesh(mesh_cfg)
    run = load_run(path, mesh=mesh)
    tok = run.tokenizer
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if run.cfg.model.kind == "arm":
        gen = Generator(run.model, eos_id=tok.eos_id, pad_id=pad, chunk=chunk, batch_sharding=batch_sharding)
    else:
        gen = DiffusionGenerator(run.model, eos_id=tok.eos_id, pad_id=pad, batch_sharding=batch_sharding)
    return Engine(run, gen, mesh.shape["data"] * mesh.shape["fsdp"])


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Documents were trained as `<bos> text <eos>`, so a prompt starts with <bos> (when the tokenizer has one)."""
    ids = tok.encode(text)
    return ([tok.bos_id] if tok.bos_id is not None else []) + ids


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def row_keys(seed: int, ids: Sequence[int]) -> np.ndarray:
    """One PRNG key per sample, from (seed, sample id): a sample never depends on its batch neighbours."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(np.asarray(ids, np.uint32)))


@dataclasses.dataclass
class Completions:
    texts: list[str]
    new_tokens: int
    seconds: float


def complete(engine: Engine, prompts: Sequence[str], sampling: Sampling | DiffusionSampling, *,
             stop: Sequence[str] = (),
             seed: int = 0, sample_ids: Sequence[int] | None = None, batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None) -> Completions:
    """Generate one completion per prompt, in batches of `batch_size` (rounded up to the device count).

    Prompts are sorted by length so that each batch pads little; results come back in the input order.
    A diffusion model fills its whole canvas at once, so stop strings only cut its text afterwards."""
    diffusion = isinstance(engine.generator, DiffusionGenerator)
    if diffusion != isinstance(sampling, DiffusionSampling):
        raise ValueError(f"{type(sampling).__name__} settings do not fit a {engine.kind} checkpoint")
    if diffusion and sampling.guidance > 0 and any(not p.strip() for p in prompts):
        raise ValueError(f"classifier-free guidance ({GUIDANCE_FLAG}) needs a prompt: the unconditional half masks it")
    tok = engine.tokenizer
    encoded = [encode_prompt(tok, p) for p in prompts]
    ids = list(sample_ids) if sample_ids is not None else list(range(len(prompts)))
    keys = row_keys(seed, ids)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    b = -(-batch_size // engine.batch_multiple) * engine.batch_multiple
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    new_tokens, seconds = 0, 0.0
    for start in range(0, len(order), b):
        rows = order[start: start + b]

        def is_done(r: int, new: list[int], rows=rows) -> bool:
            return bool(stop) and cut_at_stop(tok.decode(new), stop)[1]

        batch = [encoded[i] for i in rows]
        if diffusion:
            out = engine.generator(batch, sampling, keys[rows], pad_batch_to=b)
        else:
            out = engine.generator(batch, sampling, keys[rows], is_done=is_done if stop else None, pad_batch_to=b)
        for i, new in zip(rows, out.tokens):
            texts[i] = cut_at_stop(tok.decode(new), stop)[0]
        new_tokens += out.new_tokens
        seconds += out.seconds
        if on_batch:
            on_batch(len(rows))
    return Completions(texts, new_tokens, seconds)



def generate_texts(checkpoint: str, prompts: Sequence[str], *, fsdp: int = 1, stop: Sequence[str] = (),
                   seed: int = 0, batch_size: int = 16, **options) -> Completions:
    """`mathlm generate`: load the checkpoint, build its kind's sampling from the CLI-style `options` (those of
    make_sampling) and complete every prompt. Bad input is a DataError of one line, named by its flag."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    engine = load_engine(checkpoint, fsdp=fsdp)
    if engine.kind == "arm" and any(not p.strip() for p in prompts):
        # (a diffusion model samples unconditionally from an empty prompt; an autoregressive one was silently
        # continuing from <bos> alone)
        raise DataError("--prompt is empty: give the text to continue")
    try:
        sampling = make_sampling(engine.kind, **options)
    except ValueError as e:
        raise DataError(str(e)) from None
    try:
        return complete(engine, prompts, sampling, stop=stop, seed=seed, batch_size=batch_size)
    except ValueError as e:  # too long for the context (ContextOverflow); guidance without a prompt
        raise DataError(str(e)) from None
