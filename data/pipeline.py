"""grain pipelines from a TokenStore to training batches.

Every batch is a dict of int32/float32 arrays, each (B, L):
  inputs, targets (inputs shifted by one), positions (reset at every document start), segment_ids (attention
  stays inside a document; 0 = padding), loss_mask (1.0 where the target is trained).

`lm`:  documents concatenated and cut into windows of L+1 tokens at stride L (concat-then-split packing).
       A target that belongs to the next document is masked, so no loss crosses a document boundary.
`sft`: one (prompt, response) example per row, padded; only response tokens (and the final eos) are trained.
       The padding token is the caller's choice: pad, or eos for masked diffusion SFT (SMDM pads with EOS).
`pref`: one preference pair per element, every field (2, L): row 0 the chosen example, row 1 the rejected one,
       each an `sft` row (prompt masked, response and its eos trained); batches are (B, 2, L).

Order: windows are shuffled by seed (grain reshuffles every epoch); global batch k holds elements
[k*B, (k+1)*B) of that order and process p reads only rows [p*B/P, (p+1)*B/P) of it, so any process count sees
the same global batch.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from mathlm.data.sources import DataError
from mathlm.data.store import TokenStore


@dataclasses.dataclass
class PackedWindows:
    """Random-access source of packed LM windows (grain's RandomAccessDataSource protocol)."""

    store: TokenStore
    seq_len: int

    def __len__(self) -> int:
        return max(0, (self.store.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        start = int(i) * L
        ids = self.store.read(start, start + L + 1)
        pos = np.arange(start, start + L + 1)
        doc = np.searchsorted(self.store.doc_offsets, pos, side="right") - 1
        positions = pos - self.store.doc_offsets[doc]
        segment = (doc - doc[0] + 1).astype(np.int32)
        return {
            "inputs": ids[:-1],
            "targets": ids[1:],
            "positions": positions[:-1].astype(np.int32),
            "segment_ids": segment[:-1],
            "loss_mask": (segment[:-1] == segment[1:]).astype(np.float32),
            "prompt_mask": np.zeros(L, np.int32),
        }


@dataclasses.dataclass
class SFTRows:
    """One padded (prompt, response) example per row; the prompt is masked out of the loss.

    `pad_id` fills the row after the example (the tokenizer's pad, or its eos for masked diffusion SFT); either
    way that padding is segment 0 and out of loss_mask, so the causal objectives see the same batch.
    """

    store: TokenStore
    seq_len: int
    pad_id: int

    def __len__(self) -> int:
        return self.store.n_docs

    def n_truncated(self) -> int:
        return n_longer(self.store, self.seq_len)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return sft_row(*self.store.doc(int(i)), self.seq_len, self.pad_id)


def n_longer(store: TokenStore, seq_len: int) -> int:
    """Documents that do not fit a row of seq_len + 1 tokens (truncated, or refused with data.truncate=false)."""
    return int(np.sum(np.diff(store.doc_offsets) > seq_len + 1))


def sft_row(ids: np.ndarray, prompt_len: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One document as a padded row of L = seq_len positions: its first prompt_len tokens are the prompt (out of
    the loss), the rest (the response and its eos) are trained; positions past the document are padding."""
    L = seq_len
    ids = ids[: L + 1]
    n = len(ids)
    row = np.full(L + 1, pad_id, np.int32)
    row[:n] = ids
    t = np.arange(1, L + 1)  # index of each target in the row
    return {
        "inputs": row[:-1],
        "targets": row[1:],
        "positions": np.arange(L, dtype=np.int32),
        "segment_ids": (np.arange(L) < n).astype(np.int32),
        "loss_mask": ((t >= prompt_len) & (t < n)).astype(np.float32),
        "prompt_mask": (np.arange(L) < min(prompt_len, n)).astype(np.int32),
    }


@dataclasses.dataclass
class PairRows:
    """One preference pair per element: every field stacked (2, L), row 0 chosen, row 1 rejected, each padded
    like SFTRows. The store holds the two sides as documents 2i and 2i+1 (written with `pairs=True`)."""

    store: TokenStore
    seq_len: int
    pad_id: int

    def __post_init__(self):
        if not self.store.meta.get("pairs"):
            raise DataError(f"{self.store.url}: not a preference store (data.format=pref tokenizes JSONL records "
                            "with prompt/chosen/rejected; give those files in data.train)")

    def __len__(self) -> int:
        return self.store.n_docs // 2

    def n_truncated(self) -> int:
        return n_longer(self.store, self.seq_len)  # sides, not pairs

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rows = [sft_row(*self.store.doc(2 * int(i) + side), self.seq_len, self.pad_id) for side in (0, 1)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_source(store_url: str, fmt: str, seq_len: int, pad_id: int, truncate: bool = True):
    store = TokenStore(store_url)
    if fmt in ("sft", "pref"):
        src = (SFTRows if fmt == "sft" else PairRows)(store, seq_len, pad_id)
        over = src.n_truncated()
        if over and not truncate:
            raise DataError(f"{store_url}: {over} examples are longer than seq_len+1={seq_len + 1} tokens "
                            "(set data.truncate=true to truncate them)")
        src.truncated = over
    else:
        src = PackedWindows(store, seq_len)
        src.truncated = 0
    if len(src) == 0:
        raise DataError(f"{store_url}: too little data for one window of {seq_len} tokens")
    return src


def train_dataset(source, *, global_batch: int, process_index: int, process_count: int, seed: int,
                  threads: int = 0, prefetch: int = 2) -> grain.IterDataset:
    """Infinite, shuffled, process-sharded batches; its iterator's state can be checkpointed."""
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    per_process = global_batch // process_count
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.batch(per_process, drop_remainder=True)[process_index::process_count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))


def eval_batches(source, *, global_batch: int, process_index: int, process_count: int,
                 max_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `max_batches` global batches of the held-out set, in order (this process's rows)."""
    per_process = global_batch // process_count
    ds = grain.MapDataset.source(source).batch(per_process, drop_remainder=True)[process_index::process_count]
    return [ds[i] for i in range(min(max_batches, len(ds)))]
