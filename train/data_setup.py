"""From `data:` config to tokenized stores in the workdir: synthetic corpus, tokenizer, `data prepare`.

The tokenizer is data.tokenizer, else the workdir's, else the `model.init_from` run's, else one trained on the
training data. Stores are cached under workdir/data/tokens/, keyed by data.format (a `pref` store holds each pair's
two sides as consecutive documents), tokenizer and file mtimes. Process 0
does the writing; the others wait at a barrier, then every process opens the same stores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib

import jax

from mathlm.data import synth
from mathlm.data.sources import DataError, as_path, expand, read_examples
from mathlm.data.store import TokenStore, is_store, tokenizer_fingerprint, write_store
from mathlm.data.tokenizer import Tokenizer, train_tokenizer
from mathlm.train.checkpoint import CheckpointError
from mathlm.train.config import Config, ConfigError
from mathlm.train.paths import mtime_ns, rmtree
from mathlm.train.runs import run_dir_of

TOKENIZER_SAMPLE = 200_000  # examples used to train a tokenizer when none is given


@dataclasses.dataclass
class RunData:
    tokenizer: Tokenizer
    train_url: str
    validation_url: str | None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _synth_paths(cfg: Config, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """The run's synthetic corpus under workdir/data/ (data/synth.py names the folder), written by process 0."""
    corpus = synth.SynthConfig.from_data(cfg.data)
    if jax.process_index() == 0:
        synth.ensure_splits(workdir / "data", corpus)
    _barrier("synth")
    return synth.split_paths(workdir / "data", corpus)


def _resolve_sources(cfg: Config, workdir: pathlib.Path) -> tuple[list[str], list[str] | None]:
    train, val = list(cfg.data.train), cfg.data.validation
    if "synth" in train:
        paths = _synth_paths(cfg, workdir)
        train = [str(paths["train"]) if t == "synth" else t for t in train]
        if val is None:
            val = [str(paths["validation"])]
    if val is not None and "synth" in val:
        val = [str(_synth_paths(cfg, workdir)["validation"]) if v == "synth" else v for v in val]
    return train, val


def _find_tokenizer(cfg: Config, workdir: pathlib.Path) -> pathlib.Path | None:
    if cfg.data.tokenizer:
        p = as_path(cfg.data.tokenizer)
        if not (p.is_file() or (p / "tokenizer.json").is_file()):
            raise DataError(f"tokenizer not found: {p}")
        return p
    if (workdir / "tokenizer.json").is_file():
        return workdir / "tokenizer.json"
    if cfg.model.init_from:
        # Fine-tuning must read text exactly as the pretrained model did: the tokenizer of the init_from run.
        try:
            tok = run_dir_of(cfg.model.init_from) / "tokenizer.json"
        except CheckpointError:
            return None  # not a run folder: loading its params reports it
        return tok if tok.is_file() else None
    return None


def _store_for(paths: list[str], fmt: str, tok: Tokenizer, cache: pathlib.Path, log) -> str:
    if len(paths) == 1 and is_store(paths[0]):
        store = TokenStore(paths[0])
        if store.meta.get("tokenizer") != tokenizer_fingerprint(tok):
            raise DataError(f"{paths[0]} was prepared with a different tokenizer than this run uses")
        return paths[0]
    files = expand(paths)
    sig = hashlib.sha256(json.dumps(
        [fmt, tokenizer_fingerprint(tok)] + [[f, mtime_ns(f)] for f in files]
    ).encode()).hexdigest()[:12]
    url = cache / sig
    if jax.process_index() == 0 and not (url / "meta.json").is_file():
        rmtree(url)  # an unfinished store of an earlier start
        # logged after the store is written: a mistake in a file is then the one line on stderr
        meta = write_store(str(url), read_examples(files, fmt), tok, pairs=fmt == "pref")
        log(f"tokenized {len(files)} file(s) -> {url}: {meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens")
    _barrier(f"store-{sig}")
    return str(url)


def prepare_run_data(cfg: Config, workdir: pathlib.Path, log=print) -> RunData:
    train, val = _resolve_sources(cfg, workdir)
    tok_path = _find_tokenizer(cfg, workdir)
    if tok_path is None:
        if jax.process_index() == 0:
            log(f"training a {cfg.model.vocab_size}-token BPE tokenizer on the training data")
            texts = (ex.text for ex in itertools.islice(read_examples(train, cfg.data.format), TOKENIZER_SAMPLE))
            train_tokenizer(texts, cfg.model.vocab_size).save(workdir / "tokenizer.json")
        _barrier("tokenizer")
        tok_path = workdir / "tokenizer.json"
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    cache = workdir / "data" / "tokens"
    train_url = _store_for(train, cfg.data.format, tok, cache, log)
    val_url = _store_for(val, cfg.data.format, tok, cache, log) if val else None
    # The workdir always holds the tokenizer it was trained with: copied once the data is read, and only when it
    # differs (a bad data file leaves an existing run untouched).
    mine = workdir / "tokenizer.json"
    if jax.process_index() == 0 and tok_path != mine and not _same_tokenizer(tok, mine):
        tok.save(mine)
    return RunData(tok, train_url, val_url)


def _same_tokenizer(tok: Tokenizer, path: pathlib.Path) -> bool:
    try:
        return path.is_file() and tokenizer_fingerprint(Tokenizer.load(path)) == tokenizer_fingerprint(tok)
    except DataError:
        return False
