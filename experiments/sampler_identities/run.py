"""Sampler identities of the masked-diffusion sampler (`mathlm.models.diffusion.sample`), on a tiny trained MDM.

Model: a bidirectional Transformer (d 64, 2 layers) trained for TRAIN_STEPS steps with the repo's `mdm` objective
(hand-written optax loop around `get_objective("mdm")`) on sequences of a random first-order Markov chain (V = 16,
Dirichlet(0.1) rows), so its predictions are peaked and position-dependent like a real LM's, not random-init noise.
Prompts: the first 1..8 tokens of held-out chain sequences, left-padded into an 8-slot prompt region (the
generator's layout), followed by LENGTH masks.

Checks (all through the traceable `sample`, jitted, with `history=True`):
  (a) guidance at w = 0 through the guided code path (both halves in one batch, l_u + 1·(l_c − l_u)) is
      token-identical to plain conditional sampling under the same keys — both rules, several temperatures
      (w = 1 is run as a control that guidance does change outputs);
  (b) low_confidence with steps == length reveals exactly one token per step per row (counted from the history);
      steps < length: the per-step counts equal n_mask − floor(n_mask·s/t); also the reference's rule
      int(n_mask·(1 − s/t)), applied to our trajectory and run on its own trajectory, for comparison;
  (c) temperature 1e-4 and 1e-6 (Gumbel-max with noise) give the same tokens as T = 0 (argmax, no noise);
  (d) in every run: prompt and padding columns are unchanged, the final canvas holds no mask, and a revealed slot
      never changes or becomes masked again (history monotone).
Also: the ancestral rule's mean number of masks remaining against its expectation LENGTH·t_{k+1}.

Run: /work/venv/bin/python experiments/sampler_identities/run.py  (writes results.json and masks_vs_step.png)
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mathlm.models.diffusion import EPS, guided_logits, sample
from mathlm.models.transformer import ModelConfig, Transformer
from mathlm.train.objectives import get_objective

OUT = Path(__file__).resolve().parent
SEED = 0
V, L_TRAIN, ALPHA = 16, 32, 0.1
TRAIN_STEPS, BATCH, LR = 400, 64, 1e-3
P_LEN, LENGTH = 8, 24
PROMPT_LENS = [1, 3, 5, 8, 2, 7, 4, 6, 8, 1, 5, 3, 6, 2, 7, 4]  # 16 rows
TEMPS = [0.0, 0.5, 1.0, 2.0]
CFG = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192, max_seq_len=L_TRAIN,
                  causal=False, mask_token=True)
MASK = V

_sample = nnx.jit(sample, static_argnames=("length", "steps", "rule", "greedy", "guided", "eps", "history"))


def make_chain(rng):
    P = rng.dirichlet(np.full(V, ALPHA), size=V)
    w, vecs = np.linalg.eig(P.T)
    pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    return P, pi / pi.sum()


def sample_chain(rng, P, pi, n, length):
    x = np.empty((n, length), np.int32)
    x[:, 0] = rng.choice(V, size=n, p=pi)
    cum = np.cumsum(P, 1)
    for j in range(1, length):
        x[:, j] = np.minimum((rng.random(n)[:, None] > cum[x[:, j - 1]]).sum(1), V - 1)
    return x


def train_model(P, pi):
    model = Transformer(CFG, nnx.Rngs(SEED))
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR)), wrt=nnx.Param)
    objective = get_objective("mdm")

    @nnx.jit
    def step(model, opt, batch, rng):
        def loss_fn(m):
            s, met = objective(m, batch, rng, None)
            return s / met["denom"]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng, key, losses = np.random.default_rng(SEED + 2), jax.random.PRNGKey(SEED), []
    pos = np.broadcast_to(np.arange(L_TRAIN, dtype=np.int32), (BATCH, L_TRAIN)).copy()
    for _ in range(TRAIN_STEPS):
        x = sample_chain(rng, P, pi, BATCH, L_TRAIN)
        key, k = jax.random.split(key)
        losses.append(float(step(model, opt, {"inputs": jnp.asarray(x), "positions": jnp.asarray(pos),
                                              "segment_ids": jnp.ones((BATCH, L_TRAIN), jnp.int32)}, k)))
    return model, losses


def canvas_for(prompts):
    b = len(prompts)
    canvas = np.zeros((b, P_LEN + LENGTH), np.int32)
    canvas[:, P_LEN:] = MASK
    seg = np.zeros_like(canvas)
    seg[:, P_LEN:] = 1
    for i, p in enumerate(prompts):
        canvas[i, P_LEN - len(p):P_LEN] = p
        seg[i, P_LEN - len(p):P_LEN] = 1
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    return canvas, pos, seg


def run(model, inputs, keys, *, temperature, rule, steps, cfg_scale=0.0, guided=False, length=LENGTH):
    canvas, pos, seg = inputs
    out, hist = _sample(model, jnp.asarray(canvas), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(keys),
                        jnp.float32(temperature), jnp.float32(cfg_scale), length=length, steps=steps, rule=rule,
                        greedy=temperature == 0, guided=guided, eps=EPS, history=True)
    return np.asarray(out), np.asarray(hist)


def invariants(canvas, out, hist):
    """(d): prompt/padding unchanged, no mask in the output, revealed slots never change, no out-of-vocab token."""
    prompt_ok = bool(np.array_equal(out[:, :P_LEN], canvas[:, :P_LEN]))
    no_mask = bool((out[:, P_LEN:] != MASK).all())
    in_vocab = bool(((out[:, P_LEN:] >= 0) & (out[:, P_LEN:] < V)).all())
    prev = canvas[None, :, P_LEN:]
    seq = np.concatenate([prev, hist], 0)  # (steps + 1, B, L)
    was = seq[:-1] != MASK
    stable = bool((seq[1:][was] == seq[:-1][was]).all())
    final_matches_hist = bool(np.array_equal(hist[-1], out[:, P_LEN:]))
    return {"prompt_unchanged": prompt_ok, "no_mask_in_output": no_mask, "tokens_in_vocab": in_vocab,
            "revealed_never_change": stable, "history_last_equals_output": final_matches_hist}


def reveal_counts(canvas, hist):
    """(steps, B) tokens revealed at each step, from the history."""
    masks = np.concatenate([np.full((1, canvas.shape[0]), LENGTH), (hist == MASK).sum(-1)], 0)
    return masks[:-1] - masks[1:], masks


def ours_rule(steps, length, eps=EPS):
    """Our low_confidence count on its own trajectory: n − floor(n·s/t), float32 as in the sampler."""
    ts = np.asarray(jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32))  # the sampler's times
    n, out = length, []
    for i in range(steps):
        k = n if i == steps - 1 else n - int(np.floor(np.float32(n) * (ts[i + 1] / ts[i])))
        out.append(k)
        n -= k
    return out


def reference_rule(steps, length, eps=EPS, trajectory=None):
    """SMDM diff_sample 'greddy': int(n_mask·(1 − s/t)) (last step: all). With `trajectory` (n_mask before each
    step) the rule is evaluated on that trajectory; else on its own."""
    ts = np.asarray(jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32))
    n, out = length, []
    for i in range(steps):
        if trajectory is not None:
            n = int(trajectory[i])
        k = n if i == steps - 1 else int(np.float32(n) * (np.float32(1) - ts[i + 1] / ts[i]))
        out.append(k)
        n -= k
    return out


def main():
    t_start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    P, pi = make_chain(rng)
    model, losses = train_model(P, pi)
    train_s = time.perf_counter() - t_start
    print(f"trained {TRAIN_STEPS} steps in {train_s:.0f}s; loss first 20 {np.mean(losses[:20]):.3f}, "
          f"last 50 {np.mean(losses[-50:]):.3f}", flush=True)
    held = sample_chain(np.random.default_rng(SEED + 1), P, pi, len(PROMPT_LENS), P_LEN)
    prompts = [held[i, :n].tolist() for i, n in enumerate(PROMPT_LENS)]
    inputs = canvas_for(prompts)
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(len(prompts))))
    b = len(prompts)
    invariant_log = []  # (d) for every run

    def check(tag, out, hist):
        inv = invariants(inputs[0], out, hist)
        invariant_log.append({"run": tag, **inv})
        return out, hist

    # (a) CFG w = 0 through the guided path == plain conditional sampling, same keys.
    cfg_rows = []
    for rule in ("low_confidence", "ancestral"):
        for temp in TEMPS:
            for steps in (LENGTH, LENGTH // 3):
                tag = f"{rule} T={temp} steps={steps}"
                plain, hp = check(f"plain {tag}", *run(model, inputs, keys, temperature=temp, rule=rule,
                                                        steps=steps))
                g0, hg = check(f"guided w=0 {tag}", *run(model, inputs, keys, temperature=temp, rule=rule,
                                                         steps=steps, cfg_scale=0.0, guided=True))
                g1, _ = check(f"guided w=1 {tag}", *run(model, inputs, keys, temperature=temp, rule=rule,
                                                       steps=steps, cfg_scale=1.0, guided=True))
                cfg_rows.append({"rule": rule, "temperature": temp, "steps": steps,
                                 "identical_output": bool(np.array_equal(plain, g0)),
                                 "identical_history": bool(np.array_equal(hp, hg)),
                                 "tokens_differing": int((plain[:, P_LEN:] != g0[:, P_LEN:]).sum()),
                                 "control_w1_tokens_differing": int((plain[:, P_LEN:] != g1[:, P_LEN:]).sum()),
                                 "tokens_compared": int(b * LENGTH)})
    print("(a)", all(r["identical_output"] and r["identical_history"] for r in cfg_rows), flush=True)
    # Why (a) holds: the guided logits at w = 0, l_u + 1·(l_c − l_u), against the plain l_c on two canvases (all
    # masks; half of the generation region revealed by a greedy run).
    half = inputs[0].copy()
    greedy_out, _ = run(model, inputs, keys, temperature=0.0, rule="low_confidence", steps=LENGTH)
    half[:, P_LEN:P_LEN + LENGTH // 2] = greedy_out[:, P_LEN:P_LEN + LENGTH // 2]
    logit_rows = []
    for name, cv in (("all masked", inputs[0]), ("half revealed", half)):
        args = (jnp.asarray(cv), jnp.asarray(inputs[1]), jnp.asarray(inputs[2]))
        pm = jnp.asarray((np.arange(P_LEN + LENGTH) < P_LEN)[None] & (inputs[2] > 0))
        lc = np.asarray(model(*args))[:, P_LEN:]
        lg = np.asarray(guided_logits(model, *args, pm, 0.0, guided=True))[:, P_LEN:]
        top2 = np.sort(lc, -1)[..., -2:]
        logit_rows.append({"canvas": name, "max_abs_diff": float(np.abs(lg - lc).max()),
                           "frac_bit_identical": float(np.mean(lg == lc)),
                           "argmax_identical": bool((lg.argmax(-1) == lc.argmax(-1)).all()),
                           "min_top1_top2_logit_gap": float((top2[..., 1] - top2[..., 0]).min())})
    print("(a) logits", logit_rows, flush=True)

    # (b) reveal counts of low_confidence, from the history.
    sched_rows, curves = [], {}
    for steps in (LENGTH, 8, 10):
        for temp in (0.0, 1.0):
            out, hist = check(f"low_confidence T={temp} steps={steps}",
                              *run(model, inputs, keys, temperature=temp, rule="low_confidence", steps=steps))
            counts, masks = reveal_counts(inputs[0], hist)
            expected = ours_rule(steps, LENGTH)
            same_all_rows = bool((counts == counts[:, :1]).all())
            row = {"steps": steps, "length": LENGTH, "temperature": temp,
                   "revealed_per_step": counts[:, 0].tolist(), "identical_across_rows": same_all_rows,
                   "matches_n_minus_floor_n_s_over_t": bool((counts == np.asarray(expected)[:, None]).all()),
                   "reference_rule_on_our_trajectory": reference_rule(steps, LENGTH, trajectory=masks[:-1, 0]),
                   "reference_rule_own_trajectory": reference_rule(steps, LENGTH)}
            if steps == LENGTH:
                row["exactly_one_per_step"] = bool((counts == 1).all())
            sched_rows.append(row)
            curves[f"low_confidence steps={steps} T={temp}"] = masks[:, 0].tolist()
    ref_batch = reference_rule(LENGTH, LENGTH * b)  # the reference counts over the flattened batch
    print("(b)", [(r["steps"], r["revealed_per_step"]) for r in sched_rows[::2]], flush=True)

    # ancestral: masks remaining vs step, against the expectation LENGTH * t_{k+1}
    anc = {}
    for steps in (LENGTH, 8):
        ms = []
        for rep in range(8):
            k2 = np.asarray(jax.vmap(lambda k: jax.random.fold_in(k, 100 + rep))(jnp.asarray(keys)))
            out, hist = check(f"ancestral T=1.0 steps={steps} rep={rep}",
                              *run(model, inputs, k2, temperature=1.0, rule="ancestral", steps=steps))
            ms.append(reveal_counts(inputs[0], hist)[1])
        ms = np.concatenate(ms, 1)  # (steps + 1, 8 * B)
        ts = np.linspace(1.0, EPS, steps + 1)
        expect = LENGTH * ts
        expect[-1] = 0.0
        anc[steps] = {"steps": steps, "rows": int(ms.shape[1]), "mean_masks_remaining": ms.mean(1).tolist(),
                      "se": (ms.std(1, ddof=1) / np.sqrt(ms.shape[1])).tolist(), "expected": expect.tolist(),
                      "max_abs_z": float(np.max(np.abs(ms.mean(1) - expect)[1:-1] /
                                                np.maximum(ms.std(1, ddof=1)[1:-1] / np.sqrt(ms.shape[1]), 1e-9)))}
        curves[f"ancestral steps={steps} (mean of {ms.shape[1]} rows)"] = ms.mean(1).tolist()

    # (c) T -> 0 equals argmax.
    t0_rows = []
    for rule in ("low_confidence", "ancestral"):
        for steps in (LENGTH, LENGTH // 3):
            greedy, hg = check(f"{rule} T=0 steps={steps}",
                               *run(model, inputs, keys, temperature=0.0, rule=rule, steps=steps))
            for temp in (1e-4, 1e-6):
                out, h = check(f"{rule} T={temp} steps={steps}",
                               *run(model, inputs, keys, temperature=temp, rule=rule, steps=steps))
                t0_rows.append({"rule": rule, "steps": steps, "temperature": temp,
                                "identical_output": bool(np.array_equal(out, greedy)),
                                "identical_history": bool(np.array_equal(h, hg)),
                                "tokens_differing": int((out[:, P_LEN:] != greedy[:, P_LEN:]).sum()),
                                "tokens_compared": int(b * LENGTH)})
    print("(c)", all(r["identical_output"] for r in t0_rows), flush=True)

    runtime = time.perf_counter() - t_start
    inv_all = {k: all(r[k] for r in invariant_log) for k in invariant_log[0] if k != "run"}
    results = {
        "setup": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 192, "vocab": V,
                            "params": CFG.param_count()},
                  "training": f"{TRAIN_STEPS} steps, batch {BATCH}, AdamW {LR}, hand-written optax loop over "
                              f"get_objective('mdm') on Markov-chain sequences (V={V}, L={L_TRAIN}, "
                              f"Dirichlet({ALPHA}))",
                  "train_loss_first20": float(np.mean(losses[:20])), "train_loss_last50": float(np.mean(losses[-50:])),
                  "rows": b, "prompt_lengths": PROMPT_LENS, "prompt_region": P_LEN, "length": LENGTH, "eps": EPS,
                  "temperatures": TEMPS},
        "summary": {
            "a_cfg_w0_identical": all(r["identical_output"] and r["identical_history"] for r in cfg_rows),
            "b_one_per_step_when_steps_eq_length": all(r["exactly_one_per_step"] for r in sched_rows
                                                       if "exactly_one_per_step" in r),
            "b_counts_match_formula": all(r["matches_n_minus_floor_n_s_over_t"] for r in sched_rows),
            "c_small_T_equals_argmax": all(r["identical_output"] and r["identical_history"] for r in t0_rows),
            "d_invariants_all_runs": inv_all, "d_runs_checked": len(invariant_log),
        },
        "a_cfg_w0": cfg_rows,
        "a_guided_w0_logits_vs_plain": logit_rows,
        "b_low_confidence_schedule": sched_rows,
        "b_reference_rule_note": "reference SMDM diff_sample 'greddy': int(n_mask*(1-s/t)) per step (all on the last "
                                 "step). On OUR trajectory (one reveal per step, steps == length) it is 0 at every "
                                 "step but the last; on ITS OWN trajectory it is 0 at the first step only, then 1 per "
                                 "step and 2 on the last. The reference also counts n_mask over the whole batch.",
        "b_reference_rule_whole_batch_steps_eq_length": {"n_mask_total": LENGTH * b,
                                                         "revealed_per_step": ref_batch},
        "ancestral_masks_remaining": {str(k): v for k, v in anc.items()},
        "c_small_temperature": t0_rows,
        "d_invariants": invariant_log,
        "mask_curves": curves,
        "runtime_s": runtime, "train_s": train_s,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), jax {jax.__version__} "
                   f"{jax.default_backend()}",
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results)
    print(json.dumps(results["summary"], indent=1))
    print(f"done in {runtime:.0f}s", flush=True)


def plot(res):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    for name, m in res["mask_curves"].items():
        if "T=1.0" in name and "low_confidence" in name:
            continue  # identical counts to T=0 (see results.json)
        ax.plot(range(len(m)), m, marker="." if "ancestral" in name else "o", ms=4, label=name.replace(" T=0.0", ""))
    for r in res["b_low_confidence_schedule"]:
        if r["steps"] == res["setup"]["length"] and r["temperature"] == 0.0:
            own = np.concatenate([[res["setup"]["length"]],
                                  res["setup"]["length"] - np.cumsum(r["reference_rule_own_trajectory"])])
            ax.plot(range(len(own)), own, ls="--", color="k", label="reference int(n(1-s/t)), steps=length")
    for _k, a in res["ancestral_masks_remaining"].items():
        ax.plot(range(len(a["expected"])), a["expected"], ls=":", color="gray", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("masks remaining (row 0 / mean)")
    ax.set_title(f"masks remaining, length {res['setup']['length']} (dotted: ancestral expectation L·t)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for r in res["b_low_confidence_schedule"]:
        if r["steps"] == res["setup"]["length"] and r["temperature"] == 0.0:
            x = np.arange(r["steps"])
            ax2.bar(x - 0.2, r["revealed_per_step"], 0.4, label="ours: n − floor(n·s/t)")
            ax2.bar(x + 0.2, r["reference_rule_own_trajectory"], 0.4, label="reference int(n(1−s/t)), own trajectory")
            ax2.plot(x, r["reference_rule_on_our_trajectory"], "kx", label="reference rule on our trajectory")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens revealed")
    ax2.set_title("low_confidence, steps == length")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "masks_vs_step.png", dpi=120)


if __name__ == "__main__":
    main()
