"""`mathlm convert expand` and `mathlm convert merge-back`: Control-LLM surgery on run folders.

expand:     a plain run (trained here or imported by `convert from-hf`) -> an expanded run folder (the factory's
            `expand` variant; its checkpoint metadata holds the `expansion` block), usable by generate, eval,
            train (`model.init_from`) and, for stack, `convert to-hf`.
merge-back: a concat run (lerp/slerp/dlerp/dlerpin) -> a plain run of the base architecture, with the deltas
            against the unmerged model measured on held-out text (an approximation; no pass threshold).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mathlm import models
from mathlm.models import merge_back, variants
from mathlm.models.expand import NAME as EXPAND
from mathlm.models.expand import ExpandError, ExpandOptions
from mathlm.train.config import load_config
from mathlm.train.eval.gates import gates_of
from mathlm.train.runs import load_run, save_params_run
from mathlm.train.state import n_params


class ExpansionError(ValueError):
    """A user-facing problem with an expansion or merge-back (one line at the CLI)."""


def _pure(model) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def expand_run(run_path: str, out_dir: str | pathlib.Path, opts: ExpandOptions,
               log: Callable[[str], None] = lambda m: None) -> pathlib.Path:
    """Expand a plain run into OUT (checkpoint step 0, expanded_from recorded). Checks everything first: a bad
    setting, an already expanded run or an OUT that holds something writes nothing."""
    _check_out(out_dir)
    run = load_run(run_path)  # the run's own dtype: OUT computes as the base did
    base_cfg = run.cfg.model
    if variants.name_of(base_cfg) != variants.PLAIN:
        raise ExpansionError(f"{run_path} is already expanded (model.variant {variants.name_of(base_cfg)}); "
                             "expand a plain run")
    opts = dataclasses.replace(opts, expanded_from=str(run.run_dir))
    model_cfg = dataclasses.replace(base_cfg, variant={"name": EXPAND, **dataclasses.asdict(opts)})
    try:
        opts.validate(base_cfg)
        params = variants.from_base(model_cfg, base_cfg, _pure(run.model), models.init_params(model_cfg, 0))
    except ValueError as e:
        raise ExpansionError(str(e)) from None
    cfg = dataclasses.replace(run.cfg, model=model_cfg, expand=None)
    out = save_params_run(out_dir, cfg, params, run.run_dir / "tokenizer.json")
    block = models.metadata(model_cfg)["expansion"]
    n = n_params(params)
    log(f"expanded {run.run_dir} (step {run.step}): {opts.type}, k={opts.num_layers}, depth "
        f"{block['num_ori_layers']} -> {block['depth']}, sites {block['sites']}, inserted after "
        f"{block['inserted_after']}; {n:,} params -> {out}")
    return out


def _check_out(out_dir: str | pathlib.Path) -> None:
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExpansionError(f"{out} already exists and is not empty; choose a new output folder")


def _eval_gates(run) -> dict[int, float]:
    """The last eval's per-site gates, when that eval ran on this very checkpoint (gates of another step, e.g.
    dlerp's data-dependent ones before more training, would not describe these weights)."""
    results = gates_of(run.run_dir)
    return results["gates"] if results and results.get("step") == run.step else {}


def heldout_sequences(run, data: str | None, n: int = 32) -> list[list[int]]:
    """Up to n token sequences of held-out text: `data` (JSONL/text), else the run's own `data.validation` (files
    or token stores), else (a run trained on the synthetic corpus) that corpus's validation split; otherwise
    --data is required."""
    from mathlm.data import synth
    from mathlm.data.sources import read_examples
    from mathlm.data.store import TokenStore, is_store
    d, tok = run.cfg.data, run.tokenizer
    length = min(run.cfg.model.max_seq_len, 256)
    if data:
        sources = [data]
    elif d.validation:
        sources = list(d.validation)
    elif d.train == ["synth"]:
        sources = [str(synth.ensure_splits(run.run_dir / "data", synth.SynthConfig.from_data(d))["validation"])]
    else:
        raise ExpansionError(f"{run.run_dir} was not trained on the synthetic corpus and names no "
                             "data.validation: pass --data FILE (held-out JSONL or text)")
    seqs: list[list[int]] = []
    for src in sources:
        if is_store(src):
            store = TokenStore(src)
            docs = (store.doc(i)[0].tolist() for i in range(min(store.n_docs, n)))
        else:
            docs = (tok.encode(e.text) for e in read_examples([src]))
        for ids in docs:
            ids = ids if ids[:1] == [tok.bos_id] else [tok.bos_id] + ids
            if len(ids) >= 2:
                seqs.append(ids[:length])
            if len(seqs) == n:
                return seqs
    return seqs


def compare(model_a, model_b, seqs: list[list[int]]) -> dict:
    """max |Δlogit|, mean per-token KL(a || b) and next-token accuracy of both on `seqs` (a = unmerged)."""
    fwd = jax.jit(lambda m, x: m(x)[0])
    max_diff, kl_sum, hits_a, hits_b, n = 0.0, 0.0, 0, 0, 0
    for ids in seqs:
        x = jnp.asarray([ids], jnp.int32)
        la, lb = np.asarray(fwd(model_a, x), np.float64), np.asarray(fwd(model_b, x), np.float64)
        max_diff = max(max_diff, float(np.abs(la - lb).max()))
        pa = np.asarray(jax.nn.log_softmax(jnp.asarray(la)), np.float64)
        pb = np.asarray(jax.nn.log_softmax(jnp.asarray(lb)), np.float64)
        kl_sum += float((np.exp(pa) * (pa - pb)).sum(-1)[:-1].sum())
        targets = np.asarray(ids[1:])
        hits_a += int((la[:-1].argmax(-1) == targets).sum())
        hits_b += int((lb[:-1].argmax(-1) == targets).sum())
        n += len(ids) - 1
    return {"sequences": len(seqs), "tokens": n, "max_abs_logit_diff": max_diff, "mean_token_kl": kl_sum / max(n, 1),
            "next_token_accuracy_unmerged": hits_a / max(n, 1), "next_token_accuracy_merged": hits_b / max(n, 1),
            "accuracy_change": (hits_b - hits_a) / max(n, 1)}


def merge_back_run(run_path: str, out_dir: str | pathlib.Path, data: str | None = None,
                   log: Callable[[str], None] = lambda m: None) -> dict:
    """Merge a concat run back into the base architecture (OUT: a plain run) and report the deltas."""
    _check_out(out_dir)
    run = load_run(run_path, overrides=("model.dtype=float32",))  # compared in float32
    cfg = run.cfg.model
    if variants.name_of(cfg) != EXPAND:
        raise ExpansionError(f"{run_path} is not an expanded model (nothing to merge back)")
    opts = ExpandOptions.parse(variants.options_of(cfg))
    try:
        merge_back.check_mergeable(opts)
    except ExpandError as e:
        raise ExpansionError(f"{run_path}: {e}") from None
    gates = _eval_gates(run)
    params, used = merge_back.merged_params(_pure(run.model), cfg.n_layers, opts, gates)
    plain_cfg = dataclasses.replace(cfg, variant=None)
    merged = nnx.merge(models.abstract(plain_cfg)[0], params)
    own = "sigma(b)" if opts.merge in ("dlerp", "dlerpin") else "sigma(interpolation factor)"
    sources = {str(j): "eval running-mean gate" if j in gates else own for j in used}
    report = {"source": str(run.run_dir), "step": run.step, "merge": opts.merge,
              "site_weights": {str(j): a for j, a in used.items()}, "site_weight_sources": sources,
              "weights_from": ", ".join(sorted(set(sources.values()))),
              **compare(run.model, merged, heldout_sequences(run, data))}
    dtype = load_config(run.run_dir / "config.yaml", migrate=True).model.dtype  # OUT computes as the run did
    saved = dataclasses.replace(run.cfg, model=dataclasses.replace(plain_cfg, dtype=dtype), expand=None)
    out = save_params_run(out_dir, saved, params, run.run_dir / "tokenizer.json")
    (out / "merge_back.json").write_text(json.dumps(report, indent=1))
    log(f"merged {len(used)} sites of {run.run_dir} (step {run.step}) with {opts.merge} -> {out}")
    return report


def format_merge_report(r: dict) -> str:
    kl = r["mean_token_kl"]
    return (f"merge-back vs unmerged on {r['sequences']} held-out sequences ({r['tokens']} tokens): max |Δlogit| "
            f"{r['max_abs_logit_diff']:.3g}, mean KL {kl:.3g} nats/token (ppl ratio {math.exp(kl):.3f}), "
            f"next-token accuracy {r['next_token_accuracy_unmerged']:.4f} -> {r['next_token_accuracy_merged']:.4f} "
            f"({r['accuracy_change']:+.4f}); site weights from {r['weights_from']}")
