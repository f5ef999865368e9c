"""Reversal curse in miniature: MDM vs ARM (SMDM, Nie et al., ICLR 2025; Berglund et al. 2023).

Facts "<bos> A_k is B_k <eos>" for N made-up name pairs are trained in the forward direction only; the query is the
reversed sentence "<bos> B_k is" -> A_k (never seen). Two models of identical shape (mathlm Transformer):
  * ARM: causal, next-token loss (objective `causal_lm`);
  * MDM: bidirectional with a [MASK] row, objective `mdm` (every token of the sentence, A included, is maskable);
same data, steps, batch and optimizer (a hand-written optax loop over mathlm.train.objectives.get_objective).

Conditions (a 2 x 2 design; results.json["conditions"][name]):
  name tokens   x   what else is trained
  * original          3 syllable tokens per name, nothing else
  * symmetric         3 syllable tokens per name, + N_aux OTHER pairs in BOTH orders ("C is D" and "D is C")
  * atomic            1 token per name (an entity token), nothing else
  * atomic_symmetric  1 token per name, + N_aux other pairs in both orders            <- headline
(N_aux: 200 with 3-token names, 800 with 1-token names.)
The auxiliary pairs are the toy's stand-in for what a pretrained model brings to the paper's fine-tuning experiment:
evidence that "X is Y" licenses "Y is X". Without any such evidence neither model has a reason to answer "B is ?"
with the name that stood before "is" (measured: both 0%). The reverse query is asked on the test pairs only.

Tests (all greedy, all N test pairs):
  * forward "<bos> A_k is" -> B_k (seen) and reverse "<bos> B_k is" -> A_k (never seen). ARM: KV-cache greedy decoding
    (models.generate.Generator); MDM: the answer span + EOS as masks after the prompt, greedy low-confidence
    diffusion sampling (models.diffusion.DiffusionGenerator, one slot per step). Exact match of the name + EOS;
  * reverse by ranking the N A-names by the log-likelihood of "A_j <eos>" after "<bos> B_k is" (ARM exact; MDM
    chain_rule_nll on the same canvas as generation: the name's slots and the EOS slot);
  * the training template with A masked, "<bos> [M].. is B_k <eos>": MDM greedy infill; the ARM cannot infill, so its
    counterpart ranks all N A-names by log p("<bos> A_j is B_k <eos>");
  * with aux pairs: the aux pairs' both directions (seen) as a memorisation check.
Chance: 1/N for ranking; lower for free generation.

Usage: /work/venv/bin/python experiments/reversal_curse/run.py [--condition atomic_symmetric|original|symmetric|
           atomic|all|a,b,...] [--pairs 200] [--aux N] [--batch 128] [--lr 2e-3] [--seeds 0,1,2] [--steps S]
  Default: the headline condition, one seed (about 6 min on a 2-core CPU); `all` runs the four (about 30 min). Each
  run replaces the conditions it ran in results.json and keeps the others; then redraws reversal.png.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import random
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
PAD, BOS, EOS, IS = 0, 1, 2, 3
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables
CONDITIONS = {  # name: (tokens per name, auxiliary pairs, default steps)
    "original": (3, 0, 2000),
    "symmetric": (3, 200, 8000),  # 3x the sentences of `original`; 4000 steps left the MDM under-trained
    "atomic": (1, 0, 3000),
    # 200 aux pairs gave the MDM 6% / 22% / 75% on three data draws (a rule learnt on some draws, not others);
    # 800 make the evidence for "is" being symmetric outweigh memorising each aux pair (see the README)
    "atomic_symmetric": (1, 800, 6000),
}
HEADLINE = "atomic_symmetric"
SHAPE = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=352, max_seq_len=32)


def alphabet(name_tokens: int, n_names: int, seed: int) -> list[str]:
    """Text of each name token: syllables (3-token names) or one made-up 3-syllable word per entity token."""
    if name_tokens == 3:
        return SYLLABLES
    rng = random.Random(seed + 7)
    words: set[str] = set()
    while len(words) < n_names:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    return sorted(words)


def draw_pairs(n: int, k: int, n_alpha: int, seed: int, exclude: set = frozenset()):
    """n pairs of distinct names, each name k tokens (ids 4..4+n_alpha-1), none in `exclude`."""
    rng = random.Random(seed)
    names = set()
    while len(names) < 2 * n:
        nm = tuple(rng.randrange(n_alpha) + 4 for _ in range(k))
        if nm not in exclude:
            names.add(nm)
    names = sorted(names)
    rng.shuffle(names)
    return [(list(names[2 * i]), list(names[2 * i + 1])) for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--condition", default=HEADLINE,
                    help=f"one of {', '.join(CONDITIONS)}, a comma-separated list, or all")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--aux", type=int, default=None, help="override the auxiliary pairs (both orders) of the "
                                                         "*symmetric conditions (defaults: symmetric 200, "
                                                         "atomic_symmetric 800)")
    ap.add_argument("--steps", type=int, default=None, help="override the condition's default training steps")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (data draw, init, masking); the first "
                                                  "seed's full figures are kept, the others as a per-seed table")
    args = ap.parse_args()

    import jax

    path = HERE / "results.json"
    names = list(CONDITIONS) if args.condition == "all" else args.condition.split(",")
    if unknown := [c for c in names if c not in CONDITIONS]:
        ap.error(f"unknown condition(s) {unknown}; choose from {list(CONDITIONS)} or all")
    seeds = [int(x) for x in args.seeds.split(",")]
    keys = ("arm_accuracy", "mdm_accuracy", "arm_ranking_accuracy", "mdm_ranking_accuracy")
    done = {}
    for name in names:
        runs = []
        for seed in seeds:
            args.seed = seed
            runs.append(run_condition(name, args))
        out = runs[0]
        out["per_seed"] = [{"seed": sd, **{k: r[k] for k in keys}} for sd, r in zip(seeds, runs)]
        out.update({f"{k}_mean": float(np.mean([r[k] for r in runs])) for k in keys})
        out["machine"] = {"platform": platform.platform(), "jax": jax.__version__, "devices": str(jax.devices())}
        done[name] = out
    # Read the file only now, so runs of different conditions in parallel do not overwrite each other's results.
    res = json.loads(path.read_text()) if path.exists() else {}
    if "conditions" not in res:  # an older layout: start afresh
        res = {"conditions": {}}
    res["conditions"].update(done)
    if HEADLINE in res["conditions"]:
        head = res["conditions"][HEADLINE]
        res.update(headline_condition=HEADLINE, mdm_accuracy=head["mdm_accuracy_mean"],
                   arm_accuracy=head["arm_accuracy_mean"], chance_level=head["chance_level"],
                   per_seed=head["per_seed"],
                   note="mdm_accuracy / arm_accuracy: greedy '<bos> B_k is' -> A_k on the test pairs (never seen "
                        "reversed) in the headline condition, mean over the seeds in per_seed; every condition's "
                        "figures are under 'conditions'")
    path.write_text(json.dumps(res, indent=2) + "\n")
    plot(res)
    print(json.dumps({n: {k: c[k] for k in ("arm_accuracy", "mdm_accuracy", "chance_level")}
                      for n, c in res["conditions"].items()}, indent=1))


def run_condition(name: str, args) -> dict:
    t_start = time.perf_counter()
    k, n_aux, steps = CONDITIONS[name]
    steps = args.steps or steps
    n_aux = args.aux if (n_aux and args.aux is not None) else n_aux
    n_alpha = len(SYLLABLES) if k == 3 else 2 * (args.pairs + n_aux)
    texts = alphabet(k, n_alpha, args.seed)
    pairs = draw_pairs(args.pairs, k, n_alpha, args.seed)
    aux = draw_pairs(n_aux, k, n_alpha, args.seed + 1000, exclude={tuple(x) for p in pairs for x in p})
    rows = [[BOS, *a, IS, *b, EOS] for a, b in pairs]
    rows += [[BOS, *c, IS, *d, EOS] for c, d in aux] + [[BOS, *d, IS, *c, EOS] for c, d in aux]
    rows = np.array(rows, np.int32)
    vocab = 4 + n_alpha

    def text_of(nm):
        return "".join(texts[t - 4] for t in nm).capitalize()

    a0, b0 = pairs[0]
    out = {"name_tokens": k, "n_pairs": args.pairs, "n_aux": n_aux, "steps": steps, "batch_size": args.batch,
           "lr": args.lr, "seed": args.seed, "vocab_size": vocab, "n_train_sentences": len(rows),
           "model_shape": {"vocab_size": vocab, **SHAPE}, "example_fact": f"{text_of(a0)} is {text_of(b0)}",
           "chance_level": 1.0 / args.pairs,
           "chance_level_note": "1/N = a random pick among the N test A-names (ranking); free generation's chance "
                                f"is lower still (1/{n_alpha}^{k} per name)"}
    if aux:
        c0, d0 = aux[0]
        out["example_aux_facts"] = [f"{text_of(c0)} is {text_of(d0)}", f"{text_of(d0)} is {text_of(c0)}"]
    for kind in ("arm", "mdm"):
        model, info = train(kind, rows, vocab, steps, args)
        info.update(evaluate(kind, model, pairs, aux, k, vocab, text_of))
        print(name, kind, {kk: vv for kk, vv in info.items() if kk not in ("loss_curve", "reverse_examples")},
              flush=True)
        out[kind] = info
    for kind in ("arm", "mdm"):
        out[f"{kind}_accuracy"] = out[kind]["reverse_accuracy"]
        out[f"{kind}_forward_accuracy"] = out[kind]["forward_accuracy"]
        out[f"{kind}_ranking_accuracy"] = out[kind]["reverse_ranking_accuracy"]
    out["runtime_seconds"] = time.perf_counter() - t_start
    return out


def train(kind: str, rows: np.ndarray, vocab: int, steps: int, args):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mathlm.models.transformer import ModelConfig, Transformer
    from mathlm.train.objectives import get_objective

    T = rows.shape[1]
    cfg = ModelConfig(vocab_size=vocab, **SHAPE, causal=(kind == "arm"), mask_token=True)
    model = Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(args.seed)))
    graphdef, params = nnx.split(model, nnx.Param)
    objective = get_objective("causal_lm" if kind == "arm" else "mdm")  # mdm: eps 1e-3, ssl_ratio 0.01
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, steps, args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))
    opt = tx.init(params)

    def batch_for(x):
        b = x.shape[0]
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), (b, T))
        seg = np.ones((b, T), np.int32)
        if kind == "arm":  # next-token prediction on the whole sentence
            return {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones_like(x[:, 1:]),
                    "positions": pos[:, :-1], "segment_ids": seg[:, :-1]}
        return {"inputs": x, "positions": pos, "segment_ids": seg}

    @jax.jit
    def step(params, opt, batch, rng):
        def loss_fn(p):
            ls, m = objective(nnx.merge(graphdef, p), batch, rng, None)
            return ls / jnp.maximum(m["denom"], 1.0)
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    nprng = np.random.default_rng(args.seed + 1)
    key = jax.random.key(args.seed + 2)
    losses = []
    t0 = time.perf_counter()
    for s in range(steps):  # rows sampled with replacement
        params, opt, loss = step(params, opt, batch_for(rows[nprng.integers(0, len(rows), args.batch)]),
                                 jax.random.fold_in(key, s))
        if s % 100 == 0 or s == steps - 1:
            losses.append((s, float(loss)))
    secs = time.perf_counter() - t0
    print(f"{kind}: {steps} steps in {secs:.1f}s, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}", flush=True)
    nnx.update(model, params)
    return model, {"train_seconds": secs, "loss_curve": losses, "final_loss": losses[-1][1],
                   "params": cfg.param_count()}


def evaluate(kind, model, pairs, aux, k, vocab, text_of) -> dict:
    import jax
    import jax.numpy as jnp

    from mathlm.models.diffusion import DiffusionGenerator, DiffusionSampling, chain_rule_nll, pack
    from mathlm.models.generate import Generator, Sampling

    t0 = time.perf_counter()
    A, B = [a for a, _ in pairs], [b for _, b in pairs]
    n = len(pairs)
    if kind == "arm":
        g = Generator(model, eos_id=EOS, pad_id=PAD)
        gen = lambda prompts: g(prompts, Sampling(k + 1, 0.0)).tokens
    else:
        dg = DiffusionGenerator(model, eos_id=EOS, pad_id=PAD)
        gen = lambda prompts: dg(prompts, DiffusionSampling(max_new_tokens=k + 1, steps=k + 1, temperature=0.0)).tokens

    def exact(outs, refs):  # the name, then EOS (outputs are cut at EOS)
        return float(np.mean([list(o) == list(r) for o, r in zip(outs, refs)]))

    fwd = gen([[BOS, *a, IS] for a in A])
    rev = gen([[BOS, *b, IS] for b in B])
    a_names = {tuple(a) for a in A}
    info = {"forward_accuracy": exact(fwd, B), "reverse_accuracy": exact(rev, A),
            "reverse_output_is_some_A_name": float(np.mean([tuple(o) in a_names for o in rev])),
            "reverse_examples": [{"query": f"{text_of(b)} is ?", "answer": text_of(a), "output": text_of(o)}
                                 for a, b, o in list(zip(A, B, rev))[:5]]}
    if aux:
        info["aux_forward_accuracy"] = exact(gen([[BOS, *c, IS] for c, _ in aux]), [d for _, d in aux])
        info["aux_reverse_accuracy"] = exact(gen([[BOS, *d, IS] for _, d in aux]), [c for c, _ in aux])

    cand = jnp.array(A, jnp.int32)  # (n, k)
    col = lambda tok: jnp.full((n, 1), tok, jnp.int32)
    if kind == "arm":
        def logp_of(seq):  # per-token log p of seq[:, 1:]
            logp = jax.nn.log_softmax(model(seq[:, :-1]), -1)
            return jnp.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0]

        @jax.jit
        def reverse_scores(b):  # log p(A_j <eos> | <bos> b is): the name and the end, as generation must produce
            seq = jnp.concatenate([col(BOS), jnp.broadcast_to(b, (n, k)), col(IS), cand, col(EOS)], 1)
            return logp_of(seq)[:, -(k + 1):].sum(1)

        @jax.jit
        def template_scores(b):  # log p(<bos> A_j is b <eos>): the forward fact, A_j a candidate
            seq = jnp.concatenate([col(BOS), cand, col(IS), jnp.broadcast_to(b, (n, k)), col(EOS)], 1)
            return logp_of(seq).sum(1)

        info["reverse_ranking_accuracy"] = float(np.mean(
            [int(np.argmax(np.asarray(reverse_scores(jnp.array(b))))) == i for i, b in enumerate(B)]))
        info["template_ranking_accuracy"] = float(np.mean(
            [int(np.argmax(np.asarray(template_scores(jnp.array(b))))) == i for i, b in enumerate(B)]))
    else:
        nll = jax.jit(lambda batch: chain_rule_nll(model, batch, max_target_len=k + 1))

        def reverse_scores(b):  # chain-rule log-likelihood of "A_j <eos>" after "<bos> b is" (the generation canvas)
            batch = pack([[BOS, *b, IS]] * n, [[*c, EOS] for c in A], pad_id=PAD)
            return -np.asarray(nll({kk: jnp.asarray(v) for kk, v in batch.items()}))

        info["reverse_ranking_accuracy"] = float(np.mean(
            [int(np.argmax(reverse_scores(b))) == i for i, b in enumerate(B)]))
        # Infill in the training template <bos> [M]*k is B <eos>: greedy, one slot per step, most confident first.
        mask_id = vocab
        x = np.array([[BOS, *[mask_id] * k, IS, *b, EOS] for b in B], np.int32)
        fm = jax.jit(lambda t: model(t))
        for _ in range(k):
            logp = np.asarray(jax.nn.log_softmax(fm(jnp.asarray(x)), -1))
            pred, conf = logp.argmax(-1), np.where(x == mask_id, logp.max(-1), -np.inf)
            j = conf.argmax(1)
            x[np.arange(n), j] = pred[np.arange(n), j]
        info["infill_reverse_accuracy"] = float(np.mean([list(r[1:1 + k]) == list(a) for r, a in zip(x, A)]))
    info["eval_seconds"] = time.perf_counter() - t0
    return info


def plot(res):
    from matplotlib.figure import Figure

    conds = [c for c in CONDITIONS if c in res["conditions"]]
    cols = 2 if len(conds) > 1 else 1
    rows = (len(conds) + 1) // 2
    fig = Figure(figsize=(8 * cols, 4.4 * rows))
    for p, name in enumerate(conds):
        r = res["conditions"][name]
        ax = fig.add_subplot(rows, cols, p + 1)
        groups = [("forward\nA is ? (seen)", "forward_accuracy", "forward_accuracy"),
                  ("REVERSE\nB is ? (greedy)", "reverse_accuracy", "reverse_accuracy"),
                  ("reverse\nranking of N names", "reverse_ranking_accuracy", "reverse_ranking_accuracy"),
                  ("template '? is B'\nARM: ranking\nMDM: greedy infill", "template_ranking_accuracy",
                   "infill_reverse_accuracy")]
        if r["n_aux"]:
            groups.append(("aux pairs\nD is ? (seen\nboth orders)", "aux_reverse_accuracy", "aux_reverse_accuracy"))
        w = 0.38
        for i, (kind, color) in enumerate((("arm", "C0"), ("mdm", "C1"))):
            v = [100 * r[kind][g[1 + i]] for g in groups]
            xs = np.arange(len(groups)) + (i - 0.5) * w
            ax.bar(xs, v, w, color=color, label=f"{kind.upper()} ({'causal' if kind == 'arm' else 'bidirectional'})")
            for xx, vv in zip(xs, v):
                ax.text(xx, vv + 1, f"{vv:.1f}", ha="center", fontsize=7)
        ax.axhline(100 * r["chance_level"], color="gray", ls="--", lw=1, label="chance (1/N)")
        ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups], fontsize=7)
        ax.set_ylabel("accuracy (%), test pairs")
        ax.set_ylim(0, 125)
        aux = f" + {r['n_aux']} aux pairs in both orders" if r["n_aux"] else ", nothing else"
        star = "  [headline]" if name == HEADLINE else ""
        ax.set_title(f"{name}{star}: {r['n_pairs']} pairs forward only{aux}\n{r['name_tokens']} token(s) per name, "
                     f"{r['steps']} steps, {r['arm']['params'] / 1e3:.0f}k params each", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(HERE / "reversal.png", dpi=110)


if __name__ == "__main__":
    main()
