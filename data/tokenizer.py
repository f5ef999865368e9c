"""Byte-level BPE (Hugging Face `tokenizers`), digits split one per token, saved as `tokenizer.json`.

Special tokens: <|pad|>=0, <|bos|>=1, <|eos|>=2 inside the trained vocabulary, and <|mask|> appended after
training so its id is the vocabulary size — the same extra embedding row the Transformer reserves for masked
diffusion, and a row the output head never predicts.
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, MASK = "<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>"


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in (PAD, BOS, EOS, MASK)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; train it with `mathlm tokenizer train`")
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (ids[t] for t in (PAD, BOS, EOS, MASK))

    @property
    def vocab_size(self) -> int:
        """Ids a model must predict: everything but the mask token."""
        return self.mask_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | pathlib.Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "Tokenizer":
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer not found: {p}")
        return cls(HFTokenizer.from_file(str(p)))


def train_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train on an iterator of texts. `vocab_size` counts pad/bos/eos but not the appended mask token."""
    hf = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # numbers are read digit by digit
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: exact round trips
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    hf.add_special_tokens([MASK])
    return Tokenizer(hf)
