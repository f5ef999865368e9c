"""Resumable batch generation into JSONL: the pipeline's weak, ICL, regen, sampling and test passes.

Each row's PRNG key comes from (seed, question id), never from its batch or position, and the batches themselves
are fixed up front (rows sorted by prompt length, then id, cut every `batch_size`): so a pass killed midway and
resumed computes every remaining batch exactly as an uninterrupted pass would, and the final file is
byte-identical. Finished batches are appended to `<out>.partial` (one JSON line per batch, fsynced; a torn last
line is ignored on resume, its header names the step key it belongs to); at the end the rows are written to
`out` in id order and the partial file is removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence

from mathlm.data.w2s import clean_response, final_answer
from mathlm.models.generate import Sampling
from mathlm.train.eval.inference import Engine, complete, cut_at_stop, encode_prompt
from mathlm.train.w2s.manifest import write_jsonl
from mathlm.train.w2s.models import Preempted


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    seed: int = 0
    extra: tuple = ()  # (key, value) pairs copied into the output row (e.g. ("sample", 3), ("question", q))


def id_hash(question_id: str) -> int:
    """A question id as a 31-bit integer for jax.random.fold_in."""
    return int(hashlib.sha256(question_id.encode("utf-8")).hexdigest()[:8], 16) & 0x7FFFFFFF


def _batches(engine: Engine, items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    lengths = {it: len(encode_prompt(engine.tokenizer, it.prompt)) for it in items}
    out = []
    for seed in sorted({it.seed for it in items}):
        rows = sorted((it for it in items if it.seed == seed), key=lambda it: (lengths[it], it.id))
        out += [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    return out


def _read_partial(path: pathlib.Path, key: str) -> dict[int, list[dict]]:
    """Finished batches of an interrupted pass with the same key; anything else is dropped."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("key") != key:
        path.unlink()
        return {}
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        done[rec["batch"]] = rec["rows"]
    return done


def _append(path: pathlib.Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate(engine: Engine, items: Sequence[Item], sampling: Sampling, out: pathlib.Path, *, key: str,
             task: str, stop: Sequence[str], batch_size: int, log=print,
             stop_after_batches: int | None = None, should_stop: Callable[[], bool] = lambda: False) -> list[dict]:
    """One completion per item -> rows {id, <extra>, response, answer} in (id, extra) order, written to `out`.

    The stored response is cut at the first stop string and cleaned as the reference does; `answer` is its
    canonical final answer ("" when none). `stop_after_batches` ends the pass early (a simulated kill, for
    tests); the partial file stays and the next call resumes it. `should_stop` (a SIGTERM came) is asked before
    each batch: True ends the pass the same way, as `Preempted`, so the pipeline stops cleanly (exit 0)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    batches = _batches(engine, items, batch_size)
    done = _read_partial(partial, key)
    if not partial.is_file():
        _append(partial, {"key": key, "batches": len(batches)})
    if done:
        log(f"  resuming {out.name}: {len(done)} of {len(batches)} batches already done")
    t0, new_tokens, ran = time.perf_counter(), 0, 0
    for b, batch in enumerate(batches):
        if b in done:
            continue
        if stop_after_batches is not None and ran >= stop_after_batches:
            raise KeyboardInterrupt(f"stopped after {ran} batches (stop_after_batches)")
        if should_stop():
            raise Preempted(f"{out.name} stopped after {len(done)} of {len(batches)} batches (kept in {partial.name})")
        res = complete(engine, [it.prompt for it in batch], sampling, stop=stop, seed=batch[0].seed,
                       sample_ids=[id_hash(it.id) for it in batch], batch_size=len(batch))
        rows = []
        for it, text in zip(batch, res.texts):
            response = clean_response(cut_at_stop(text, stop)[0])
            rows.append({"id": it.id, **dict(it.extra), "response": response, "answer": final_answer(response, task)})
        _append(partial, {"batch": b, "rows": rows})
        done[b] = rows
        ran += 1
        new_tokens += res.new_tokens
        _progress(log, out.name, len(done), len(batches), t0, new_tokens)
    rows = sorted((r for rs in done.values() for r in rs), key=_order)
    write_jsonl(out, rows)
    partial.unlink()
    return rows


def _order(row: dict):
    return (row["id"], row.get("sample", 0))


def _progress(log: Callable, name: str, done: int, total: int, t0: float, new_tokens: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        elapsed = time.perf_counter() - t0
        rate = new_tokens / max(elapsed, 1e-9)
        log(f"  {name}: batch {done}/{total}, {rate:,.0f} new tok/s, {elapsed:.0f} s")
