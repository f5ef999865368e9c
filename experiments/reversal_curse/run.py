"""Reversal curse: MDM vs ARM (SMDM, Nie et al., ICLR 2025, the reversal-curse comparison).

Data: N made-up name pairs (each name = 3 random syllables, one token per syllable) and one training sentence per
pair, "<bos> A_k is B_k <eos>" (forward direction only). Two models of identical shape (mathlm Transformer):
  * ARM: causal, next-token loss (objective `causal_lm`);
  * MDM: bidirectional with a [MASK] row, objective `mdm` (every token of the sentence, A included, is maskable);
same data, same steps, batch and optimizer (hand-written optax loop over mathlm.train.objectives.get_objective).
Test (greedy):
  * forward  "<bos> A_k is" -> B_k   (seen in training; memorisation);
  * reverse  "<bos> B_k is" -> A_k   (never seen): ARM by KV-cache greedy decoding (models.generate.Generator),
    MDM by filling the masked answer span with greedy low-confidence diffusion sampling (models.diffusion.
    DiffusionGenerator, steps = span length);
  * MDM infill "<bos> [M][M][M] is B_k <eos>" -> A_k (the training template with the first name masked; reported
    separately: it is not the "B is ?" query);
  * candidate ranking: for each reverse query, the A name with the highest model log-likelihood among all N
    A-names (ARM: exact log p(A | B is); MDM: chain-rule log-likelihood, models.diffusion.chain_rule_nll).
  * ARM template ranking (the ARM's counterpart of the MDM infill): the A_j maximising log p(<bos> A_j is B_k <eos>)
    over all N A-names; it scores the forward fact, so an ARM gets there only by enumerating candidates.
Chance: 1/N for the ranking (and below that for free generation: 70^3 syllable strings).

Second condition, "symmetric training" (Berglund et al.'s control; results.json key "symmetric"): the same N test
pairs, forward only, plus N_aux OTHER pairs trained in BOTH orders ("C is D" and "D is C"), so a model can see that
"is" is symmetric; same shapes/optimizer/batch for both models, --sym-steps steps (more data). The reverse query is
asked on the test pairs only (never seen reversed); the aux pairs' reverse direction is reported as a seen-data check.
Writes results.json and reversal.png next to this file (one panel per condition).

Usage: /work/venv/bin/python experiments/reversal_curse/run.py [--pairs 200] [--steps 2000] [--batch 128] [--lr 2e-3]
           [--condition both|original|symmetric] [--aux 200] [--sym-steps 8000]
  --condition symmetric runs only the second condition and keeps the original condition's numbers already in
  results.json (the run is deterministic on CPU).
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
NAME_LEN = 3


def make_pairs(n: int, seed: int):
    rng = random.Random(seed)
    names = set()
    while len(names) < 2 * n:
        names.add(tuple(rng.randrange(len(SYLLABLES)) + 4 for _ in range(NAME_LEN)))
    names = sorted(names)
    rng.shuffle(names)
    return [(list(names[2 * k]), list(names[2 * k + 1])) for k in range(n)]


def text_of(name):
    return "".join(SYLLABLES[t - 4] for t in name).capitalize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--condition", choices=("both", "original", "symmetric"), default="both",
                    help="original: test pairs only; symmetric: + auxiliary pairs in both orders; 'symmetric' alone "
                         "re-uses the original condition's numbers from results.json")
    ap.add_argument("--aux", type=int, default=200, help="symmetric condition: number of auxiliary pairs")
    ap.add_argument("--sym-steps", type=int, default=8000, help="symmetric condition: training steps")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from mathlm.models.diffusion import DiffusionGenerator, DiffusionSampling, chain_rule_nll, pack
    from mathlm.models.generate import Generator, Sampling
    from mathlm.models.transformer import ModelConfig, Transformer
    from mathlm.train.objectives import get_objective

    t_start = time.perf_counter()
    pairs = make_pairs(args.pairs, args.seed)
    rows = np.array([[BOS, *a, IS, *b, EOS] for a, b in pairs], np.int32)  # (N, 9)
    T = rows.shape[1]
    vocab = 4 + len(SYLLABLES)
    shape = dict(vocab_size=vocab, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=352, max_seq_len=32)
    res = {"n_pairs": args.pairs, "steps": args.steps, "batch_size": args.batch, "lr": args.lr, "seed": args.seed,
           "vocab_size": vocab, "name_tokens": NAME_LEN, "model_shape": shape,
           "example_fact": f"{text_of(pairs[0][0])} is {text_of(pairs[0][1])}",
           "chance_level": 1.0 / args.pairs,
           "chance_level_note": "1/N = random pick among the N A-names (ranking); free generation's chance is "
                                f"lower still (1/{len(SYLLABLES)}^{NAME_LEN} per name)"}

    def batch_for(kind, x):
        b = x.shape[0]
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), (b, T))
        seg = np.ones((b, T), np.int32)
        if kind == "arm":  # next-token prediction on the whole sentence
            inp, tgt = x[:, :-1], x[:, 1:]
            return {"inputs": inp, "targets": tgt, "loss_mask": np.ones_like(tgt), "positions": pos[:, :-1],
                    "segment_ids": seg[:, :-1]}
        return {"inputs": x, "positions": pos, "segment_ids": seg}

    def train_model(kind, data=rows, steps=args.steps):
        cfg = ModelConfig(**shape, causal=(kind == "arm"), mask_token=True)
        model = Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(args.seed)))
        graphdef, params = nnx.split(model, nnx.Param)
        objective = get_objective("causal_lm" if kind == "arm" else "mdm")  # mdm: eps 1e-3, ssl_ratio 0.01
        sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, steps, args.lr * 0.1)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))
        opt = tx.init(params)

        @jax.jit
        def step(params, opt, batch, rng):
            def loss_fn(p):
                ls, m = objective(nnx.merge(graphdef, p), batch, rng, None)
                return ls / jnp.maximum(m["denom"], 1.0), m
            (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), opt, loss

        nprng = np.random.default_rng(args.seed + 1)
        key = jax.random.key(args.seed + 2)
        losses = []
        t0 = time.perf_counter()
        for s in range(steps):
            idx = nprng.integers(0, len(data), args.batch)
            params, opt, loss = step(params, opt, batch_for(kind, data[idx]), jax.random.fold_in(key, s))
            if s % 100 == 0 or s == steps - 1:
                losses.append((s, float(loss)))
        secs = time.perf_counter() - t0
        print(f"{kind}: trained {steps} steps in {secs:.1f}s, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}",
              flush=True)
        nnx.update(model, params)
        return model, {"train_seconds": secs, "loss_curve": losses, "final_loss": losses[-1][1],
                       "params": cfg.param_count()}

    A = [a for a, _ in pairs]
    B = [b for _, b in pairs]
    fwd_prompts = [[BOS, *a, IS] for a in A]
    rev_prompts = [[BOS, *b, IS] for b in B]

    def exact(outs, refs):
        return float(np.mean([list(o[:NAME_LEN]) == list(r) and len(o) == NAME_LEN for o, r in zip(outs, refs)]))

    def in_A(outs):  # the generated reverse answer is some training A-name (maybe the wrong one)
        aset = {tuple(a) for a in A}
        return float(np.mean([tuple(o) in aset for o in outs]))


    if args.condition == "symmetric":  # re-use the original condition's numbers (the run is deterministic on CPU)
        res = json.loads((HERE / "results.json").read_text())
        res.pop("symmetric", None)
    else:
        # --- ARM -----------------------------------------------------------------------------------------------------
        arm, info_arm = train_model("arm")
        gen = Generator(arm, eos_id=EOS, pad_id=PAD)
        samp = Sampling(NAME_LEN + 1, 0.0)
        fwd = gen(fwd_prompts, samp).tokens
        rev = gen(rev_prompts, samp).tokens
        info_arm.update(forward_accuracy=exact(fwd, B), reverse_accuracy=exact(rev, A),
                        reverse_output_is_some_A_name=in_A(rev),
                        reverse_examples=[{"query": f"{text_of(b)} is ?", "answer": text_of(a),
                                           "output": text_of(o)} for a, b, o in list(zip(A, B, rev))[:5]])

        # --- MDM -----------------------------------------------------------------------------------------------------
        mdm, info_mdm = train_model("mdm")
        dgen = DiffusionGenerator(mdm, eos_id=EOS, pad_id=PAD)
        ds = DiffusionSampling(max_new_tokens=NAME_LEN + 1, steps=NAME_LEN + 1, temperature=0.0)
        fwd_m = dgen(fwd_prompts, ds).tokens
        rev_m = dgen(rev_prompts, ds).tokens
        # Infill in the training template: <bos> [M]*3 is B <eos>, greedy low-confidence, one slot per step.
        mid = vocab
        x = np.array([[BOS, mid, mid, mid, IS, *b, EOS] for b in B], np.int32)
        fwd_model = jax.jit(lambda t: mdm(t))
        for _ in range(NAME_LEN):
            logp = np.asarray(jax.nn.log_softmax(fwd_model(jnp.asarray(x)), -1))
            pred, conf = logp.argmax(-1), logp.max(-1)
            conf = np.where(x == mid, conf, -np.inf)
            j = conf.argmax(1)
            x[np.arange(len(x)), j] = pred[np.arange(len(x)), j]
        infill = [list(r[1:1 + NAME_LEN]) for r in x]
        info_mdm.update(forward_accuracy=exact(fwd_m, B), reverse_accuracy=exact(rev_m, A),
                        reverse_output_is_some_A_name=in_A(rev_m),
                        infill_reverse_accuracy=float(np.mean([i == list(a) for i, a in zip(infill, A)])),
                        reverse_examples=[{"query": f"{text_of(b)} is ?", "answer": text_of(a),
                                           "output": text_of(o)} for a, b, o in list(zip(A, B, rev_m))[:5]])

        # --- candidate ranking over all N A-names (reverse direction) ------------------------------------------------
        t0 = time.perf_counter()
        n = args.pairs
        cand = np.array(A, np.int32)  # (n, 3)

        @jax.jit
        def arm_scores(b_name):  # (3,) -> (n,) log p(A_j | <bos> b is), the name tokens only
            seq = jnp.concatenate([jnp.broadcast_to(jnp.array([BOS], jnp.int32), (n, 1)),
                                   jnp.broadcast_to(b_name, (n, NAME_LEN)), jnp.full((n, 1), IS, jnp.int32), cand], 1)
            logp = jax.nn.log_softmax(arm(seq[:, :-1]), -1)
            tgt = seq[:, 1:]
            lp = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
            return lp[:, -NAME_LEN:].sum(1)

        arm_rank = np.mean([int(np.argmax(np.asarray(arm_scores(jnp.array(b))))) == k for k, b in enumerate(B)])

        @jax.jit
        def arm_template_scores(b_name):  # (n,) log p(<bos> A_j is b <eos>): the training template, A_j as a candidate
            seq = jnp.concatenate([jnp.full((n, 1), BOS, jnp.int32), cand, jnp.full((n, 1), IS, jnp.int32),
                                   jnp.broadcast_to(b_name, (n, NAME_LEN)), jnp.full((n, 1), EOS, jnp.int32)], 1)
            logp = jax.nn.log_softmax(arm(seq[:, :-1]), -1)
            return jnp.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0].sum(1)

        arm_tpl = np.mean([int(np.argmax(np.asarray(arm_template_scores(jnp.array(b))))) == k
                           for k, b in enumerate(B)])
        info_arm["template_ranking_accuracy"] = float(arm_tpl)

        mdm_nll = jax.jit(lambda batch: chain_rule_nll(mdm, batch, max_target_len=NAME_LEN))

        def mdm_scores(b_name):
            batch = pack([[BOS, *b_name, IS]] * n, [list(c) for c in cand], pad_id=PAD)
            return -np.asarray(mdm_nll({k: jnp.asarray(v) for k, v in batch.items()}))

        mdm_rank = np.mean([int(np.argmax(mdm_scores(b))) == k for k, b in enumerate(B)])
        info_arm["reverse_ranking_accuracy"] = float(arm_rank)
        info_mdm["reverse_ranking_accuracy"] = float(mdm_rank)
        res["ranking_seconds"] = time.perf_counter() - t0

        res["arm"], res["mdm"] = info_arm, info_mdm
        res["mdm_accuracy"] = info_mdm["reverse_accuracy"]
        res["arm_accuracy"] = info_arm["reverse_accuracy"]
        res["mdm_forward_accuracy"] = info_mdm["forward_accuracy"]
        res["arm_forward_accuracy"] = info_arm["forward_accuracy"]
        res["runtime_seconds"] = time.perf_counter() - t_start
        res["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "jax": jax.__version__,
                          "devices": str(jax.devices())}
        res["runtime_seconds_note"] = "original condition only"

    # --- symmetric-training condition (Berglund et al.'s control) ------------------------------------------------
    # The same 200 test pairs, forward only (as above), plus N_aux OTHER pairs presented in BOTH orders
    # ("C is D" and "D is C"), so the models can see that "is" is symmetric. The reverse query is asked on the
    # test pairs only (never seen reversed). Same shape/optimizer/batch for ARM and MDM; more steps (more data).
    if args.condition in ("both", "symmetric"):
        t_sym = time.perf_counter()
        aux = make_aux_pairs(args.aux, args.seed + 1000, exclude={tuple(x) for p in pairs for x in p})
        aux_rows = [[BOS, *c, IS, *d, EOS] for c, d in aux] + [[BOS, *d, IS, *c, EOS] for c, d in aux]
        sym_rows = np.concatenate([rows, np.array(aux_rows, np.int32)])  # (N + 2 N_aux, 9)
        C = [c for c, _ in aux]
        D = [d for _, d in aux]
        sym = {"n_aux": args.aux, "steps": args.sym_steps, "n_train_sentences": int(len(sym_rows)),
               "example_aux_facts": [f"{text_of(C[0])} is {text_of(D[0])}", f"{text_of(D[0])} is {text_of(C[0])}"],
               "note": "test pairs: forward only; aux pairs: both orders; mdm_accuracy/arm_accuracy = greedy "
                       "'<bos> B_k is' -> A_k on the test pairs (never seen reversed)"}
        n = args.pairs
        cand = np.array(A, np.int32)
        out = {}
        for kind in ("arm", "mdm"):
            model, info = train_model(kind, sym_rows, args.sym_steps)
            if kind == "arm":
                g = Generator(model, eos_id=EOS, pad_id=PAD)
                run_gen = lambda prompts: g(prompts, Sampling(NAME_LEN + 1, 0.0)).tokens
            else:
                g = DiffusionGenerator(model, eos_id=EOS, pad_id=PAD)
                run_gen = lambda prompts: g(prompts, DiffusionSampling(max_new_tokens=NAME_LEN + 1,
                                                                       steps=NAME_LEN + 1, temperature=0.0)).tokens
            fwd_s = run_gen(fwd_prompts)
            rev_s = run_gen(rev_prompts)
            aux_f = run_gen([[BOS, *c, IS] for c in C])
            aux_r = run_gen([[BOS, *d, IS] for d in D])
            info.update(forward_accuracy=exact(fwd_s, B), reverse_accuracy=exact(rev_s, A),
                        reverse_output_is_some_A_name=in_A(rev_s),
                        aux_forward_accuracy=exact(aux_f, D), aux_reverse_accuracy=exact(aux_r, C),
                        reverse_examples=[{"query": f"{text_of(b)} is ?", "answer": text_of(a),
                                           "output": text_of(o)} for a, b, o in list(zip(A, B, rev_s))[:5]])
            # reverse ranking among the N test A-names
            t0 = time.perf_counter()
            if kind == "arm":
                @jax.jit
                def scores(b_name, model=model):
                    seq = jnp.concatenate([jnp.full((n, 1), BOS, jnp.int32), jnp.broadcast_to(b_name, (n, NAME_LEN)),
                                           jnp.full((n, 1), IS, jnp.int32), cand], 1)
                    logp = jax.nn.log_softmax(model(seq[:, :-1]), -1)
                    lp = jnp.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0]
                    return lp[:, -NAME_LEN:].sum(1)
                rank = np.mean([int(np.argmax(np.asarray(scores(jnp.array(b))))) == k for k, b in enumerate(B)])
            else:
                nll = jax.jit(lambda batch, model=model: chain_rule_nll(model, batch, max_target_len=NAME_LEN))

                def sc(b_name):
                    batch = pack([[BOS, *b_name, IS]] * n, [list(c) for c in cand], pad_id=PAD)
                    return -np.asarray(nll({k: jnp.asarray(v) for k, v in batch.items()}))
                rank = np.mean([int(np.argmax(sc(b))) == k for k, b in enumerate(B)])
                # infill in the training template <bos> [M]*3 is B <eos> (test pairs)
                mid = vocab
                x = np.array([[BOS, mid, mid, mid, IS, *b, EOS] for b in B], np.int32)
                fm = jax.jit(lambda t, model=model: model(t))
                for _ in range(NAME_LEN):
                    logp = np.asarray(jax.nn.log_softmax(fm(jnp.asarray(x)), -1))
                    pred, conf = logp.argmax(-1), logp.max(-1)
                    conf = np.where(x == mid, conf, -np.inf)
                    j = conf.argmax(1)
                    x[np.arange(len(x)), j] = pred[np.arange(len(x)), j]
                info["infill_reverse_accuracy"] = float(np.mean([list(r[1:1 + NAME_LEN]) == list(a)
                                                                 for r, a in zip(x, A)]))
            info["reverse_ranking_accuracy"] = float(rank)
            info["eval_seconds"] = time.perf_counter() - t0
            print(kind, "symmetric", {kk: vv for kk, vv in info.items() if kk != "loss_curve"}, flush=True)
            out[kind] = info
        sym["arm"], sym["mdm"] = out["arm"], out["mdm"]
        sym["mdm_accuracy"] = out["mdm"]["reverse_accuracy"]
        sym["arm_accuracy"] = out["arm"]["reverse_accuracy"]
        sym["mdm_forward_accuracy"] = out["mdm"]["forward_accuracy"]
        sym["arm_forward_accuracy"] = out["arm"]["forward_accuracy"]
        sym["mdm_aux_reverse_accuracy"] = out["mdm"]["aux_reverse_accuracy"]
        sym["arm_aux_reverse_accuracy"] = out["arm"]["aux_reverse_accuracy"]
        sym["runtime_seconds"] = time.perf_counter() - t_sym
        sym["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                          "jax": jax.__version__, "devices": str(jax.devices())}
        res["symmetric"] = sym

    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("arm", "mdm", "symmetric")}, indent=1))
    plot(res)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


def make_aux_pairs(n: int, seed: int, exclude: set):
    rng = random.Random(seed)
    names = set()
    while len(names) < 2 * n:
        nm = tuple(rng.randrange(len(SYLLABLES)) + 4 for _ in range(NAME_LEN))
        if nm not in exclude:
            names.add(nm)
    names = sorted(names)
    rng.shuffle(names)
    return [(list(names[2 * k]), list(names[2 * k + 1])) for k in range(n)]


def plot(res):
    from matplotlib.figure import Figure
    panels = [("original", res)] + ([("symmetric", res["symmetric"])] if "symmetric" in res else [])
    fig = Figure(figsize=(8.5 * len(panels), 4.6))
    n = res["n_pairs"]
    for p, (name, r) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        groups = [("forward\nA is ? (seen)", "forward_accuracy"), ("reverse\nB is ? (greedy)", "reverse_accuracy"),
                  ("reverse\nranking of N names", "reverse_ranking_accuracy")]
        vals = {k: [r[k][key] for _, key in groups] for k in ("arm", "mdm")}
        if name == "original":
            groups.append(("template '? is B'\nMDM: greedy infill\nARM: ranking of N names", None))
            vals["arm"].append(r["arm"]["template_ranking_accuracy"])
            vals["mdm"].append(r["mdm"]["infill_reverse_accuracy"])
        else:
            groups.append(("aux pairs\nD is ? (greedy,\nseen both orders)", None))
            vals["arm"].append(r["arm"]["aux_reverse_accuracy"])
            vals["mdm"].append(r["mdm"]["aux_reverse_accuracy"])
        w = 0.38
        for i, (kind, color) in enumerate((("arm", "C0"), ("mdm", "C1"))):
            v = [100 * x for x in vals[kind]]
            xs = np.arange(len(groups)) + (i - 0.5) * w
            ax.bar(xs, v, w, color=color, label=f"{kind.upper()} ({'causal' if kind == 'arm' else 'bidirectional'})")
            for xx, vv in zip(xs, v):
                ax.text(xx, vv + 1, f"{vv:.1f}", ha="center", fontsize=8)
        ax.axhline(100 / n, color="gray", ls="--", lw=1, label=f"chance (1/N = {100 / n:.2f}%)")
        ax.set_xticks(np.arange(len(groups)), [g for g, _ in groups], fontsize=8)
        ax.set_ylabel("accuracy (%) on the test pairs" if p == 0 else "accuracy (%)")
        ax.set_ylim(0, 125)
        if name == "original":
            title = (f"(a) original: {n} pairs, forward only; {res['steps']} steps, "
                     f"{res['arm']['params'] / 1e3:.0f}k params each")
        else:
            title = (f"(b) symmetric training: same {n} test pairs forward only\n+ {r['n_aux']} aux pairs in both "
                     f"orders; {r['steps']} steps; reverse asked on the test pairs")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(HERE / "reversal.png", dpi=120)


if __name__ == "__main__":
    main()
