"""Tokenizer, token store, packing, SFT masking, process sharding and iterator state."""
import json

import numpy as np
import pytest

from mathlm.data.pipeline import PackedWindows, SFTRows, eval_batches, make_source, train_dataset
from mathlm.data.sources import DataError, Example, read_examples
from mathlm.data.store import TokenStore, write_store
from mathlm.data.tokenizer import Tokenizer

TEXTS = ["Tom has 12 apples.\nHe eats 3, so 12 - 3 = 9.\n#### 9", "  leading spaces\tand tabs  ",
         "Unicode: café, 日本語, emoji 🙂, math ∑ x² ≤ 3.14159", "", "1234567890 007 -42 3/4 $1,000.50"]


def test_tokenizer_round_trips_and_splits_digits(corpus):
    tok = Tokenizer.load(corpus["tokenizer"])
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("12345")
    assert len(ids) == 5 and [tok.decode([i]) for i in ids] == list("12345")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.mask_id == tok.vocab_size  # the model's extra embedding row
    assert tok.vocab_size <= 512


def _store(tmp_path, tok, examples):
    url = str(tmp_path / "store")
    write_store(url, examples, tok)
    return TokenStore(url)


def test_store_round_trip(corpus, tmp_path):
    tok = Tokenizer.load(corpus["tokenizer"])
    exs = [Example("", t) for t in TEXTS] + [Example("Question: 2+2?\nAnswer:", " 4")]
    store = _store(tmp_path, tok, exs)
    assert store.n_docs == len(exs)
    for i, ex in enumerate(exs):
        ids, prompt_len = store.doc(i)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == ex.text
        assert prompt_len == 1 + len(tok.encode(ex.prompt))


def test_packed_windows_reset_positions_and_mask_cross_document_targets(corpus):
    src = PackedWindows(TokenStore(str(corpus["train"])), 64)
    offsets = src.store.doc_offsets
    for i in (0, 1, 7, len(src) - 1):
        w = src[i]
        start = i * 64
        for t in range(64):
            g = start + t
            doc = np.searchsorted(offsets, g, side="right") - 1
            assert w["positions"][t] == g - offsets[doc]
            same_doc_target = (np.searchsorted(offsets, g + 1, side="right") - 1) == doc
            assert w["loss_mask"][t] == float(same_doc_target)
        np.testing.assert_array_equal(w["inputs"][1:], w["targets"][:-1])
        assert w["segment_ids"][0] == 1 and np.all(np.diff(w["segment_ids"]) >= 0)
        starts = np.flatnonzero(np.diff(w["segment_ids"])) + 1
        assert np.all(w["positions"][starts] == 0)


def test_sft_rows_train_on_the_response_only(corpus, tmp_path):
    tok = Tokenizer.load(corpus["tokenizer"])
    store = _store(tmp_path, tok, [Example("Question: 3*4?\nAnswer:", " 12\n#### 12")])
    row = SFTRows(store, 32, tok.pad_id)[0]
    ids, prompt_len = store.doc(0)
    trained = row["targets"][row["loss_mask"] > 0]
    np.testing.assert_array_equal(trained, ids[prompt_len:])  # response tokens and the final eos
    assert tok.decode(trained[:-1]) == " 12\n#### 12" and trained[-1] == tok.eos_id
    assert row["segment_ids"].sum() == len(ids) and np.all(row["inputs"][len(ids):] == tok.pad_id)


def test_sft_truncation_is_counted_or_refused(corpus, tmp_path):
    tok = Tokenizer.load(corpus["tokenizer"])
    url = str(tmp_path / "long")
    write_store(url, [Example("Question: long?\nAnswer:", " x" * 100), Example("Q", " ok")], tok)
    assert make_source(url, "sft", 16, tok.pad_id, truncate=True).truncated == 1
    with pytest.raises(DataError, match="1 examples are longer"):
        make_source(url, "sft", 16, tok.pad_id, truncate=False)


def test_process_shards_are_disjoint_and_compose_the_global_batch(corpus):
    src = make_source(str(corpus["train"]), "lm", 64, 0)
    one = iter(train_dataset(src, global_batch=8, process_index=0, process_count=1, seed=3))
    parts = [iter(train_dataset(src, global_batch=8, process_index=p, process_count=2, seed=3)) for p in range(2)]
    for _ in range(4):
        full = next(one)["inputs"]
        halves = [next(it)["inputs"] for it in parts]
        np.testing.assert_array_equal(np.concatenate(halves), full)


def test_iterator_state_restores_the_position(corpus):
    src = make_source(str(corpus["train"]), "lm", 64, 0)
    ds = train_dataset(src, global_batch=8, process_index=0, process_count=1, seed=0)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip (how it is checkpointed)
    expected = [next(it)["inputs"] for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["inputs"], e)


def test_epochs_are_reshuffled(corpus):
    src = make_source(str(corpus["train"]), "lm", 64, 0)
    n = len(src)
    ds = train_dataset(src, global_batch=1, process_index=0, process_count=1, seed=0)
    it = iter(ds)
    first = [int(next(it)["inputs"][0, 0]) for _ in range(n)]
    second = [int(next(it)["inputs"][0, 0]) for _ in range(n)]
    assert sorted(first) == sorted(second) and first != second


def test_eval_batches_are_in_order(corpus):
    src = make_source(str(corpus["validation"]), "lm", 64, 0)
    batches = eval_batches(src, global_batch=2, process_index=0, process_count=1, max_batches=2)
    np.testing.assert_array_equal(batches[1]["inputs"][0], src[2]["inputs"])


def test_sources_report_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        list(read_examples([str(bad)]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no examples"):
        list(read_examples([str(empty)]))
    with pytest.raises(DataError, match="not found"):
        list(read_examples([str(tmp_path / "missing.jsonl")]))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": 1}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: needs a 'text' field"):
        list(read_examples([str(nofield)]))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "What is 2+2?", "answer": "4\n#### 4"}) + "\n")
    (ex,) = read_examples([str(qa)])
    assert ex.prompt == "Question: What is 2+2?\nAnswer:" and ex.response == " 4\n#### 4"
    txt = tmp_path / "doc.txt"
    txt.write_text("para one\nline two\n\npara two\n")
    assert [e.text for e in read_examples([str(txt)])] == ["para one\nline two", "para two"]
