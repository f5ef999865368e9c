"""LoRA adapters (models/lora.py, the `lora` model variant): forward formula, exact base at init and when disabled,
merge, initialisation, trainable leaves, and a short training run from a plain checkpoint."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_overrides
from flax import nnx

from mathlm import models
from mathlm.models import lora, variants
from mathlm.models.transformer import ModelConfig
from mathlm.train.config import ConfigError, load_config
from mathlm.train.loop import final_params, train
from mathlm.train.runs import load_run

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
TOKENS = (jnp.arange(24)[None] * 7) % 64


def _lora(base_params, **options):
    cfg = dataclasses.replace(BASE, variant={"name": "lora", **options})
    params = variants.from_base(cfg, BASE, base_params, models.init_params(cfg, 1))
    return cfg, params


def _with_b(params, seed=3):
    """Nonzero B everywhere (a trained adapter)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    def walk(t):
        if not isinstance(t, dict):
            return t
        return {k: 0.05 * jax.random.normal(next(keys), v.shape) if k == "lora_b" else walk(v) for k, v in t.items()}
    return walk(params)


@pytest.fixture(scope="module")
def base_params():
    return models.init_params(BASE, 0)


def test_fresh_adapter_is_the_base_and_keeps_its_paths(base_params):
    cfg, params = _lora(base_params)
    q = params["blocks"][0]["attn"]["q"]
    assert sorted(q) == ["kernel", "lora_a", "lora_b"] and q["lora_a"].shape == (32, 8) and q["lora_b"].shape == (8, 32)
    assert sorted(params["blocks"][0]["mlp"]["down"]) == ["kernel", "lora_a", "lora_b"]
    np.testing.assert_array_equal(q["kernel"], base_params["blocks"][0]["attn"]["q"]["kernel"])
    model, base = nnx.merge(models.abstract(cfg)[0], params), nnx.merge(models.abstract(BASE)[0], base_params)
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_xw_plus_scaled_xab(base_params, rslora):
    cfg, params = _lora(base_params, r=4, alpha=12.0, rslora=rslora)
    params = _with_b(params)
    layer = nnx.merge(models.abstract(cfg)[0], params).blocks[0].mlp.up
    x = jax.random.normal(jax.random.key(5), (2, 3, 32))
    p = params["blocks"][0]["mlp"]["up"]
    s = 12.0 / (2.0 if rslora else 4.0)
    want = np.asarray(x) @ np.asarray(p["kernel"]) + s * (np.asarray(x) @ np.asarray(p["lora_a"])) @ np.asarray(
        p["lora_b"])
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 32), (3, 2, 4, 32)])  # (B, T, d) and preference rows (B, 2, T, d)
def test_lora_delta_gradients_are_autodiffs(shape):
    """The hand-written backward of s (x A) B gives autodiff's gradients for x, A and B."""
    kx, ka, kb, kg = jax.random.split(jax.random.key(11), 4)
    x, a, b = jax.random.normal(kx, shape), jax.random.normal(ka, (32, 4)), jax.random.normal(kb, (4, 24))
    g = jax.random.normal(kg, (*shape[:-1], 24))
    plain = lambda x, a, b: 2.5 * ((x @ a) @ b)  # noqa: E731
    want = jax.vjp(plain, x, a, b)[1](g)
    got = jax.vjp(lambda x, a, b: lora.lora_delta(x, a, b, 2.5), x, a, b)[1](g)
    for w, h in zip(want, got):
        assert w.shape == h.shape
        np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_model_gradients_match_autodiff_of_the_formula(base_params, monkeypatch):
    """A whole LoRA model's adapter and input gradients with the custom backward equal autodiff's."""
    cfg, params = _lora(base_params, r=4)
    params = _with_b(params)
    graphdef = models.abstract(cfg)[0]

    def loss(p):
        logits = nnx.merge(graphdef, p)(TOKENS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(logits.shape[1]))

    got = jax.grad(loss)(params)
    monkeypatch.setattr(lora, "lora_delta", lambda x, a, b, s: s * ((x @ a) @ b))
    want = jax.grad(loss)(params)
    flat_got, flat_want = nnx.traversals.flatten_mapping(got), nnx.traversals.flatten_mapping(want)
    assert flat_got.keys() == flat_want.keys()
    assert sum(path[-1] in ("lora_a", "lora_b") for path in flat_want) == 2 * 7 * BASE.n_layers
    for path, w in flat_want.items():  # adapters, base kernels, norms and the embedding (layer 0's dx)
        np.testing.assert_allclose(flat_got[path], w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()) + 1e-12)


def test_disabled_adapter_is_exactly_the_base(base_params):
    cfg, params = _lora(base_params, enabled=False)
    model = nnx.merge(models.abstract(cfg)[0], _with_b(params))
    np.testing.assert_array_equal(model(TOKENS), nnx.merge(models.abstract(BASE)[0], base_params)(TOKENS))


def test_merge_gives_a_plain_model_with_the_same_function(base_params):
    cfg, params = _lora(base_params, r=4, alpha=8.0)
    params = _with_b(params)
    opts = lora.LoraOptions.parse({"r": 4, "alpha": 8.0})
    merged = lora.merge_params(params, opts)
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    p = params["blocks"][1]["attn"]["v"]
    np.testing.assert_allclose(merged["blocks"][1]["attn"]["v"]["kernel"],
                               np.asarray(p["kernel"]) + 2.0 * np.asarray(p["lora_a"]) @ np.asarray(p["lora_b"]),
                               rtol=1e-6, atol=1e-6)
    lora_model = nnx.merge(models.abstract(cfg)[0], params)
    plain = nnx.merge(models.abstract(BASE)[0], merged)
    np.testing.assert_allclose(plain(TOKENS), lora_model(TOKENS), rtol=1e-4, atol=1e-4)
    assert jax.tree.structure(lora.base_params(params)) == jax.tree.structure(base_params)


def test_initialisation(base_params):
    _, params = _lora(base_params, r=8)
    a = np.asarray(params["blocks"][0]["mlp"]["down"]["lora_a"])  # d_in = d_ff = 64
    assert np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.9 / 8  # U(-1/sqrt(64), 1/sqrt(64))
    _, params = _lora(base_params, r=8, init="gaussian")
    a = np.concatenate([np.asarray(b[m][n]["lora_a"]).ravel() for b in params["blocks"].values()
                        for m, n in (("attn", "q"), ("attn", "k"), ("mlp", "gate"), ("mlp", "up"))])
    assert abs(a.std() - 1 / 8) < 0.01  # N(0, 1/r^2)


def test_only_adapters_train(base_params):
    cfg, params = _lora(base_params, targets=["q", "v"])
    is_trainable = models.trainable_filter(cfg)
    paths = [p for p, _ in _paths(params)]
    trains = [p for p in paths if is_trainable(p)]
    assert trains and all(p.endswith(("/q/lora_a", "/q/lora_b", "/v/lora_a", "/v/lora_b")) for p in trains)
    assert not any("lora" in p for p in paths if "/k/" in p or "/o/" in p)


def _paths(tree, prefix=""):
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        yield from (_paths(v, path) if isinstance(v, dict) else [(path, v)])


@pytest.mark.parametrize("options,needle", [({"r": 0}, "r must be"), ({"init": "zeros"}, "init must be"),
                                            ({"targets": ["qkv"]}, "targets"), ({"dropout": 0.1}, "dropout"),
                                            ({"rank": 4}, "unknown key")])
def test_bad_options(tiny_run, options, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [f"model.init_from={tiny_run}", f"model.variant={{name: lora, {_yaml(options)}}}"])


def _yaml(options):
    return ", ".join(f"{k}: {v}" for k, v in options.items()).replace("'", "")


@pytest.fixture(scope="module")
def lora_run(corpus, tiny_run, tmp_path_factory):
    wd = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config(None, tiny_overrides(corpus, "model.max_seq_len=256", f"model.init_from={tiny_run}",
                                           "model.variant={name: lora, r: 4, alpha: 8}", "train.steps=2"))
    train(cfg, wd, show_progress=False)
    return wd, cfg


def test_training_from_a_plain_run_moves_only_the_adapters(tiny_run, lora_run):
    wd, cfg = lora_run
    params, base = final_params(wd, cfg), jax.device_get(
        nnx.to_pure_dict(nnx.state(load_run(tiny_run).model, nnx.Param)))
    trained = dict(_paths(jax.device_get(params)))
    for path, w in _paths(base):
        np.testing.assert_array_equal(trained[path], w, err_msg=path)  # the base is frozen
    moved = [p for p, w in trained.items() if p.endswith("lora_b") and np.abs(w).max() > 0]
    assert len(moved) == 2 * 7  # every adapter's B left zero


def test_merged_export_verifies_and_peft_export_holds_the_delta(tiny_run, lora_run, tmp_path):
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from mathlm.cli.main import app
    wd, _ = lora_run
    runner = CliRunner()
    outputs = []
    for args in (["convert", "to-hf", str(wd), str(tmp_path / "merged"), "--verify"],
                 ["convert", "to-hf", str(tiny_run), str(tmp_path / "base")],
                 ["convert", "to-hf", str(wd), str(tmp_path / "peft"), "--peft"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "OK" in outputs[0]  # the merged model against transformers, 1e-4
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False and "down_proj" in cfg["target_modules"]
    adapter = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    merged, base = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(
        str(tmp_path / "base" / "model.safetensors"))
    for i in range(2):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            a = adapter[f"base_model.model.model.layers.{i}.{name}.lora_A.weight"]
            b = adapter[f"base_model.model.model.layers.{i}.{name}.lora_B.weight"]
            w = base[f"model.layers.{i}.{name}.weight"]
            assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
            np.testing.assert_allclose(merged[f"model.layers.{i}.{name}.weight"], w + 2.0 * b @ a, atol=1e-6)


def test_peft_export_of_a_plain_run_is_refused(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from mathlm.cli.main import app
    result = CliRunner().invoke(app, ["convert", "to-hf", str(tiny_run), str(tmp_path / "out"), "--peft"])
    assert result.exit_code != 0 and "--peft exports LoRA adapters" in result.stderr
    assert not (tmp_path / "out").exists()
