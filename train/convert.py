"""`mathlm convert`: mathlm run folders <-> Hugging Face model folders, and a numerical check between the two.

A Hugging Face folder holds config.json, model.safetensors (or shards + model.safetensors.index.json),
generation_config.json and the tokenizer (tokenizer.json + tokenizer_config.json). The name/shape mapping lives in
models/hf.py; this file does the IO. Weights are read with our own safetensors reader (memory-mapped, bf16 via
ml_dtypes: safetensors.numpy cannot represent bf16) and written float32 with safetensors.numpy, so neither
direction needs PyTorch. Only `verify` runs transformers (the optional `hf` extra).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mathlm.data.tokenizer import Tokenizer
from mathlm.models import hf as hf_map
from mathlm.models import variants
from mathlm.train import checkpoint as ckpt
from mathlm.train.config import load_config
from mathlm.train.runs import abstract_params, load_run, model_config_of, run_dir_of, save_params_run

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Copied with the weights so that tokenizer roles, chat templates and stop ids survive a round trip.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ConvertError(ckpt.CheckpointError):
    """A one-line user-facing conversion problem (unsupported model, missing tensor, missing dependency)."""


# ----------------------------------------------------------------------------- safetensors IO

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped array, in the stored dtype."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_hf_weights(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (hf_dir / shard).is_file():
                raise ConvertError(f"{hf_dir}: shard {shard} named in {INDEX_FILE} is missing")
            tensors.update(read_safetensors(hf_dir / shard))
        return tensors
    if (hf_dir / SINGLE_FILE).is_file():
        return read_safetensors(hf_dir / SINGLE_FILE)
    if any(hf_dir.glob("pytorch_model*.bin")):
        raise ConvertError(f"{hf_dir}: only safetensors checkpoints are supported; re-save the model with "
                           "save_pretrained(..., safe_serialization=True)")
    raise ConvertError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal, as transformers counts), '500MiB' -> 500 * 2**20, '1000' -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def write_hf_weights(tensors: dict[str, np.ndarray], out: pathlib.Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index.json when above max_shard_bytes."""
    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:  # a stale file would shadow the new ones
        old.unlink(missing_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += w.nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    weight_map, files = {}, []
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(names, fname))
        files.append(fname)
    total = sum(w.nbytes for w in tensors.values())
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- mathlm -> HF

def _export_tokenizer(tok: Tokenizer, run_dir: pathlib.Path, out: pathlib.Path, cfg) -> None:
    if not tok.native:  # an imported tokenizer goes back out as it came in
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                (out / name).write_bytes((run_dir / name).read_bytes())
        side = out / "tokenizer_config.json"
        conf = json.loads(side.read_text()) if side.is_file() else {
            f"{r}_token": t for r, t in tok.special.items() if t and r != "mask"}
        if "tokenizer_class" not in conf:  # e.g. the roles-only file a fine-tuning run writes
            conf["tokenizer_class"] = "PreTrainedTokenizerFast"
            _write_json(side, conf)
        return
    spec = json.loads(tok.hf.to_str())
    # The mask token's embedding row is not exported (and its id may name an unrelated row): drop the token.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != tok.special["mask"]]
    # `tokenizer(text)` prepends <|bos|> as mathlm does for prompts; add_special_tokens=False gives our ids.
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|bos|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [tok.bos_id], "tokens": ["<|bos|>"]}},
    }
    _write_json(out / "tokenizer.json", spec)
    roles = {f"{r}_token": tok.special[r] for r in ("bos", "eos", "pad")}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **roles, "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False})
    _write_json(out / "special_tokens_map.json", roles)


def to_hf(run_path: str | pathlib.Path, out_dir: str | pathlib.Path, max_shard_bytes: int = 5 * 10**9,
          log: Callable[[str], None] = lambda m: None) -> pathlib.Path:
    """Write a Hugging Face model folder (LlamaForCausalLM, Qwen2ForCausalLM with q/k/v biases) for a run."""
    run_dir = run_dir_of(run_path)
    try:
        # The plain network with the same weights (a stack expansion: N + k layers); refuses before loading.
        model_cfg = variants.plain_form(model_config_of(run_path, load_config(run_dir / "config.yaml").model))
        hf_map.config_to_hf(model_cfg, bos_id=None, eos_id=None, pad_id=None)
    except (hf_map.HFMappingError, ValueError) as e:
        raise ConvertError(f"{run_path}: {e}") from None
    run = load_run(run_path)
    cfg, tok = variants.plain_form(run.cfg.model), run.tokenizer
    params = variants.plain_params(run.cfg.model, jax.device_get(nnx.to_pure_dict(nnx.state(run.model, nnx.Param))))
    flat = {k: np.asarray(v) for k, v in ckpt.flatten(params).items()}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_map.params_to_hf(cfg, flat)
    files = write_hf_weights(tensors, out, max_shard_bytes)
    hf_cfg = hf_map.config_to_hf(cfg, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    _write_json(out / "config.json", hf_cfg)
    (out / "generation_config.json").unlink(missing_ok=True)  # never keep one from an earlier export
    _export_tokenizer(tok, run.run_dir, out, cfg)
    if not (out / "generation_config.json").is_file():  # an imported model keeps its own (stop ids, sampling)
        _write_json(out / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                                     "pad_token_id": tok.pad_id})
    log(f"exported step {run.step} of {run.run_dir} as {hf_cfg['architectures'][0]} "
        f"({sum(w.size for w in tensors.values()):,} params in {len(files)} file(s)) to {out}")
    return out


def to_peft(run_path: str | pathlib.Path, out_dir: str | pathlib.Path,
            log: Callable[[str], None] = lambda m: None) -> pathlib.Path:
    """Write a LoRA run's adapter alone in PEFT format: adapter_model.safetensors + adapter_config.json (the base
    model it applies to is the run's `model.init_from`, exported with `convert to-hf` of that run)."""
    from mathlm.models import lora
    run = load_run(run_path, overrides=("model.dtype=float32",))
    if variants.name_of(run.cfg.model) != lora.NAME:
        raise ConvertError(f"{run_path}: --peft exports LoRA adapters; this run is a "
                           f"{variants.name_of(run.cfg.model)} model")
    opts = lora.LoraOptions.parse(variants.options_of(run.cfg.model))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(run.model, nnx.Param)))
    tensors = lora.peft_tensors(run.cfg.model, params, opts)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", {**lora.peft_config(opts),
                                              "base_model_name_or_path": run.cfg.model.init_from})
    log(f"exported the LoRA adapter of step {run.step} ({len(tensors) // 2} modules, "
        f"{sum(t.size for t in tensors.values()):,} params) in PEFT format to {out}")
    return out


# ----------------------------------------------------------------------------- HF -> mathlm

def from_hf(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
            log: Callable[[str], None] = lambda m: None) -> pathlib.Path:
    """Write a mathlm run folder (config.yaml, tokenizer, checkpoints/0/params) for a Llama/Mistral/Qwen2 folder."""
    src = pathlib.Path(hf_dir)
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src}: no config.json (expected a Hugging Face model folder)")
    try:
        model_cfg, notes = hf_map.config_from_hf(json.loads((src / "config.json").read_text()))
    except hf_map.HFMappingError as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from None
    except KeyError as e:
        raise ConvertError(f"{src / 'config.json'}: missing field {e.args[0]}") from None
    except (TypeError, ValueError) as e:  # invalid JSON, or a field of the wrong type
        raise ConvertError(f"{src / 'config.json'}: {e}") from None
    for note in notes:
        log(f"note: {note}")
    if not (src / "tokenizer.json").is_file():
        raise ConvertError(f"{src}: no tokenizer.json (a slow-only tokenizer can be converted with transformers: "
                           "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    try:
        tok = Tokenizer.load(src)
    except ValueError as e:
        raise ConvertError(f"{src}: {e}") from None
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConvertError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model only "
                           f"{model_cfg.vocab_size} embedding rows")
    base = load_config(None)
    cfg = dataclasses.replace(base, model=model_cfg,
                              train=dataclasses.replace(base.train, seq_len=min(base.train.seq_len,
                                                                                model_cfg.max_seq_len)))
    _, like = abstract_params(cfg)
    shapes = {k: tuple(v.shape) for k, v in ckpt.flatten(like).items()}
    try:
        flat = hf_map.params_from_hf(model_cfg, read_hf_weights(src), shapes)
    except hf_map.HFMappingError as e:
        raise ConvertError(f"{src}: {e}") from None
    out = save_params_run(out_dir, cfg, ckpt.unflatten(like, flat), src)
    if (src / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
    tok.save(out / "tokenizer.json")  # records roles found only in config.json in tokenizer_config.json
    log(f"imported {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size} "
        f"({model_cfg.param_count():,} params) into {out}")
    return out


# ----------------------------------------------------------------------------- verification

VERIFY_TEXTS = (
    ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?\nAnswer: In May she sold 48 / 2 = 24 clips. "
     "Altogether she sold 48 + 24 = 72 clips. #### 72"),
    ("Let $f(x) = 3x^2 - 5x + 2$. The roots satisfy $x = \\frac{5 \\pm \\sqrt{25 - 24}}{6}$, so $x = 1$ or "
     "$x = \\frac{2}{3}$. Hence $\\int_0^1 f(x)\\,dx = 1 - \\frac{5}{2} + 2 = \\frac{1}{2}$, and 0.5 = 1/2."),
    ("The history of mathematics is long. Euclid's Elements, written around 300 BC, proved that there are "
     "infinitely many primes: given any finite list, multiply them together and add one; the result has a prime "
     "factor that is not on the list. Two thousand years later, Euler connected the primes to the zeta function."),
    ("def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n\nprint(gcd(1071, 462))  # 21\n"
     "Matrix [[1, 2], [3, 4]] has determinant -2 and trace 5; 12345679 * 9 = 111111111."),
)


def require_hf_runtime():
    try:
        import torch
        import transformers
    except ImportError:
        raise ConvertError("--verify needs PyTorch and transformers: install mathlm[hf] "
                           "(pip install 'mathlm[hf]')") from None
    return torch, transformers


def verify_sequences(tok: Tokenizer, vocab_size: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """The model's own tokenization of varied texts (math, LaTeX, prose, code) plus one random-id sequence."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    seqs = [(bos + tok.encode(t))[:max_len] for t in VERIFY_TEXTS]
    seqs.append(np.random.default_rng(seed).integers(0, vocab_size, min(max_len, 256)).tolist())
    return seqs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def verify(run_path: str | pathlib.Path, hf_dir: str | pathlib.Path, *, atol: float = 1e-4,
           max_kl: float = 1e-6, min_argmax: float = 0.99) -> dict:
    """Run the mathlm run and the Hugging Face folder in float32 on the same sequences and compare the logits.

    ok = max |Δlogit| <= atol, max per-token KL(hf || mathlm) <= max_kl, argmax agreement >= min_argmax."""
    torch, transformers = require_hf_runtime()
    run = load_run(run_path, overrides=("model.dtype=float32",))
    transformers.utils.logging.disable_progress_bar()
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), attn_implementation="eager", **{dtype_kw: torch.float32}).eval()
    cfg = run.cfg.model
    seqs = verify_sequences(run.tokenizer, cfg.vocab_size, cfg.max_seq_len)
    max_diff, worst_kl, agree, n = 0.0, 0.0, 0, 0
    for ids in seqs:
        ours = np.asarray(run.model(jax.numpy.asarray([ids], jax.numpy.int32))[0])
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0, :, : cfg.vocab_size].float().numpy()
        max_diff = max(max_diff, float(np.abs(ours - theirs).max()))
        lp_theirs, lp_ours = _log_softmax(theirs), _log_softmax(ours)
        kl = (np.exp(lp_theirs) * (lp_theirs - lp_ours)).sum(-1)
        worst_kl = max(worst_kl, float(kl.max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        n += len(ids)
    report = {"sequences": len(seqs), "tokens": n, "max_abs_logit_diff": max_diff, "max_kl": worst_kl,
              "argmax_agreement": agree / n, "atol": atol, "max_kl_allowed": max_kl, "min_argmax": min_argmax}
    report["ok"] = max_diff <= atol and worst_kl <= max_kl and agree / n >= min_argmax
    return report


def format_report(r: dict) -> str:
    verdict = "OK" if r["ok"] else "FAILED"
    return (f"verify: {r['sequences']} sequences, {r['tokens']} tokens, float32: max |Δlogit| "
            f"{r['max_abs_logit_diff']:.2e} (limit {r['atol']:.0e}), max KL {r['max_kl']:.2e} "
            f"(limit {r['max_kl_allowed']:.0e}), argmax agreement {100 * r['argmax_agreement']:.2f}% "
            f"(min {100 * r['min_argmax']:.0f}%): {verdict}")
