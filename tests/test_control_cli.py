"""Control-LLM (issue 13) end to end through the CLI: `convert expand`, training from its output (save, resume),
expansion at init, `eval` gate statistics, `convert merge-back`, `convert to-hf` of stack and merged models, and
every bad input as a one-line error that writes nothing.

One random 4-layer base (d 64) on the shared tiny corpus; each training run is 1-2 steps.
"""
import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import tiny_overrides
from flax import nnx
from typer.testing import CliRunner

from mathlm import models
from mathlm.cli.main import app
from mathlm.models.transformer import Transformer
from mathlm.train import checkpoint as ckpt
from mathlm.train.config import load_config
from mathlm.train.loop import train
from mathlm.train.runs import load_run, save_params_run
from mathlm.train.state import leaf_paths

runner = CliRunner()
CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "math-tiny.yaml")
SHAPE = ("model.n_layers=4", "model.max_seq_len=128", "data.synth_n=400")


def _ok(args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, repr(result.exception))
    return result.output


def _fails(args, *needles, written: pathlib.Path | None = None) -> str:
    """Exit != 0, exactly one line on stderr (`error: ...`) naming `needles`, no traceback, nothing written."""
    result = runner.invoke(app, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error: "), (
        result.output, repr(result.exception))
    for n in needles:
        assert n in lines[0], lines[0]
    if written is not None:
        assert not written.exists(), f"{written} was written"
    return lines[0]


def _sig(x) -> float:
    return float(1 / (1 + np.exp(-float(np.asarray(x).reshape(-1)[0]))))


def _flat(model) -> dict:
    tree = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return dict(zip(leaf_paths(tree), jax.tree.leaves(tree)))


def _expansion(run: pathlib.Path, step: int) -> dict:
    return ckpt.read_meta(run / "checkpoints", step)["expansion"]


@pytest.fixture(scope="module")
def plain(corpus, tmp_path_factory):
    """A random plain 4-layer run (the base every expansion below starts from)."""
    cfg = load_config(None, tiny_overrides(corpus, *SHAPE))
    model = Transformer(cfg.model, nnx.Rngs(0))
    return save_params_run(tmp_path_factory.mktemp("control") / "plain", cfg,
                           nnx.to_pure_dict(nnx.state(model, nnx.Param)), corpus["tokenizer"])


@pytest.fixture(scope="module")
def expanded(plain):
    """`convert expand`: concat, k = 2 (sites 1 and 3), lerp with f = 0.5, mse divergence, alpha 0.5."""
    out = plain.parent / "concat"
    log = _ok(["convert", "expand", plain, out, "--type", "concat", "--num-layers", "2", "--merge", "lerp",
               "--gate-init", "0.5", "--div-loss", "mse", "--div-alpha", "0.5"])
    assert "sites [1, 3]" in log and "depth 4 -> 4" in log
    return out


EXPANSION = {"type": "concat", "merge": "lerp", "num_layers": 2, "num_ori_layers": 4, "depth": 4, "sites": [1, 3],
             "site_blocks": [1, 3], "inserted_after": [], "inserted_blocks": [], "gate_init": 0.5,
             "freeze_gate": False, "div_loss": "mse", "div_alpha": 0.5, "norm_alpha": 0.0,
             "freeze_base_layers": True, "freeze_non_layers": True}


def test_convert_expand_writes_an_expanded_run(plain, expanded):
    exp = _expansion(expanded, 0)
    assert pathlib.Path(exp.pop("expanded_from")) == plain  # the run folder it was expanded from
    assert exp == EXPANSION
    run, base = load_run(expanded), load_run(plain)
    assert run.cfg.model.variant["name"] == "expand" and run.step == 0
    ids = jax.numpy.asarray([[1, 50, 7, 300, 2, 9, 11]], jax.numpy.int32)
    np.testing.assert_allclose(run.model(ids), base.model(ids), rtol=0, atol=1e-6)  # lerp: the identity at init
    p, b = _flat(run.model), _flat(base.model)
    assert _sig(p["blocks/1/interpolation_factor"]) == pytest.approx(_sig(0.5))
    assert all(np.array_equal(p[f"blocks/3/{w}/{k}"], b[f"blocks/3/{k}"])
               for w in ("pretrained", "expanded") for k in ("attn/q/kernel", "mlp_norm/scale"))


@pytest.fixture(scope="module")
def trained(corpus, expanded, tmp_path_factory):
    """Two steps from the `convert expand` output (its variant adopted), stopped after one and resumed, with an
    eval at step 2 (writes evaluation_results.json)."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(None, tiny_overrides(corpus, *SHAPE, f"model.init_from={expanded}", "train.steps=2",
                                           "checkpoint.every_steps=1", "train.eval_every=2", "train.eval_batches=1",
                                           f"data.validation=[{corpus['validation']}]"))
    assert cfg.model.variant is None  # nothing in the config: the run takes the checkpoint's expansion
    train(cfg, wd, show_progress=False, stop_after=1)
    first = _expansion(wd, 1)
    out = train(cfg, wd, show_progress=False)
    assert out["step"] == 2
    return wd, first


def test_expansion_metadata_survives_training_and_resume(plain, expanded, trained):
    wd, first = trained
    want = {**EXPANSION, "expanded_from": _expansion(expanded, 0)["expanded_from"]}
    assert first == want and _expansion(wd, 2) == want
    assert pathlib.Path(want["expanded_from"]) == plain
    run, src = load_run(wd), load_run(expanded)
    assert run.step == 2 and run.cfg.model.variant == src.cfg.model.variant
    p, q = _flat(run.model), _flat(src.model)
    for path in p:  # frozen weights bit-identical; copies and gates moved
        trains = path.startswith(("blocks/1/expanded/", "blocks/3/expanded/")) or path.endswith(
            "interpolation_factor")
        assert np.array_equal(p[path], q[path]) != trains, path
    rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    logged = [r for r in rows if "loss" in r][-1]
    for k in ("site1/div", "site1/cos", "site1/gate", "site3/div", "site3/cos", "site3/gate"):
        assert np.isfinite(logged[k]), k
    assert logged["site1/div"] > 0  # the copies moved: the mse divergence is on
    np.testing.assert_allclose(logged["aux_loss"], (logged["site1/div"] + logged["site3/div"]) / 2, rtol=1e-5)
    gates = json.loads((wd / "evaluation_results.json").read_text())
    assert gates["step"] == 2 and set(gates["eval_avg_interp_weights"]) == {"1", "3"}
    for j in ("1", "3"):  # lerp: the eval gate is sigma(f) of the evaluated weights
        assert gates["eval_avg_interp_weights"][j] == pytest.approx(_sig(p[f"blocks/{j}/interpolation_factor"]),
                                                                    abs=1e-6)


def test_eval_reads_the_structure_from_the_checkpoint_and_writes_the_gates(trained):
    import yaml
    wd, _ = trained
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["model"]["variant"] = {"name": "expand", "type": "stack", "num_layers": 4}  # a wrong, valid structure
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = json.loads((wd / "evaluation_results.json").read_text())["eval_avg_interp_weights"]
    _ok(["eval", "run", wd, "--task", "synth", "--limit", "2", "-n", "4", "--batch-size", "2", "--no-progress"])
    summary = json.loads((wd / "eval" / "synth" / "limit2-n4" / "summary.json").read_text())
    after = json.loads((wd / "evaluation_results.json").read_text())
    assert summary["eval_avg_interp_weights"] == after["eval_avg_interp_weights"]
    assert set(after["eval_avg_interp_weights"]) == {"1", "3"}
    for j in ("1", "3"):  # the same weights, the same constant gate
        assert after["eval_avg_interp_weights"][j] == pytest.approx(before[j], abs=1e-6)
    assert _expansion(wd, 2)["type"] == "concat"


def test_merge_back_and_export(trained, tmp_path):
    wd, _ = trained
    merged, hf, unmerged_hf = tmp_path / "merged", tmp_path / "hf", tmp_path / "hf-unmerged"
    _fails(["convert", "to-hf", wd, unmerged_hf], "unmerged concat", "merge-back", written=unmerged_hf)
    report = _ok(["convert", "merge-back", wd, merged])
    assert "merge-back vs unmerged" in report and "site weights from eval running-mean gate" in report
    rep = json.loads((merged / "merge_back.json").read_text())
    gates = json.loads((wd / "evaluation_results.json").read_text())["eval_avg_interp_weights"]
    assert rep["site_weights"] == pytest.approx(gates) and rep["merge"] == "lerp"
    assert rep["max_abs_logit_diff"] > 0 and rep["mean_token_kl"] >= 0 and rep["tokens"] > 0
    out, src = load_run(merged), load_run(wd)
    assert out.cfg.model.variant is None and out.cfg.model.n_layers == 4
    m, s = _flat(out.model), _flat(src.model)
    assert set(m) == set(_flat(Transformer(out.cfg.model, nnx.Rngs(0))))  # the base architecture
    for path, w in m.items():
        parts = path.split("/")
        if parts[0] == "blocks" and parts[1] in gates:
            a = gates[parts[1]]
            rest = "/".join(parts[2:])
            want = (1 - a) * s[f"blocks/{parts[1]}/pretrained/{rest}"] + a * s[f"blocks/{parts[1]}/expanded/{rest}"]
            np.testing.assert_allclose(w, want, rtol=0, atol=1e-6)
        else:
            assert np.array_equal(w, s[path]), path
    pytest.importorskip("transformers")
    assert "OK" in _ok(["convert", "to-hf", merged, hf, "--verify"])
    assert json.loads((hf / "config.json").read_text())["num_hidden_layers"] == 4


def test_expand_at_init_from_a_plain_run(corpus, plain, tmp_path):
    """`mathlm train` with an `expand:` section and model.init_from a plain run (hybrid, dlerp, gate frozen)."""
    wd = tmp_path / "run"
    _ok(["train", CONFIG, *tiny_overrides(corpus, *SHAPE, f"model.init_from={plain}", "train.steps=2",
                                          "expand.type=hybrid", "expand.num_layers=2", "expand.merge=dlerp",
                                          "expand.freeze_gate=true", "expand.div_loss=cosine"),
         "-w", wd, "--no-progress"])
    exp = _expansion(wd, 2)
    assert pathlib.Path(exp.pop("expanded_from")) == plain  # the run folder it was expanded from
    assert exp == {**EXPANSION, "type": "hybrid", "merge": "dlerp", "depth": 5, "sites": [3], "site_blocks": [4],
                   "inserted_after": [1], "inserted_blocks": [2], "gate_init": 0.0, "freeze_gate": True,
                   "div_loss": "cosine", "div_alpha": 1.0}
    run = load_run(wd)
    p, b = _flat(run.model), _flat(load_run(plain).model)
    fresh = models.init_params(run.cfg.model, 0)["blocks"][4]  # the gates the run started from (train.seed 0)
    source = {"0": "0", "1": "1", "3": "2"}  # hybrid N=4, k=2: blocks 0, 1, insert(1), 2, site(3)
    for path, w in p.items():
        parts = path.split("/")
        if parts[0] != "blocks":
            assert np.array_equal(w, b[path]), path
        elif parts[1] in source:
            assert np.array_equal(w, b["/".join(["blocks", source[parts[1]], *parts[2:]])]), path
        elif parts[1] == "2" and parts[-2] in ("o", "down"):  # the insertion's zeroed outputs moved
            assert np.any(w), path
        elif parts[1] == "4" and parts[2] == "pretrained":
            assert np.array_equal(w, b["/".join(["blocks", "3", *parts[3:]])]), path
    assert not np.array_equal(p["blocks/4/expanded/attn/q/kernel"], b["blocks/3/attn/q/kernel"])
    assert p["blocks/4/interp_b"][0] == 0.0  # freeze_gate: b stays at gate_init ...
    assert not np.array_equal(p["blocks/4/interp_w"], fresh["interp_w"])  # ... and w trains
    stored = ckpt._stored_keys(wd / "checkpoints", 2)  # the step's params item: trainable weights only
    assert stored and all(k.startswith(("blocks.2.", "blocks.4.expanded.", "blocks.4.interp_w")) for k in stored)


@pytest.fixture(scope="module")
def others(plain):
    """Runs of the other types for export and merge-back: stack (perturbed, so that its inserted blocks do
    something), hybrid lerp, concat moe."""
    runs = {}
    for name, flags in {"stack": ["--type", "stack"], "hybrid": ["--type", "hybrid"],
                        "moe": ["--type", "concat", "--merge", "moe"]}.items():
        runs[name] = plain.parent / name
        _ok(["convert", "expand", plain, runs[name], "--num-layers", "2", *flags])
    run = load_run(runs["stack"])
    params = jax.device_get(nnx.to_pure_dict(nnx.state(run.model, nnx.Param)))
    rng = np.random.default_rng(0)
    for j in (2, 5):  # the two insertions: give the zeroed projections weights
        for name in (("attn", "o"), ("mlp", "down")):
            k = params["blocks"][j][name[0]][name[1]]["kernel"]
            params["blocks"][j][name[0]][name[1]]["kernel"] = rng.normal(0, 0.05, k.shape).astype(np.float32)
    runs["stack"] = save_params_run(plain.parent / "stack-trained", run.cfg, params, runs["stack"] / "tokenizer.json")
    return runs


def test_stack_exports_as_plain_llama_and_verifies(others, tmp_path):
    pytest.importorskip("transformers")
    exp = _expansion(others["stack"], 0)
    assert (exp["inserted_after"], exp["inserted_blocks"], exp["depth"], exp["merge"]) == ([1, 3], [2, 5], 6, None)
    hf = tmp_path / "hf"
    out = _ok(["convert", "to-hf", others["stack"], hf, "--verify"])
    assert "OK" in out and "(limit 1e-04)" in out
    config = json.loads((hf / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["architectures"] == ["LlamaForCausalLM"]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,needles", [
    (["--num-layers", "3"], ["expand.num_layers=3 must divide the base model's 4 layers"]),
    (["--type", "hybrid", "--num-layers", "1"], ["expand.type=hybrid needs an even expand.num_layers, got 1"]),
    (["--type", "interleave"], ["expand.type must be one of concat, stack, hybrid", "'interleave'"]),
    (["--merge", "mix"], ["expand.merge must be one of", "'mix'"]),
    (["--div-loss", "kl"], ["expand.div_loss must be one of", "'kl'"]),
    (["--gate-init", "half"], ["--gate-init must be a number or null", "'half'"]),
    (["--merge", "dlerp", "--gate-init", "null"], ["gate_init=null", "dlerp"]),
    (["--norm-alpha", "2"], ["expand.norm_alpha must be in [0, 1] or -1, got 2"]),
])
def test_convert_expand_bad_flags(plain, tmp_path, flags, needles):
    _fails(["convert", "expand", plain, tmp_path / "out", "--num-layers", "2", *flags], *needles,
           written=tmp_path / "out")


def test_expanding_an_expanded_run_is_refused(expanded, tmp_path):
    _fails(["convert", "expand", expanded, tmp_path / "out", "--num-layers", "2"], "already expanded",
           written=tmp_path / "out")


def test_merge_back_and_to_hf_refuse_what_they_cannot_do(plain, others, tmp_path):
    for name, needle in [("stack", "concat expansions only, not stack"), ("hybrid", "concat expansions only, "
                                                                                    "not hybrid"),
                         ("moe", "merges lerp, slerp, dlerp, dlerpin, not moe")]:
        _fails(["convert", "merge-back", others[name], tmp_path / name], needle, written=tmp_path / name)
    _fails(["convert", "merge-back", plain, tmp_path / "plain"], "not an expanded model", written=tmp_path / "plain")
    for name in ("hybrid", "moe"):
        _fails(["convert", "to-hf", others[name], tmp_path / f"hf-{name}"], "unmerged", "merge-back",
               written=tmp_path / f"hf-{name}")


def test_train_bad_expand_settings(corpus, plain, expanded, tmp_path):
    wd = tmp_path / "run"
    base = ["train", CONFIG, *tiny_overrides(corpus, *SHAPE, "train.steps=1")]
    _fails([*base, f"model.init_from={plain}", "expand.num_layers=2", "expand.div_loss=attention",
            "model.attention=cudnn", "-w", wd],
           "expand.div_loss=attention", "fused attention", written=wd)
    _fails([*base, f"model.init_from={plain}", "expand.num_layers=3", "-w", wd], "must divide", written=wd)
    _fails([*base, f"model.init_from={plain}", "expand.num_layers=2", "expand.merge=mix", "-w", wd], "expand.merge",
           written=wd)
    _fails([*base, "expand.num_layers=2", "-w", wd], "model.init_from", written=wd)


DISAGREE = ("train.steps=1", "expand.type=concat", "expand.num_layers=2", "expand.merge=dlerp",
            "expand.gate_init=0.5", "expand.div_loss=mse", "expand.div_alpha=0.5")


def test_train_expand_section_disagreeing_with_init_from(corpus, expanded, tmp_path):
    wd = tmp_path / "run"
    result = runner.invoke(app, ["train", CONFIG, *tiny_overrides(corpus, *SHAPE, f"model.init_from={expanded}",
                                                                  *DISAGREE), "-w", str(wd)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code != 0 and "Traceback" not in result.output and len(errors) == 1, result.output
    assert f"model.init_from={expanded} was built with expand merge='lerp'" in errors[0] and "'dlerp'" in errors[0]
    assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())  # nothing trained


def test_train_expand_section_disagreeing_with_init_from_writes_nothing(corpus, expanded, tmp_path):
    _fails(["train", CONFIG, *tiny_overrides(corpus, *SHAPE, f"model.init_from={expanded}", *DISAGREE),
            "-w", tmp_path / "run"], "merge='lerp'", written=tmp_path / "run")


def test_training_settings_may_change_from_an_expanded_run(corpus, expanded, tmp_path):
    """The divergence and its weight are training settings: a run from `convert expand` output may change them
    (one expansion serves the alpha = 0 ablation); only the structure must agree."""
    wd = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(corpus, *SHAPE, f"model.init_from={expanded}", "train.steps=1",
                                           "expand.type=concat", "expand.num_layers=2", "expand.merge=lerp",
                                           "expand.div_loss=cosine", "expand.div_alpha=0"))
    train(cfg, wd, show_progress=False)
    logged = [json.loads(line) for line in open(wd / "metrics.jsonl") if '"loss"' in line][-1]
    assert logged["site1/div"] == 0 and logged["site3/div"] == 0  # alpha 0: nothing computed
    assert _expansion(wd, 1)["div_alpha"] == 0 and _expansion(wd, 1)["expanded_from"] == str(
        _expansion(expanded, 0)["expanded_from"])


def test_merge_back_ignores_gates_of_another_step(expanded, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(expanded, run)
    (run / "evaluation_results.json").write_text(json.dumps({"step": 7, "eval_avg_interp_weights": {"1": 0.9,
                                                                                                    "3": 0.9}}))
    _ok(["convert", "merge-back", run, tmp_path / "merged", "--data", str(_text_file(tmp_path))])
    rep = json.loads((tmp_path / "merged" / "merge_back.json").read_text())
    assert set(rep["site_weight_sources"].values()) == {"sigma(interpolation factor)"}
    assert rep["site_weights"]["1"] == pytest.approx(_sig(0.5), abs=1e-6)  # --gate-init 0.5, not the stale 0.9


def _text_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": f"Tom has {i} apples and buys {i + 2} more."}) + "\n"
                            for i in range(8)))
    return path


def test_expand_and_merge_back_refuse_a_non_empty_out_and_keep_the_dtype(corpus, plain, expanded, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    _fails(["convert", "expand", plain, busy, "--num-layers", "2"], "not empty")
    _fails(["convert", "merge-back", expanded, busy], "not empty")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    cfg = load_config(None, tiny_overrides(corpus, *SHAPE, "model.dtype=bfloat16"))
    bf16 = save_params_run(tmp_path / "bf16", cfg, models.init_params(cfg.model, 0), corpus["tokenizer"])
    _ok(["convert", "expand", bf16, tmp_path / "bf16-x", "--num-layers", "2"])
    _ok(["convert", "merge-back", tmp_path / "bf16-x", tmp_path / "bf16-m", "--data", str(_text_file(tmp_path))])
    for out in ("bf16-x", "bf16-m"):  # the output computes as its source did (merge-back compares in float32)
        assert load_config(tmp_path / out / "config.yaml").model.dtype == "bfloat16"
