"""Byte-level BPE (Hugging Face `tokenizers`), digits split one per token, saved as `tokenizer.json`.

Special tokens: <|pad|>=0, <|bos|>=1, <|eos|>=2 inside the trained vocabulary, and <|mask|> appended after
training so its id is the vocabulary size — the same extra embedding row the Transformer reserves for masked
diffusion, and a row the output head never predicts.

Tokenizers of imported Hugging Face models (Llama, Qwen2, ...) have none of these; their special-token roles come
from the files next to tokenizer.json (tokenizer_config.json, special_tokens_map.json, generation_config.json,
config.json). Such a tokenizer may lack a bos (Qwen2: bos_id is None), a pad (pad_id falls back to eos) or a mask.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator, Mapping

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mathlm.data.sources import DataError, as_path, is_uri

PAD, BOS, EOS, MASK = "<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>"
ROLES = ("pad", "bos", "eos", "mask")
# Files that name special-token roles, most authoritative first: token texts in the first two, ids in the others.
ROLE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")


class Tokenizer:
    def __init__(self, hf: HFTokenizer, special: Mapping[str, str | None] | None = None):
        """special: role (pad/bos/eos/mask) -> token text, for foreign tokenizers; None = mathlm's own tokens."""
        self.hf = hf
        self.native = special is None
        if special is None:
            ids = {t: hf.token_to_id(t) for t in (PAD, BOS, EOS, MASK)}
            missing = [t for t, i in ids.items() if i is None]
            if missing:
                raise ValueError(f"tokenizer lacks special tokens {missing}; train it with `mathlm tokenizer train`")
            self.special: dict[str, str | None] = dict(zip(ROLES, (PAD, BOS, EOS, MASK)))
            self.pad_id, self.bos_id, self.eos_id, self.mask_id = (ids[t] for t in (PAD, BOS, EOS, MASK))
            self._vocab_size = self.mask_id
            return
        self.special = {r: special.get(r) for r in ROLES}
        ids = {}
        for role, text in self.special.items():
            ids[role] = hf.token_to_id(text) if text else None
            if text and ids[role] is None:
                raise ValueError(f"the {role} token {text!r} named by the tokenizer's config is not in its vocabulary")
        if ids["eos"] is None:
            raise ValueError("tokenizer has no eos token (none named in tokenizer_config.json, "
                             "special_tokens_map.json or generation_config.json)")
        self.bos_id, self.eos_id, self.mask_id = ids["bos"], ids["eos"], ids["mask"]
        # Without a pad token, pad with eos: padded positions are masked out of every loss and attention anyway.
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        n = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        self._vocab_size = n - 1 if self.mask_id == n - 1 else n

    @property
    def vocab_size(self) -> int:
        """Ids a model must predict: everything but a mask token appended after training."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | pathlib.Path) -> None:
        """Write tokenizer.json (to a local path or a URI); a foreign tokenizer also records its roles in
        tokenizer_config.json beside it."""
        path = as_path(path)
        if is_uri(path):
            path.write_text(self.hf.to_str(pretty=True))
        else:
            self.hf.save(str(path))
        if not self.native:
            side = path.parent / "tokenizer_config.json"
            conf = json.loads(side.read_text()) if side.is_file() else {}
            conf.update({f"{r}_token": t for r, t in self.special.items() if t})
            side.write_text(json.dumps(conf, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Tokenizer:
        """tokenizer.json, or a folder holding it (a mathlm run or a Hugging Face model folder)."""
        p = as_path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer not found: {p}")
        try:
            hf = HFTokenizer.from_str(p.read_text()) if is_uri(p) else HFTokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception for every bad file
            first = (str(e).splitlines() or [""])[0]
            raise DataError(f"{p}: not a tokenizer.json ({first}); train one with `mathlm tokenizer train`") from None
        try:
            if all(hf.token_to_id(t) is not None for t in (PAD, BOS, EOS, MASK)):
                return cls(hf)
            special = special_roles(p.parent, hf)
            if not special.get("eos"):
                missing = [t for t in (PAD, BOS, EOS, MASK) if hf.token_to_id(t) is None]
                raise ValueError(f"tokenizer lacks special tokens {missing} and no tokenizer_config.json next to "
                                 "it names an eos token; train one with `mathlm tokenizer train` or import a Hugging "
                                 "Face model with `mathlm convert from-hf`")
            return cls(hf, special)
        except ValueError as e:  # the checks of __init__ too: one line naming the file
            raise DataError(f"{p}: {e}") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_roles(folder: pathlib.Path, hf: HFTokenizer) -> dict[str, str | None]:
    """Role -> token text from the Hugging Face files in `folder` (first file that names a role wins)."""
    roles: dict[str, str | None] = {}
    for name in ROLE_FILES:
        f = folder / name
        if not f.is_file():
            continue
        try:
            conf = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for role in ROLES:
            if roles.get(role):
                continue
            text = _token_text(conf.get(f"{role}_token"))
            token_id = conf.get(f"{role}_token_id")
            if isinstance(token_id, list):  # generation_config may list several eos ids; the first is the main one
                token_id = token_id[0] if token_id else None
            if text is None and isinstance(token_id, int):
                text = hf.id_to_token(token_id)
            if text:
                roles[role] = text
    return roles


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
