"""ELBO bound check for masked diffusion (SMDM, Nie et al., ICLR 2025) on data with a known entropy.

Data: a random first-order Markov chain over V tokens (transition rows ~ Dirichlet(alpha)), sequences of length L
started from the stationary distribution pi, so the exact entropy of a sequence is H(pi) + (L - 1) * H_rate with
H_rate = sum_i pi_i H(P_i). Every training batch is a fresh draw (no overfitting); a fixed held-out set is scored.

Models (same shape; only `causal` differs): a bidirectional MDM trained with the repo's `mdm` objective
(`get_objective("mdm")`: t ~ U(0,1), p = (1-eps)t + eps, loss sum CE/p over masked tokens / B·L, ssl_ratio 0.01) and
a causal ARM trained with `causal_lm` on [BOS, x_1..x_{L-1}] -> x_1..x_L. Both use a small hand-written optax loop
(AdamW) around those objective functions; the objectives are the unit under test.

Measured at each checkpoint on the held-out set (nats/token):
  - MDM MC-ELBO (`DiffusionScorer.elbo`, stratified t, N_MC samples per sequence) with standard errors;
  - MDM chain-rule NLL (`DiffusionScorer.chain_rule`, exact left-to-right);
  - ARM NLL (exact);
  - the true NLL of the held-out sequences under the generating chain, and the expected entropy.

Run: /work/venv/bin/python experiments/elbo_bound/run.py   (writes results.json and elbo_bound.png next to it)
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

from mathlm.models.diffusion import DiffusionScorer
from mathlm.models.transformer import ModelConfig, Transformer
from mathlm.train.objectives import get_objective

OUT = Path(__file__).resolve().parent
SEED = 0
V = 16            # real tokens 0..15; id 16 = BOS (ARM input only); id 17 = [MASK] (the model's vocab_size + 1 row)
BOS = V
L = 32
ALPHA = 0.1       # Dirichlet concentration of each transition row
BATCH = 64
STEPS = 3000
CHECKPOINTS = [100, 250, 500, 1000, 2000, 3000]
N_HELD = 256
N_MC = 128
LR = 1e-3
WARMUP = 100


# --- the Markov source -------------------------------------------------------------------------------------------

def make_chain(rng):
    P = rng.dirichlet(np.full(V, ALPHA), size=V)
    w, vecs = np.linalg.eig(P.T)
    pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    pi = pi / pi.sum()
    return P, pi


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def sample_chain(rng, P, pi, n):
    x = np.empty((n, L), np.int32)
    x[:, 0] = rng.choice(V, size=n, p=pi)
    cum = np.cumsum(P, 1)
    for j in range(1, L):
        u = rng.random(n)
        x[:, j] = np.minimum((u[:, None] > cum[x[:, j - 1]]).sum(1), V - 1)
    return x


def true_nll(x, P, pi):
    """Exact -log p(x) per sequence (nats)."""
    return -(np.log(pi[x[:, 0]]) + np.log(P[x[:, :-1], x[:, 1:]]).sum(1))


# --- training ----------------------------------------------------------------------------------------------------

def model_cfg(causal: bool) -> ModelConfig:
    # vocab_size = V + 1 (BOS) for both, so both nets have exactly the same parameters; the MDM never sees BOS.
    return ModelConfig(vocab_size=V + 1, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192, max_seq_len=L,
                       causal=causal, mask_token=True)


def arm_batch(x):
    b = x.shape[0]
    inputs = np.concatenate([np.full((b, 1), BOS, np.int32), x[:, :-1]], 1)
    return {"inputs": inputs, "targets": x, "loss_mask": np.ones_like(x),
            "positions": np.broadcast_to(np.arange(L, dtype=np.int32), x.shape).copy(),
            "segment_ids": np.ones_like(x)}


def mdm_batch(x):
    return {"inputs": x, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), x.shape).copy(),
            "segment_ids": np.ones_like(x)}


def make_step(objective):
    @nnx.jit
    def step(model, opt, batch, rng):
        def loss_fn(m):
            loss_sum, metrics = objective(m, batch, rng, None)
            return loss_sum / metrics["denom"]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss
    return step


def make_opt(model):
    sched = optax.join_schedules([optax.linear_schedule(0.0, LR, WARMUP), optax.constant_schedule(LR)], [WARMUP])
    return nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0)),
                         wrt=nnx.Param)


@nnx.jit
def arm_eval_nll(model, batch):
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0].sum(1)


def main():
    t_start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    P, pi = make_chain(rng)
    h_rate = float(sum(pi[i] * entropy(P[i]) for i in range(V)))
    h_seq = entropy(pi) + (L - 1) * h_rate
    held = sample_chain(np.random.default_rng(SEED + 1), P, pi, N_HELD)
    held_true = true_nll(held, P, pi)
    print(f"entropy: H(pi)={entropy(pi):.4f}, rate={h_rate:.4f}, per token={h_seq / L:.4f} nats; "
          f"held-out true NLL/token {held_true.mean() / L:.4f}", flush=True)

    mdm = Transformer(model_cfg(False), nnx.Rngs(SEED))
    arm = Transformer(model_cfg(True), nnx.Rngs(SEED))
    mdm_opt, arm_opt = make_opt(mdm), make_opt(arm)
    mdm_step = make_step(get_objective("mdm"))  # train_cfg None: eps 1e-3, ssl_ratio 0.01 (the paper's defaults)
    arm_step = make_step(get_objective("causal_lm"))
    data_rng = np.random.default_rng(SEED + 2)
    key = jax.random.PRNGKey(SEED)
    mc_keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1234), i))(jnp.arange(N_HELD)))
    held_list = held.tolist()
    empty = [[] for _ in range(N_HELD)]
    arm_held = {k: jnp.asarray(v) for k, v in arm_batch(held).items()}

    rows, train_s, eval_s = [], 0.0, 0.0
    mdm_losses, arm_losses = [], []
    for step in range(1, STEPS + 1):
        t0 = time.perf_counter()
        x = sample_chain(data_rng, P, pi, BATCH)
        key, k = jax.random.split(key)
        mdm_losses.append(float(mdm_step(mdm, mdm_opt, {k_: jnp.asarray(v) for k_, v in mdm_batch(x).items()}, k)))
        arm_losses.append(float(arm_step(arm, arm_opt, {k_: jnp.asarray(v) for k_, v in arm_batch(x).items()}, k)))
        train_s += time.perf_counter() - t0
        if step in CHECKPOINTS:
            t0 = time.perf_counter()
            scorer = DiffusionScorer(mdm)
            elbo, se_mc = scorer.elbo(empty, held_list, mc_keys, n_samples=N_MC, chunk=16)
            chain = scorer.chain_rule(empty, held_list, chunk=8)
            arm_nll = np.asarray(arm_eval_nll(arm, arm_held))
            diff = elbo - held_true  # paired with the exact NLL of the same sequences
            row = {
                "step": step,
                "mdm_elbo": float(elbo.mean() / L),
                # MC error only (model's exact ELBO on these sequences): sqrt(sum se_i^2) / n
                "mdm_elbo_se_mc": float(np.sqrt((se_mc ** 2).sum()) / N_HELD / L),
                # total: over held-out sequences of (ELBO_i - true NLL_i); includes the MC error of each row
                "mdm_elbo_minus_true_nll": float(diff.mean() / L),
                "mdm_elbo_minus_true_nll_se": float(diff.std(ddof=1) / np.sqrt(N_HELD) / L),
                "mdm_chain_rule": float(chain.mean() / L),
                "mdm_chain_rule_minus_true_nll_se": float((chain - held_true).std(ddof=1) / np.sqrt(N_HELD) / L),
                "chain_minus_elbo": float((chain - elbo).mean() / L),
                "chain_minus_elbo_se": float((chain - elbo).std(ddof=1) / np.sqrt(N_HELD) / L),
                "frac_rows_chain_le_elbo": float(np.mean(chain <= elbo)),
                "arm_nll": float(arm_nll.mean() / L),
                "arm_minus_true_nll_se": float((arm_nll - held_true).std(ddof=1) / np.sqrt(N_HELD) / L),
                "mdm_train_loss_last100": float(np.mean(mdm_losses[-100:])),
                "arm_train_loss_last100": float(np.mean(arm_losses[-100:])),
            }
            rows.append(row)
            eval_s += time.perf_counter() - t0
            print(f"step {step:5d}  elbo {row['mdm_elbo']:.4f} ± {row['mdm_elbo_se_mc']:.4f} (mc)  "
                  f"chain {row['mdm_chain_rule']:.4f}  arm {row['arm_nll']:.4f}  true {held_true.mean() / L:.4f}  "
                  f"[train {train_s:.0f}s, eval {eval_s:.0f}s]", flush=True)

    runtime = time.perf_counter() - t_start
    n_params = model_cfg(False).param_count()
    results = {
        "setup": {"vocab": V, "seq_len": L, "dirichlet_alpha": ALPHA, "seed": SEED, "batch": BATCH,
                  "steps": STEPS, "lr": LR, "warmup": WARMUP, "optimizer": "adamw (wd 0), clip 1.0",
                  "n_heldout": N_HELD, "n_mc": N_MC, "mc_chunk": 16, "mdm_eps": 1e-3, "ssl_ratio": 0.01,
                  "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 192, "params": n_params},
                  "training": "hand-written optax loop over get_objective('mdm') / get_objective('causal_lm'); "
                              "fresh Markov samples every step (same batches for both models)"},
        "true_entropy_per_token": h_seq / L,
        "entropy_rate": h_rate,
        "entropy_first_token": entropy(pi),
        "uniform_per_token": float(np.log(V)),
        "heldout_true_nll_per_token": float(held_true.mean() / L),
        "heldout_true_nll_se": float(held_true.std(ddof=1) / np.sqrt(N_HELD) / L),
        "checkpoints": rows,
        "runtime_s": runtime, "train_s": train_s, "eval_s": eval_s,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), jax {jax.__version__} "
                   f"{jax.default_backend()}",
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results)
    print(f"done in {runtime:.0f}s", flush=True)


def plot(res):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    rows = res["checkpoints"]
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(12, 4.5))
    ax, ax2 = fig.subplots(1, 2)
    ax.errorbar(steps, [r["mdm_elbo"] for r in rows], yerr=[2 * r["mdm_elbo_minus_true_nll_se"] for r in rows],
                marker="o", capsize=3, label="MDM MC-ELBO (±2 se, paired)")
    ax.plot(steps, [r["mdm_chain_rule"] for r in rows], marker="s", label="MDM chain-rule NLL (left-to-right)")
    ax.plot(steps, [r["arm_nll"] for r in rows], marker="^", label="ARM NLL")
    ax.axhline(res["true_entropy_per_token"], color="k", ls="--", label="true entropy (expected)")
    ax.axhline(res["heldout_true_nll_per_token"], color="gray", ls=":", label="true NLL of the held-out set")
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("nats / token (held-out)")
    ax.set_title(f"Markov chain V={res['setup']['vocab']}, L={res['setup']['seq_len']}: "
                 f"MDM ELBO vs entropy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    # Excess over the exact NLL of the same held-out sequences (an estimate of KL per token), log scale.
    true = res["heldout_true_nll_per_token"]
    ax2.errorbar(steps, [r["mdm_elbo"] - true for r in rows],
                 yerr=[2 * r["mdm_elbo_minus_true_nll_se"] for r in rows], marker="o", capsize=3,
                 label="MDM ELBO − true NLL")
    ax2.errorbar(steps, [r["mdm_chain_rule"] - true for r in rows],
                 yerr=[2 * r["mdm_chain_rule_minus_true_nll_se"] for r in rows], marker="s", capsize=3,
                 label="MDM chain rule − true NLL")
    ax2.errorbar(steps, [r["arm_nll"] - true for r in rows], yerr=[2 * r["arm_minus_true_nll_se"] for r in rows],
                 marker="^", capsize=3, label="ARM − true NLL")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("excess over exact NLL (nats/token, ±2 se)")
    ax2.set_title("gap to the true distribution")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(OUT / "elbo_bound.png", dpi=120)


if __name__ == "__main__":
    main()
