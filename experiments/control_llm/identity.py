"""Experiment 1, identity_at_init (`run.py identity`): every merge of concat and hybrid, and stack, expanded from a
tiny random base; max |Δlogit| against the base, each site's divergence at init, prog's per-site perturbation
against its estimate, and cached greedy decoding against the base's, written to identity_at_init/results.json and
its plot.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
from common import HERE, _pure, machine, write_results

MERGES = ("lerp", "slerp", "dlerp", "dlerpin", "moe", "proj", "prog")

TOL = {"lerp": 1e-6, "proj": 1e-6, "moe": 1e-6, "stack": 1e-6, "slerp": 1e-6, "dlerp": 1e-5, "dlerpin": 1e-5}
IDENTITY_SHAPE = dict(vocab_size=512, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=128,
                      mask_token=False)


def _site_perturbation(model, tokens) -> dict:
    """Per merge site, mean over tokens of |out - h_pre| / |h_pre| (the merge's change of the pretrained branch's
    output), with h_pre the site's own pretrained output in the expanded model (block by block)."""
    import jax
    import jax.numpy as jnp

    from mathlm.models.expand import MergeSite
    from mathlm.models.transformer import attention_mask
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(jnp.ones((b, t), jnp.int32), True)
    x = model.embed(tokens)
    out = {}
    for j, blk in enumerate(model.blocks):
        if isinstance(blk, MergeSite):
            h_pre = blk.pretrained(x, positions, mask)
            y = blk(x, positions, mask)
            rel = jnp.linalg.norm(y - h_pre, axis=-1) / jnp.linalg.norm(h_pre, axis=-1)
            a = float(jax.nn.sigmoid(blk.interpolation_factor[...][0])) if hasattr(blk, "interpolation_factor") \
                else None
            out[str(j)] = {"measured_rel": float(jnp.mean(rel)), "a": a,
                           "mean_abs": float(jnp.mean(jnp.linalg.norm(y - h_pre, axis=-1))),
                           "mean_h_pre_norm": float(jnp.mean(jnp.linalg.norm(h_pre, axis=-1)))}
            x = y
        else:
            x = blk(x, positions, mask)
    return out


def _identity_case(base_cfg, base_params, base_logits, base_decode, tokens, prompts, typ, merge, div_loss="cosine",
                   div_alpha=1.0, decode=True):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mathlm import models
    from mathlm.models import variants
    from mathlm.models.generate import Generator, Sampling
    from mathlm.train.objectives import forward
    opts = dict(type=typ, num_layers=4, merge=merge or "lerp", gate_init=0.0, freeze_gate=False, div_loss=div_loss,
                div_alpha=div_alpha)
    cfg = dataclasses.replace(base_cfg, variant={"name": "expand", **opts})
    params = variants.from_base(cfg, base_cfg, base_params, models.init_params(cfg, 1))
    graphdef = models.abstract(cfg)[0]
    fwd = jax.jit(lambda p, x: forward(nnx.merge(graphdef, p), x))
    logits, aux, diag = jax.device_get(fwd(params, tokens))
    diff = np.abs(np.asarray(logits, np.float64) - base_logits)
    row = {"type": typ, "merge": merge, "div_loss": div_loss if typ != "stack" else None,
           "div_alpha": div_alpha if typ != "stack" else None,
           "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
           "site_div": {k.split("/")[0][4:]: float(v) for k, v in diag.items() if k.endswith("/div")},
           "site_cos": {k.split("/")[0][4:]: float(v) for k, v in diag.items() if k.endswith("/cos")},
           "site_gate": {k.split("/")[0][4:]: float(v) for k, v in diag.items() if k.endswith("/gate")},
           "aux_loss_total": float(aux)}
    key = "stack" if typ == "stack" else merge
    if key in TOL:
        row["tolerance"] = TOL[key]
        row["within_tolerance"] = bool(row["max_abs_logit_diff"] <= TOL[key])
    if merge == "prog":
        d = base_cfg.d_model
        sites = _site_perturbation(nnx.merge(graphdef, params), jnp.asarray(tokens))
        for s in sites.values():
            s["estimate_rel"] = (1 - s["a"]) * 0.01 * d ** 0.5  # (1 - a) 0.01 sqrt(d) |h| / |h|
        row["prog_site_perturbation"] = sites
    if decode:
        gen = Generator(nnx.merge(graphdef, params), eos_id=2, pad_id=0)
        out = gen(prompts, Sampling(24, 0.0))
        row["decode_token_identical"] = out.tokens == base_decode
        row["decode_first_mismatch"] = next((i for i, (x, y) in enumerate(zip(out.tokens, base_decode)) if x != y),
                                            None)
    return row


def identity(args) -> dict:
    import jax
    from flax import nnx

    from mathlm import models
    from mathlm.models.generate import Generator, Sampling
    from mathlm.models.transformer import ModelConfig
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "bases": {}}
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, IDENTITY_SHAPE["vocab_size"], size=(4, 64)).astype(np.int32)
    prompts = [rng.integers(3, IDENTITY_SHAPE["vocab_size"], size=n).tolist() for n in (5, 9, 17, 30)]
    base_cfg = ModelConfig(**IDENTITY_SHAPE)
    base_model = models.build(base_cfg, nnx.Rngs(params=jax.random.key(args.seed)))
    for name, head_scale in (("random_init", 1.0), ("random_init_head_x25", 25.0)):
        # the second base multiplies lm_head by 25: logits of O(5) instead of O(0.2), a stricter absolute test
        base_params = _pure(base_model)
        base_params["lm_head"]["kernel"] = base_params["lm_head"]["kernel"] * head_scale
        bm = nnx.merge(models.abstract(base_cfg)[0], base_params)
        base_logits = np.asarray(jax.jit(lambda m, x: m(x))(bm, tokens), np.float64)
        base_decode = Generator(bm, eos_id=2, pad_id=0)(prompts, Sampling(24, 0.0)).tokens
        rows = []
        cases = [("concat", m) for m in MERGES] + [("hybrid", m) for m in MERGES] + [("stack", None)]
        for typ, merge in cases:
            rows.append(_identity_case(base_cfg, base_params, base_logits, base_decode, tokens, prompts, typ, merge))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "prog_site_perturbation"}), flush=True)
        # the divergence of proj at init, by loss and alpha (P enters only the divergence)
        extra = []
        for div_loss, alpha in (("mse", 1.0), ("cosine", 0.0), ("cosine", -1.0)):
            for merge in ("lerp", "proj"):
                extra.append(_identity_case(base_cfg, base_params, base_logits, base_decode, tokens, prompts,
                                            "concat", merge, div_loss, alpha, decode=False))
        res["bases"][name] = {"lm_head_scale": head_scale, "max_abs_base_logit": float(np.abs(base_logits).max()),
                              "std_base_logit": float(base_logits.std()), "cases": rows, "divergence_cases": extra}
    res["settings"] = {"shape": IDENTITY_SHAPE, "num_layers_k": 4, "gate_init": 0.0, "div_loss": "cosine",
                       "div_alpha": 1.0, "tokens": list(tokens.shape), "decode_prompts": [len(p) for p in prompts],
                       "decode_new_tokens": 24, "dtype": "float32", "seed": args.seed}
    res["wall_seconds"] = time.perf_counter() - t0
    write_results("identity_at_init", res)
    plot_identity(res)
    print(f"identity_at_init: {res['wall_seconds']:.0f} s", flush=True)
    return res


def plot_identity(res: dict) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, base) in enumerate(res["bases"].items()):
        labels = [f"{c['type']}" + (f"/{c['merge']}" if c["merge"] else "") for c in base["cases"]]
        vals = [max(c["max_abs_logit_diff"], 1e-12) for c in base["cases"]]
        x = np.arange(len(labels)) + (i - 0.5) * 0.38
        ax.bar(x, vals, width=0.38, label=f"{name} (max |logit| {base['max_abs_base_logit']:.2g})")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    for tol, style in ((1e-6, "--"), (1e-5, ":")):
        ax.axhline(tol, color="k", ls=style, lw=0.8, label=f"{tol:g}")
    ax.set_ylabel("max |Δlogit| vs base at init (0 shown as 1e-12)", fontsize=8)
    ax.set_title("identity_at_init: expanded model vs its base (k=4 of 8 layers, d=128, f32)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "identity_at_init" / "max_logit_diff.png", dpi=120)
