"""Tokenized store on tensorstore (zarr): token ids, document boundaries and prompt lengths.

Layout under a local path or any tensorstore URL (gs://, s3://, ...):
  tokens/       int32  [n_tokens]     every document as <bos> prompt response <eos>, concatenated
  doc_offsets/  int64  [n_docs + 1]   token offset of each document start (last entry = n_tokens)
  prompt_lens/  int32  [n_docs]       tokens of each document that belong to the prompt (0 for plain text)
  meta.json                           counts and the tokenizer fingerprint; `"pairs": true` for a preference
                                      store (documents 2i, 2i+1 = the chosen and rejected side of pair i)
Readers fetch token slices lazily, so a process touches only the windows it trains on.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import tensorstore as ts

from mathlm.data.sources import DataError, Example, as_path, cannot_write
from mathlm.data.tokenizer import Tokenizer

CHUNK = 1 << 20  # tokens per zarr chunk


def _kvstore(url: str, sub: str) -> str:
    if "://" not in url:
        url = "file://" + os.path.abspath(url)
    return url.rstrip("/") + "/" + sub + "/"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _open(url: str, sub: str, *, create: bool = False, dtype=None, shape=None):
    spec = {"driver": "zarr", "kvstore": _kvstore(url, sub)}
    if create:
        return ts.open(spec, create=True, delete_existing=True, dtype=dtype, shape=shape,
                       chunk_layout=ts.ChunkLayout(chunk_shape=[min(CHUNK, max(1, shape[0]))])).result()
    return ts.open(spec).result()


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.hf.to_str().encode()).hexdigest()[:16]


def write_store(url: str, examples: Iterable[Example], tok: Tokenizer, batch: int = 4096, pairs: bool = False) -> dict:
    """Tokenize examples and write the store; returns its meta dict. `pairs`: the examples are preference pairs,
    chosen then rejected (data.format=pref), recorded in the meta so that a pair reader can check it."""
    tokens: list[np.ndarray] = []
    lengths: list[int] = []
    prompt_lens: list[int] = []
    pending: list[Example] = []

    def flush():
        if not pending:
            return
        prompts = tok.encode_batch([e.prompt for e in pending])
        responses = tok.encode_batch([e.response for e in pending])
        bos = [] if tok.bos_id is None else [tok.bos_id]  # imported tokenizers (Qwen2) may have no <bos>
        for ex, p, r in zip(pending, prompts, responses):
            ids = np.asarray([*bos, *p, *r, tok.eos_id], np.int32)
            if ids.max() >= tok.vocab_size:  # the mask token written out in the text: no model can predict it
                bad = tok.decode([int(ids[ids >= tok.vocab_size][0])])
                raise DataError(f"example {len(lengths) + 1} contains the reserved token {bad!r} (masked diffusion's "
                                f"mask); remove it from the data: {ex.text[:60]!r}")
            tokens.append(ids)
            lengths.append(len(ids))
            prompt_lens.append(len(bos) + len(p))
        pending.clear()

    for ex in examples:
        pending.append(ex)
        if len(pending) >= batch:
            flush()
    flush()
    if not tokens:
        raise DataError("no examples to write")
    all_tokens = np.concatenate(tokens)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if pairs and len(lengths) % 2:  # before anything is written
        raise DataError("preference pairs: an odd number of documents")
    if _is_local(url):
        folder = pathlib.Path(url.removeprefix("file://"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(cannot_write(folder, e)) from None
    for sub, arr in (("tokens", all_tokens), ("doc_offsets", offsets),
                     ("prompt_lens", np.asarray(prompt_lens, np.int32))):
        _open(url, sub, create=True, dtype=ts.dtype(arr.dtype.name), shape=arr.shape).write(arr).result()
    meta = {"n_tokens": int(all_tokens.size), "n_docs": len(lengths), "tokenizer": tokenizer_fingerprint(tok),
            "vocab_size": tok.vocab_size, "format": "mathlm-tokens-v1"}
    if pairs:
        meta["pairs"] = True
    meta_store = ts.KvStore.open(_kvstore(url, "").rstrip("/") + "/").result()
    meta_store.write("meta.json", json.dumps(meta, indent=1).encode()).result()
    return meta


class TokenStore:
    """Read side: document table in memory, token slices fetched on demand."""

    def __init__(self, url: str):
        try:
            kv = ts.KvStore.open(_kvstore(url, "").rstrip("/") + "/").result()
            raw = kv.read("meta.json").result().value
            if not raw:
                raise ValueError
            self.meta = json.loads(bytes(raw))
            self.tokens = _open(url, "tokens")
            self.doc_offsets = np.asarray(_open(url, "doc_offsets").read().result(), np.int64)
            self.prompt_lens = np.asarray(_open(url, "prompt_lens").read().result(), np.int32)
        except (ValueError, OSError) as e:
            raise DataError(f"{url}: not a mathlm token store (run `mathlm data prepare`): {e}") from None
        self.url = url
        self.n_tokens = int(self.meta["n_tokens"])
        self.n_docs = int(self.meta["n_docs"])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.tokens[start:stop].read().result(), np.int32)

    def doc(self, i: int) -> tuple[np.ndarray, int]:
        return self.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])), int(self.prompt_lens[i])


def is_store(path: str) -> bool:
    if _is_local(path):
        return (pathlib.Path(path.removeprefix("file://")) / "meta.json").is_file()
    try:  # a text file in a bucket (a synthetic corpus in a gs:// run folder) is not one
        return (as_path(path) / "meta.json").is_file()
    except Exception:  # noqa: BLE001 - a tensorstore URL no fsspec store reads (memory://, ...): taken as a store
        return True


def unigram_entropy(store: TokenStore, max_tokens: int = 20_000_000) -> float:
    """Entropy (nats/token) of the store's unigram distribution: the loss of a model that ignores context."""
    ids = store.read(0, min(store.n_tokens, max_tokens))
    p = np.bincount(ids).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())
