"""Calibrate the synthetic weak-to-strong setup (issue 14, "Experiment"): synth difficulty, strong M, weak m, and the
gold ceiling, measured on the 500-problem test split.

    python experiments/weak_to_strong/calibration/calibrate.py --out /tmp/w2s-cal/final          # the final choice
    python experiments/weak_to_strong/calibration/calibrate.py --out /tmp/w2s-cal/x --max-steps 3 --m-sft-steps 400

Steps (each one is skipped when its output exists, so a rerun resumes):
  data      the synth pool (all three of synth's own splits), sorted by record id, carved into
            test = first 500, split2 = next 2000 (unlabelled), split1 = next 2000 (labelled), pretrain = the rest;
            written as JSONL with question/answer fields (data/sources.py: "Question: q\\nAnswer:" + " a").
            Asserts that no split-2 or test question text is in split 1 or the pretraining corpus.
  tokenizer one byte-level BPE trained on the pretraining corpus, shared by every model (so demos are plain text
            and every exchange is text either way)
  M         strong model: causal LM (data.format lm) on the pretraining corpus only
  m         weak model: optional LM pretraining on the first --m-pre-docs pretraining documents, then SFT
            (data.format sft, prompt masked) on split 1's gold solutions
  ceiling   M + LoRA (r 8, alpha 16, q/k/v/o/gate/up/down) SFT on split 2's gold solutions (analysis only)
  eval      greedy test accuracy (synth extractor `#### N`) of m, M zero-shot, M 4-shot ICL (demos: m's own
            greedy solutions of 4 split-2 questions with a non-empty answer, verbatim, as the pipeline does),
            and the ceiling; m's accuracy on split 2 (the weak-label accuracy); per-step wall times.
Results: OUT/results.json (one object) and one line appended to OUT/../runs.jsonl.
Generation stops at EOS or at the first "Question"/"Answer" in the generated text (the issue's rule).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[3]
STOP = ("Question", "Answer")


def sh(cmd: list[str], log: pathlib.Path) -> float:
    """Run a command (its output to `log`); returns its wall time in seconds."""
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def write_jsonl(path: pathlib.Path, recs: list[dict]) -> None:
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps({"id": r["id"], "question": r["question"], "answer": r["answer"],
                                "steps": r["steps"]}) + "\n")


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def make_data(a, d: pathlib.Path) -> dict:
    from mathlm.data import synth
    sp = synth.generate(synth.SynthConfig(n=a.n, seed=a.seed, min_steps=a.min_steps, max_steps=a.max_steps,
                                          max_value=a.max_value))
    pool = sorted((r for recs in sp.values() for r in recs), key=lambda r: r["id"])
    parts = {"test": pool[:500], "split2": pool[500:2500], "split1": pool[2500:4500], "pretrain": pool[4500:]}
    held = {r["question"] for r in parts["test"] + parts["split2"]}
    for name in ("split1", "pretrain"):
        assert not held & {r["question"] for r in parts[name]}, f"split-2/test question in {name}"
    d.mkdir(parents=True, exist_ok=True)
    for name, recs in parts.items():
        write_jsonl(d / f"{name}.jsonl", recs)
    if a.m_pre_docs:
        write_jsonl(d / "pretrain_m.jsonl", parts["pretrain"][: a.m_pre_docs])
    return {k: len(v) for k, v in parts.items()}


def model_yaml(prefix: str, d: int, layers: int, heads: int, kv: int, ff: int, max_len: int) -> str:
    return (f"model:\n  vocab_size: {prefix}\n  d_model: {d}\n  n_layers: {layers}\n  n_heads: {heads}\n"
            f"  n_kv_heads: {kv}\n  d_ff: {ff}\n  max_seq_len: {max_len}\n")


def write_cfg(path: pathlib.Path, model: str, train_files: list[str], fmt: str, tok: str, steps: int, batch: int,
              seq: int, lr: float, warmup: int, extra: str = "", ckpt_every: int = 0) -> None:
    path.write_text(
        model + extra +
        f"data:\n  train: {json.dumps(train_files)}\n  validation: null\n  format: {fmt}\n  tokenizer: {tok}\n"
        f"train:\n  steps: {steps}\n  batch_size: {batch}\n  seq_len: {seq}\n  lr: {lr}\n  warmup_steps: {warmup}\n"
        f"  log_every: 25\n  eval_every: 1000000\n"
        f"checkpoint:\n  every_steps: {ckpt_every or steps}\n  keep: {steps // ckpt_every if ckpt_every else 1}\n")


def train(cfg: pathlib.Path, run: pathlib.Path, overrides: list[str] = ()) -> float:
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        return json.loads((run / "wall.json").read_text())["wall_s"] if (run / "wall.json").is_file() else 0.0
    wall = sh([sys.executable, "-m", "mathlm.cli.main", "train", str(cfg), "--workdir", str(run), "--no-progress",
               *overrides], run.parent / f"{run.name}.log")
    (run / "wall.json").write_text(json.dumps({"wall_s": wall}))
    return wall


def final_loss(run: pathlib.Path) -> float | None:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return None
    losses = [r["loss"] for r in map(json.loads, open(p)) if "loss" in r]
    return round(sum(losses[-3:]) / len(losses[-3:]), 4) if losses else None


class Gen:
    """Greedy generation + synth grading over one run folder (mathlm.train.eval.inference.complete)."""

    def __init__(self, run: pathlib.Path, max_new: int, batch: int):
        from mathlm.train.eval.inference import load_engine, make_sampling
        self.engine = load_engine(str(run))
        self.sampling = make_sampling("arm", max_new_tokens=max_new)
        self.batch = batch

    def __call__(self, prompts: list[str]) -> tuple[list[str], float]:
        from mathlm.train.eval.inference import complete
        t = time.time()
        out = complete(self.engine, prompts, self.sampling, stop=STOP, batch_size=self.batch)
        return [x.strip().strip(".") for x in out.texts], time.time() - t


def grade(responses: list[str], recs: list[dict]) -> tuple[float, float]:
    """(accuracy %, fraction with a `#### N` answer)."""
    from mathlm.data import synth, tasks
    g = [tasks.grade(r, synth.final_answer(rec["answer"]), "synth") for r, rec in zip(responses, recs)]
    return (round(100 * sum(x["correct"] for x in g) / len(g), 2),
            round(sum(bool(x["extracted"]) for x in g) / len(g), 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, required=True)
    # synth knobs
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--max-value", type=int, default=20)
    p.add_argument("--vocab", type=int, default=512)
    # strong M
    p.add_argument("--M-d", type=int, default=256)
    p.add_argument("--M-layers", type=int, default=4)
    p.add_argument("--M-heads", type=int, default=4)
    p.add_argument("--M-kv", type=int, default=2)
    p.add_argument("--M-ff", type=int, default=704)
    p.add_argument("--M-steps", type=int, default=600)
    p.add_argument("--M-batch", type=int, default=16)
    p.add_argument("--M-seq", type=int, default=256)
    p.add_argument("--M-lr", type=float, default=3e-3)
    p.add_argument("--M-init", type=str, default=None, help="reuse this M run (or a step folder)")
    p.add_argument("--M-horizon", type=int, default=800, help="cosine horizon in steps (0: --M-steps)")
    p.add_argument("--M-ckpt-every", type=int, default=0, help="keep a checkpoint every K steps (0: the last only)")
    # weak m
    p.add_argument("--m-d", type=int, default=128)
    p.add_argument("--m-layers", type=int, default=4)
    p.add_argument("--m-heads", type=int, default=4)
    p.add_argument("--m-kv", type=int, default=1)
    p.add_argument("--m-ff", type=int, default=352)
    p.add_argument("--m-pre-docs", type=int, default=25500, help="pretrain m on the first N pretraining docs (0: none)")
    p.add_argument("--m-pre-steps", type=int, default=600)
    p.add_argument("--m-pre-lr", type=float, default=3e-3)
    p.add_argument("--m-sft-steps", type=int, default=300)
    p.add_argument("--m-sft-lr", type=float, default=3e-3)
    # ceiling: LoRA SFT of M on split 2 gold
    p.add_argument("--c-steps", type=int, default=200)
    p.add_argument("--c-lr", type=float, default=2e-3)
    p.add_argument("--c-full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-seq", type=int, default=160)
    p.add_argument("--max-new", type=int, default=96)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--split2-limit", type=int, default=200, help="split-2 questions for m's label accuracy")
    p.add_argument("--skip", default="", help="comma list of evals to skip: icl,zs,ceiling,split2")
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    res: dict = {"args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(a).items()}}
    wall: dict = {}
    d = out / "data"
    t = time.time()
    if not (d / "pretrain.jsonl").is_file():
        res["sizes"] = make_data(a, d)
    wall["data"] = round(time.time() - t, 1)
    tok = out / "tokenizer.json"
    if not tok.is_file() and a.M_init:  # the given M's tokenizer (its run folder holds the one it was trained with)
        from mathlm.train.runs import run_dir_of
        tok.write_bytes((run_dir_of(a.M_init) / "tokenizer.json").read_bytes())
    if not tok.is_file():
        wall["tokenizer"] = round(sh([sys.executable, "-m", "mathlm.cli.main", "tokenizer", "train",
                                      str(d / "pretrain.jsonl"), "--vocab-size", str(a.vocab), "--out", str(tok)],
                                     out / "tokenizer.log"), 1)
    from mathlm.data.sources import qa_prompt
    from mathlm.data.tokenizer import Tokenizer
    tk = Tokenizer.load(tok)
    test, split1, split2 = (read_jsonl(d / f"{s}.jsonl") for s in ("test", "split1", "split2"))
    lens = sorted(len(tk.encode(" " + r["answer"])) + 1 for r in split1)
    plens = sorted(len(tk.encode(qa_prompt(r["question"]))) + 1 for r in split1)
    res["tokens"] = {"solution_p50": lens[len(lens) // 2], "solution_p99": lens[int(0.99 * len(lens))],
                     "solution_max": lens[-1], "prompt_p50": plens[len(plens) // 2], "prompt_max": plens[-1]}
    print("tokens:", res["tokens"], flush=True)

    # ---- strong M: LM pretraining on the pretraining corpus only
    M_model = model_yaml(str(a.vocab), a.M_d, a.M_layers, a.M_heads, a.M_kv, a.M_ff, 1024)
    M = pathlib.Path(a.M_init).resolve() if a.M_init else out / "M"
    if not a.M_init:
        horizon = a.M_horizon or a.M_steps  # cosine horizon (the measured M: step 600 of an 800-step schedule)
        write_cfg(out / "M.yaml", M_model, [str(d / "pretrain.jsonl")], "lm", str(tok), a.M_steps, a.M_batch,
                  a.M_seq, a.M_lr, max(20, horizon // 20), ckpt_every=a.M_ckpt_every)
        wall["M_pretrain"] = round(train(out / "M.yaml", M, [f"train.horizon_steps={horizon}"]), 1)
    res["M_loss"] = final_loss(M)

    # ---- weak m: (optional) LM pretraining on part of the corpus, then SFT on split 1 gold
    m_model = model_yaml(str(a.vocab), a.m_d, a.m_layers, a.m_heads, a.m_kv, a.m_ff, 512)
    m_init = ""
    if a.m_pre_docs and a.m_pre_steps:
        write_cfg(out / "m_pre.yaml", m_model, [str(d / "pretrain_m.jsonl")], "lm", str(tok), a.m_pre_steps,
                  16, 256, a.m_pre_lr, max(20, a.m_pre_steps // 20))
        wall["m_pretrain"] = round(train(out / "m_pre.yaml", out / "m_pre"), 1)
        m_init = f"  init_from: {out / 'm_pre'}\n"
    write_cfg(out / "m.yaml", m_model + m_init, [str(d / "split1.jsonl")], "sft", str(tok), a.m_sft_steps,
              a.sft_batch, a.sft_seq, a.m_sft_lr, max(10, a.m_sft_steps // 20))
    wall["m_sft"] = round(train(out / "m.yaml", out / "m"), 1)
    res["m_loss"] = final_loss(out / "m")

    # ---- ceiling: M + LoRA (or full) SFT on split 2 gold (analysis only: the pipeline never reads these labels)
    if "ceiling" not in skip:
        variant = "" if a.c_full else "  variant: {name: lora, r: 8, alpha: 16}\n"
        write_cfg(out / "ceiling.yaml", M_model + f"  init_from: {M}\n" + variant, [str(d / "split2.jsonl")], "sft",
                  str(tok), a.c_steps, a.sft_batch, a.sft_seq, a.c_lr, max(10, a.c_steps // 20))
        wall["ceiling_sft"] = round(train(out / "ceiling.yaml", out / "ceiling"), 1)
        res["ceiling_loss"] = final_loss(out / "ceiling")

    # ---- evaluation
    acc: dict = {}
    prompts = [qa_prompt(r["question"]) for r in test]
    g = Gen(out / "m", a.max_new, a.gen_batch)
    resp, wall["gen_m_test"] = g(prompts)
    acc["weak_m"], acc["weak_m_answered"] = grade(resp, test)
    lens_out = sorted(len(tk.encode(r)) for r in resp)
    res["weak_response_tokens_max"] = lens_out[-1]
    s2 = split2[: a.split2_limit]
    resp2, wall[f"gen_m_split2_{len(s2)}"] = g([qa_prompt(r["question"]) for r in s2])
    acc[f"weak_label_acc_split2_first{len(s2)}"], _ = grade(resp2, s2)
    from mathlm.data import tasks
    have = [i for i, r in enumerate(resp2) if tasks.grade(r, "0", "synth")["extracted"]]
    demo_idx = random.Random(0).sample(have, 4)
    demos = "".join(f"Question: {s2[i]['question']}\nAnswer: {resp2[i]}\n\n" for i in demo_idx)
    res["demos_correct"] = [bool(tasks.grade(resp2[i], s2[i]["answer"].split("#### ")[-1], "synth")["correct"])
                            for i in demo_idx]
    print("weak:", acc, flush=True)
    if "zs" not in skip or "icl" not in skip:
        G = Gen(M, a.max_new, a.gen_batch)
        if "zs" not in skip:
            r, wall["gen_M_zeroshot_test"] = G(prompts)
            acc["strong_zeroshot"], acc["strong_zeroshot_answered"] = grade(r, test)
        if "icl" not in skip:
            r, wall["gen_M_icl4_test"] = G([demos + p for p in prompts])
            acc["strong_icl4"], acc["strong_icl4_answered"] = grade(r, test)
        print("strong:", acc, flush=True)
    if "ceiling" not in skip:
        r, wall["gen_ceiling_test"] = Gen(out / "ceiling", a.max_new, a.gen_batch)(prompts)
        acc["ceiling"], acc["ceiling_answered"] = grade(r, test)
        acc["gap_ceiling_minus_weak"] = round(acc["ceiling"] - acc["weak_m"], 2)
    res["accuracy"] = acc
    res["wall_s"] = {k: round(v, 1) for k, v in wall.items()}
    print(json.dumps(res, indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    with open(out.parent / "runs.jsonl", "a") as f:
        f.write(json.dumps({"name": out.name, **res}) + "\n")


if __name__ == "__main__":
    main()
