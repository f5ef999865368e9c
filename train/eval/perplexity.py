"""`mathlm eval --task perplexity`: per-token perplexity and bits per byte, as lm-evaluation-harness defines them.

Each document is scored as `<bos> text` (no EOS), with lm-eval's rolling windows (`loglikelihood_rolling`,
context_len 1): the first window predicts the first L tokens from <bos>; every later window predicts the next
<= L tokens with as much preceding context as fits in L. Metrics over the corpus (sums, then ratios):
token_perplexity = exp(NLL / tokens), word_perplexity = exp(NLL / words), byte_perplexity = exp(NLL / bytes),
bits_per_byte = NLL / (bytes * ln 2), with words = whitespace-separated pieces and bytes = UTF-8 bytes.

A masked diffusion checkpoint has no exact likelihood: its NLL is the Monte-Carlo ELBO of disjoint chunks, each
after <bos> (`_elbo_perplexity`), an upper bound, so every perplexity it reports is an upper bound too
(`nll_is_upper_bound`). Empty documents are skipped and counted (`empty_documents_skipped`).
"""
from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mathlm.data.sources import DataError, read_examples
from mathlm.train.eval.inference import Engine


def rolling_windows(tokens: list[int], prefix: int, length: int) -> list[tuple[list[int], list[int], int]]:
    """-> (inputs, targets, n_scored): the last n_scored targets of each window are scored, each once."""
    seq = [prefix] + tokens
    out, predicted = [], 0
    while predicted < len(tokens):
        end = min(predicted + length, len(tokens))
        start = max(0, end - length)
        out.append((seq[start:end], tokens[start:end], end - predicted))
        predicted = end
    return out


def _nll_fn(engine: Engine):
    gen = engine.generator

    @jax.jit
    def nll(params, inputs, targets, scored):
        logits = nnx.merge(gen.graphdef, params)(inputs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(scored, picked, 0.0), axis=-1)

    return nll


def evaluate_perplexity(engine: Engine, path: str, limit: int | None = None, batch_size: int = 16,
                        progress: Callable[[int, int], None] | None = None, mc_samples: int = 128,
                        seed: int = 0) -> dict:
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    tok = engine.tokenizer
    texts = [ex.text for ex in itertools.islice(read_examples([path]), limit)]
    if not texts:
        raise DataError(f"{path}: no documents")
    # An empty document has no tokens to score (and would only add lm-eval's one "word" to the word count).
    empty = sum(1 for t in texts if not t)
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path}: every document is empty")
    length = engine.run.cfg.model.max_seq_len
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if engine.kind == "mdm":
        return {**_elbo_perplexity(engine, texts, prefix, length, batch_size, progress, mc_samples, seed),
                "empty_documents_skipped": empty}
    windows = []  # (doc, inputs, targets, n_scored)
    for d, ids in enumerate(tok.encode_batch(texts)):
        windows += [(d, *w) for w in rolling_windows(ids, prefix, length)]
    b = -(-batch_size // engine.batch_multiple) * engine.batch_multiple
    nll_fn = _nll_fn(engine)

    def put(a):
        return jax.device_put(a, engine.generator.batch_sharding)

    doc_nll = np.zeros(len(texts))
    t0 = time.perf_counter()
    for start in range(0, len(windows), b):
        chunk = windows[start: start + b]
        inputs = np.zeros((b, length), np.int32)
        targets = np.zeros((b, length), np.int32)
        scored = np.zeros((b, length), bool)
        for r, (_, x, y, n) in enumerate(chunk):
            inputs[r, : len(x)], targets[r, : len(y)] = x, y
            scored[r, len(y) - n: len(y)] = True
        sums = np.asarray(nll_fn(engine.generator.params, put(inputs), put(targets), put(scored)))
        for r, (d, *_rest) in enumerate(chunk):
            doc_nll[d] += sums[r]
        if progress:
            progress(min(start + b, len(windows)), len(windows))
    wall = time.perf_counter() - t0
    nll = float(doc_nll.sum())
    n_tokens = sum(w[3] for w in windows)
    return {**_ratios(texts, nll, n_tokens), "seconds": wall, "tokens_per_sec": n_tokens / wall,
            "empty_documents_skipped": empty}


def _ratios(texts: list[str], nll: float, n_tokens: int) -> dict:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval's count, no strip
    return {"documents": len(texts), "tokens": n_tokens, "bytes": n_bytes, "words": n_words, "nll": nll,
            "token_perplexity": math.exp(nll / n_tokens), "word_perplexity": math.exp(nll / n_words),
            "byte_perplexity": math.exp(nll / n_bytes), "bits_per_byte": nll / (n_bytes * math.log(2))}


def _elbo_perplexity(engine: Engine, texts, prefix: int, length: int, batch_size: int, progress, mc_samples: int,
                     seed: int) -> dict:
    """Masked diffusion models have no exact likelihood: the NLL is the Monte-Carlo ELBO (stratified t), an upper
    bound, so every perplexity here is an upper bound too. A document is cut into disjoint chunks of length - 1
    tokens, each scored after <bos> (a bidirectional model gets no left context from the previous chunk)."""
    from mathlm.models.diffusion import DiffusionScorer
    from mathlm.train.eval.inference import row_keys
    if mc_samples < 1:
        raise DataError(f"--mc-samples must be >= 1, got {mc_samples}")
    gen = engine.generator
    scorer = DiffusionScorer(engine.run.model, pad_id=gen.pad_id, batch_sharding=gen.batch_sharding)
    chunks = [ids[i: i + length - 1] for ids in engine.tokenizer.encode_batch(texts)
              for i in range(0, len(ids), length - 1)]
    b = -(-batch_size // engine.batch_multiple) * engine.batch_multiple
    nll = var = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(chunks), b):
        rows = chunks[start: start + b]
        keys = row_keys(seed, range(start, start + len(rows)))
        est, se = scorer.elbo([[prefix]] * len(rows), rows, keys, n_samples=mc_samples,
                              chunk=math.gcd(mc_samples, 8), pad_batch_to=b)
        nll += float(est.sum())
        var += float(np.nansum(np.square(se)))
        if progress:
            progress(min(start + b, len(chunks)), len(chunks))
    wall = time.perf_counter() - t0
    n_tokens = sum(len(c) for c in chunks)
    return {**_ratios(texts, nll, n_tokens), "nll_is_upper_bound": True,
            "estimator": f"Monte-Carlo ELBO, {mc_samples} stratified samples per chunk of {length - 1} tokens",
            # One sample per chunk has no spread to estimate an error from: null, not a misleading 0.
            "nll_standard_error": math.sqrt(var) if mc_samples > 1 else None,
            "seconds": wall, "tokens_per_sec": n_tokens / wall}
