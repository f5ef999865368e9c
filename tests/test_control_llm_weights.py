"""Control-LLM (issue 13), which weights train and how they merge back: trainable masks per merge and flag, no
optimizer state for frozen leaves, and merge-back's lerp and slerp of the weights (numpy formulas).

Tiny shapes throughout (d_model <= 64, vocab 128, 4 base layers); shared helpers in tests/control_llm_helpers.py.
"""
import dataclasses

import jax
import numpy as np
import pytest
from control_llm_helpers import (
    GATES,
    MERGES,
    _abstract,
    _cfg,
    _expanded_params,
    _perturbed,
    _sig,
    base_params_fixture,  # noqa: F401 (the base_params fixture)
)

from mathlm.models import merge_back, variants
from mathlm.models.expand import ExpandError, ExpandOptions
from mathlm.train.config import load_config
from mathlm.train.state import leaf_paths

# ----------------------------------------------------------------------------- freezing

def _paths(cfg) -> list[str]:
    return leaf_paths(_abstract(cfg)[1])


def _expected_trainable(cfg, typ, merge, freeze_gate, sites, inserts, norm_gate=False):
    out = set()
    always, maybe = GATES[merge]
    for path in _paths(cfg):
        parts = path.split("/")
        if parts[0] != "blocks":
            continue
        j = int(parts[1])
        if j in inserts:
            out.add(path)
        elif j in sites:
            if parts[2] == "expanded":
                if not (parts[-1] == "gate" and freeze_gate):
                    out.add(path)
            elif parts[2] in always or (parts[2] in maybe and not freeze_gate):
                out.add(path)
            else:
                assert parts[2] in ("pretrained", *always, *maybe), path
    if norm_gate:
        assert {f"blocks/{j}/expanded/{n}/gate" for j in sites for n in ("attn_norm", "mlp_norm")} <= set(_paths(cfg))
    return out


FREEZE_CASES = [(t, m, fg) for t in ("concat", "hybrid") for m in MERGES for fg in (False, True)] + [
    ("stack", "lerp", False), ("stack", "lerp", True)]
SITES = {"concat": ([1, 3], []), "hybrid": ([4], [2]), "stack": ([], [2, 5])}  # N=4, k=2 (block indices)


@pytest.mark.parametrize("typ,merge,freeze_gate", FREEZE_CASES)
def test_trainable_masks(typ, merge, freeze_gate):
    cfg = _cfg(type=typ, num_layers=2, merge=merge, freeze_gate=freeze_gate)
    is_trainable = variants.trainable_filter(cfg)
    got = {p for p in _paths(cfg) if is_trainable(p)}
    sites, inserts = SITES[typ]
    want = _expected_trainable(cfg, typ, merge, freeze_gate, sites, inserts)
    assert got == want
    # Spot checks in the spec's words.
    assert not any(p.startswith(("embed", "final_norm", "lm_head")) for p in got)
    assert not any(p.startswith(("blocks/0/", "blocks/1/")) for p in got if typ != "concat")
    for j in inserts:
        assert {f"blocks/{j}/attn_norm/scale", f"blocks/{j}/mlp_norm/scale", f"blocks/{j}/attn/o/kernel"} <= got
        assert not any(p.startswith(f"blocks/{j - 1}/") for p in got)  # the original before an insertion
    for j in sites:
        assert f"blocks/{j}/expanded/attn_norm/scale" in got and f"blocks/{j}/expanded/mlp/down/kernel" in got
        assert not any(p.startswith(f"blocks/{j}/pretrained/") for p in got)
        if merge in ("dlerp", "dlerpin"):
            assert f"blocks/{j}/interp_w" in got and (f"blocks/{j}/interp_b" in got) == (not freeze_gate)
        if merge in ("lerp", "slerp"):
            assert (f"blocks/{j}/interpolation_factor" in got) == (not freeze_gate)
        if merge == "moe":
            assert f"blocks/{j}/router" in got and (f"blocks/{j}/router_bias" in got) == (not freeze_gate)
        if merge in ("proj", "prog"):
            assert f"blocks/{j}/proj" in got


@pytest.mark.parametrize("freeze_gate", [False, True])
def test_relaxed_norm_gates_and_freeze_flags(freeze_gate):
    cfg = _cfg(type="concat", num_layers=2, merge="lerp", norm_alpha=-1, freeze_gate=freeze_gate)
    is_trainable = variants.trainable_filter(cfg)
    got = {p for p in _paths(cfg) if is_trainable(p)}
    assert got == _expected_trainable(cfg, "concat", "lerp", freeze_gate, [1, 3], [], norm_gate=True)
    assert ("blocks/1/expanded/attn_norm/gate" in got) == (not freeze_gate)
    open_cfg = _cfg(type="concat", num_layers=2, merge="lerp", freeze_base_layers=False, freeze_non_layers=False)
    is_trainable = variants.trainable_filter(open_cfg)
    frozen = {p for p in _paths(open_cfg) if not is_trainable(p)}
    assert frozen == set()
    half = _cfg(type="stack", num_layers=2, freeze_non_layers=False)
    is_trainable = variants.trainable_filter(half)
    got = {p for p in _paths(half) if is_trainable(p)}
    assert {p for p in got if not p.startswith("blocks/")} == {"embed/embedding", "final_norm/scale",
                                                               "lm_head/kernel"}
    assert {p.split("/")[1] for p in got if p.startswith("blocks/")} == {"2", "5"}


OPT_CASES = [("concat", "lerp", True), ("concat", "dlerp", True), ("hybrid", "moe", False), ("stack", "lerp", False)]


@pytest.mark.parametrize("typ,merge,freeze_gate", OPT_CASES)
def test_frozen_leaves_have_no_optimizer_state(typ, merge, freeze_gate):
    from mathlm.train.trainer import build
    over = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
            "model.d_ff=128", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
            "model.init_from=/nonexistent/base", f"expand.type={typ}", "expand.num_layers=2", f"expand.merge={merge}",
            f"expand.freeze_gate={str(freeze_gate).lower()}", "train.b2=0.999", "train.weight_decay_lr_ratio=0.1"]
    setup = build(load_config(None, over))
    all_paths = leaf_paths(setup.abstract_params)
    trainable = leaf_paths(setup.abstract_trainable)
    frozen = leaf_paths(setup.abstract_frozen["model"])
    assert sorted(trainable + frozen) == sorted(all_paths) and not set(trainable) & set(frozen)
    is_trainable = variants.trainable_filter(setup.cfg.model)
    assert trainable == [p for p in all_paths if is_trainable(p)]
    shapes = {p: x.shape for p, x in zip(all_paths, jax.tree.leaves(setup.abstract_params))}
    # Adam's mu and nu: exactly one of each per trainable leaf (same path, same shape), none for frozen ones.
    state_paths = [p for p, x in zip(leaf_paths(setup.abstract_opt["state"]), jax.tree.leaves(setup.abstract_opt[
        "state"])) if x.shape != () or any(p.endswith(t) for t in trainable)]
    owners = {}
    for p in state_paths:
        match = [t for t in all_paths if p.endswith("/" + t)]
        assert len(match) == 1, p
        owners[match[0]] = owners.get(match[0], 0) + 1
        assert match[0] in trainable, p
    assert owners == {t: 2 for t in trainable}
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_opt["state"]))
    n_trainable = sum(int(np.prod(shapes[t])) for t in trainable)
    assert n_state - 2 * n_trainable < 8  # nothing else but scalar counters



# ----------------------------------------------------------------------------- merge-back (numpy)

def test_merge_back_lerp_formula():
    r = np.random.default_rng(2)
    w_pre, w_exp = r.normal(size=(6, 5)).astype(np.float32), r.normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(merge_back.lerp_weights(w_pre, w_exp, 0.3), 0.7 * w_pre + 0.3 * w_exp, atol=1e-6)
    assert merge_back.lerp_weights(w_pre, w_exp, 0.3).dtype == np.float32


def _np_torch_row_slerp(w_pre, w_exp, a):
    """The reference on torch's (out, in) layout: each row (last dim) slerped."""
    rows = []
    for p, e in zip(w_pre.astype(np.float64), w_exp.astype(np.float64)):
        c = np.clip(np.dot(p / np.linalg.norm(p), e / np.linalg.norm(e)), -1 + 1e-6, 1 - 1e-6)
        th = np.arccos(c)
        rows.append(np.sin((1 - a) * th) / (np.sin(th) + 1e-6) * p + np.sin(a * th) / (np.sin(th) + 1e-6) * e)
    return np.stack(rows)


def test_merge_back_slerp_runs_along_the_input_axis():
    r = np.random.default_rng(4)
    k_pre = r.normal(size=(6, 4)).astype(np.float32)  # Flax (in, out) kernel
    k_exp = (k_pre * r.uniform(0.2, 3.0, size=(1, 4)) + 0.3 * r.normal(size=(6, 4))).astype(np.float32)
    a = 0.3
    want = _np_torch_row_slerp(k_pre.T, k_exp.T, a).T  # torch rows = Flax columns
    other = _np_torch_row_slerp(k_pre, k_exp, a)  # slerp of Flax rows: a different answer
    assert np.abs(want - other).max() > 1e-2
    np.testing.assert_allclose(merge_back.slerp_weights(k_pre, k_exp, a), want, atol=1e-5)
    v_pre, v_exp = r.normal(size=7).astype(np.float32), r.normal(size=7).astype(np.float32)  # a norm: one row
    np.testing.assert_allclose(merge_back.slerp_weights(v_pre, v_exp, a), _np_torch_row_slerp(
        v_pre[None], v_exp[None], a)[0], atol=1e-5)


@pytest.mark.parametrize("a", [0.5, 0.2])
def test_merge_back_slerp_of_identical_weights_scales_by_099929(a):
    w = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    ratio = merge_back.slerp_weights(w, w, a) / w
    assert np.all(np.abs(ratio - 0.99929) <= 2e-5), ratio


def test_merged_params_weights_and_supported_inputs(base_params):
    cfg = _cfg(type="concat", num_layers=2, merge="dlerp", gate_init=0.4)
    opts = ExpandOptions(type="concat", num_layers=2, merge="dlerp", gate_init=0.4)
    params = jax.device_get(_perturbed(_expanded_params(base_params, cfg), cfg))
    merged, used = merge_back.merged_params(params, 4, opts, {})
    b1, b3 = (float(params["blocks"][j]["interp_b"][0]) for j in (1, 3))
    assert used == pytest.approx({1: _sig(b1), 3: _sig(b3)}, abs=1e-7)  # sigma(b), w ignored
    merged_eval, used = merge_back.merged_params(params, 4, opts, {3: 0.9})
    assert used[3] == 0.9 and used[1] == pytest.approx(_sig(b1))  # the eval running-mean gate wins
    site = params["blocks"][3]
    q = merged_eval["blocks"][3]["attn"]["q"]["kernel"]
    np.testing.assert_allclose(q, _np_torch_row_slerp(np.asarray(site["pretrained"]["attn"]["q"]["kernel"]).T,
                                                      np.asarray(site["expanded"]["attn"]["q"]["kernel"]).T, 0.9).T,
                               atol=1e-5)
    assert set(merged["blocks"][1]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert leaf_paths(merged) == leaf_paths(base_params)  # the base architecture's weights, exactly
    for bad, needle in [(dict(type="stack"), "concat expansions only, not stack"),
                        (dict(type="hybrid"), "concat expansions only, not hybrid"),
                        (dict(merge="moe"), "not moe"), (dict(merge="proj"), "not proj"),
                        (dict(merge="prog"), "not prog"),
                        (dict(norm_alpha=-1.0), "relaxed norms")]:
        with pytest.raises(ExpandError, match=needle):
            merge_back.check_mergeable(dataclasses.replace(opts, **bad))
