"""The frozen-parameter seam: no gradients for frozen weights, frozen sets as sharded step arguments, frozen
weights recorded by source (not rewritten) and restored bit-exactly on resume."""
import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_overrides

from mathlm.train import checkpoint as ckpt
from mathlm.train.config import load_config
from mathlm.train.loop import final_params, train
from mathlm.train.objectives import REGISTRY, ObjectiveSpec, register
from mathlm.train.objectives.causal import masked_lm
from mathlm.train.state import FrozenSourceError, combine, leaf_paths
from mathlm.train.trainer import build, compile_step, to_global

SMALL = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
         "model.d_ff=128", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8", "train.steps=10"]
THREE_OF_FOUR_FROZEN = r"train.trainable=[blocks/3/, final_norm, lm_head]"


def _toy_reference(model, batch, rng, frozen):
    """Next-token loss plus the mean of the reference set's embedding: reads `frozen["reference"]`."""
    loss_sum, metrics = masked_lm(model, batch)
    pull = jnp.mean(frozen["reference"]["embed"]["embedding"])
    return loss_sum + metrics["denom"] * pull, metrics


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    name: str = "toy_reference"


if "toy_reference" not in REGISTRY:
    register(ObjectiveSpec("toy_reference", ToyConfig, lambda section: _toy_reference, model_kind="arm",
                           frozen_sets=("reference",)))


def _batch(cfg, seed=0):
    b, length = cfg.train.batch_size, cfg.train.seq_len
    ids = np.asarray(jax.random.randint(jax.random.key(seed), (b, length + 1), 0, cfg.model.vocab_size), np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (b, 1))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": positions,
            "segment_ids": np.ones((b, length), np.int32), "loss_mask": np.ones((b, length), np.float32),
            "prompt_mask": np.zeros((b, length), np.int32)}


def _flops(setup) -> float:
    cost = compile_step(setup).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_frozen_blocks_cost_fewer_flops_and_leave_grad_norm(tmp_path):
    full = build(load_config(None, SMALL + ["mesh.data=8"]))
    part = build(load_config(None, SMALL + ["mesh.data=8", THREE_OF_FOUR_FROZEN]))
    f_full, f_part = _flops(full), _flops(part)
    assert f_part < 0.75 * f_full, (f_part, f_full)  # no weight gradients and no backward below block 3

    trainable, frozen, opt = part.init_fn(0)
    assert all(p.startswith(("blocks/3/", "final_norm", "lm_head")) for p in leaf_paths(trainable))
    assert all(len(x.shape) == 0 or any(x.shape == t.shape for t in jax.tree.leaves(trainable))
               for x in jax.tree.leaves(opt["state"]))  # Adam moments only for trainable weights
    batch = to_global(part, _batch(part.cfg))
    params = combine(trainable, frozen["model"])
    # By hand: the gradient of the whole model's summed loss, at the step's own key, restricted to trainable.
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(opt["rng"]), 0), 0)
    from flax import nnx
    objective = part.spec.make_loss(part.cfg.train.objective)
    grad = jax.grad(lambda p: objective(nnx.merge(part.graphdef, p), batch, rng, {})[0] / float(
        np.sum(np.asarray(batch["loss_mask"]))))(params)
    trainable_grads = [g for path, g in zip(leaf_paths(grad), jax.tree.leaves(grad))
                       if path.startswith(("blocks/3/", "final_norm", "lm_head"))]
    by_hand = float(jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in trainable_grads)))
    everything = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad))))
    _, _, metrics = part.step_fn(trainable, frozen, opt, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), by_hand, rtol=1e-5)
    assert everything > by_hand * 1.01  # the frozen weights' gradients would have counted


def test_a_frozen_set_arrives_sharded_and_is_an_argument_not_a_constant():
    setup = build(load_config(None, SMALL + ["mesh.data=1", "mesh.fsdp=8", "train.objective=toy_reference"]))
    trainable, frozen, opt = setup.init_fn(0)
    emb = frozen["sets"]["reference"]["embed"]["embedding"]
    assert emb.sharding == setup.frozen_sh["sets"]["reference"]["embed"]["embedding"]
    assert emb.sharding.mesh == setup.mesh and emb.sharding.spec[1] == "fsdp"  # split over 8 devices
    assert len(emb.sharding.shard_shape(emb.shape)) == 2 and emb.sharding.shard_shape(emb.shape)[1] == 64 // 8
    # ... and the compiled step takes it as an argument with that sharding (inside the step, not a constant).
    args_sh = compile_step(setup).input_shardings[0]
    inside = args_sh[1]["sets"]["reference"]["embed"]["embedding"]
    assert inside.is_equivalent_to(emb.sharding, 2)
    batch = to_global(setup, _batch(setup.cfg))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates trainable and opt
    _, _, m1 = setup.step_fn(copy(trainable), frozen, copy(opt), batch)
    moved = {**frozen, "sets": {"reference": jax.tree.map(lambda x: x + 1.0, frozen["sets"]["reference"])}}
    _, _, m2 = setup.step_fn(copy(trainable), moved, copy(opt), batch)
    np.testing.assert_allclose(float(m2["loss"]) - float(m1["loss"]), 1.0, rtol=1e-4)  # mean(emb + 1) = mean + 1
    assert setup.step_fn._cache_size() == 1  # one compilation for both values


def test_resume_with_frozen_weights_from_init_from_is_bit_exact_and_does_not_rewrite_them(corpus, tmp_path):
    base = ("mesh.data=8", "checkpoint.every_steps=2")
    pre = load_config(None, tiny_overrides(corpus, "train.steps=2", *base))
    train(pre, tmp_path / "pre", show_progress=False)
    fine = tiny_overrides(corpus, "train.steps=6", *base, f"model.init_from={tmp_path / 'pre'}",
                          r"train.trainable=[blocks/1/]", "train.objective=toy_reference")
    cfg = load_config(None, fine)
    train(cfg, tmp_path / "straight", show_progress=False)
    train(cfg, tmp_path / "split", show_progress=False, stop_after=3)
    train(cfg, tmp_path / "split", show_progress=False)
    a, b = final_params(tmp_path / "straight", cfg), final_params(tmp_path / "split", cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # Only block 1 is in the checkpoints; the frozen weights and the reference set are recorded by source.
    directory = tmp_path / "split" / "checkpoints"
    stored = ckpt._stored_keys(directory, 6)
    assert stored and all(k.startswith("blocks.1.") for k in stored)
    meta = ckpt.read_meta(directory, 6)
    assert pathlib.Path(meta["frozen"]["model"]["source"]) == tmp_path / "pre" / "checkpoints"
    assert meta["frozen"]["sets"]["reference"]["sha256"] == meta["frozen"]["model"]["sha256"]
    assert not (tmp_path / "split" / "frozen").exists()
    pre_params = final_params(tmp_path / "pre", pre)
    for path, x, y in zip(leaf_paths(a), jax.tree.leaves(a), jax.tree.leaves(pre_params)):
        assert np.array_equal(np.asarray(x), np.asarray(y)) == (not path.startswith("blocks/1/")), path

    # The source gone, or changed: a clear error on resume, before anything is trained.
    more = load_config(None, [*fine, "train.steps=8"])
    shutil.move(tmp_path / "pre", tmp_path / "pre-moved")
    with pytest.raises(FrozenSourceError, match="is gone"):
        train(more, tmp_path / "split", show_progress=False)
    shutil.move(tmp_path / "pre-moved", tmp_path / "pre")
    victim = max((p for p in (tmp_path / "pre" / "checkpoints" / "2" / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    with pytest.raises(FrozenSourceError, match="changed"):
        train(more, tmp_path / "split", show_progress=False)


def test_frozen_weights_of_a_fresh_init_are_saved_once(corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(corpus, "train.steps=4", "mesh.data=8", "checkpoint.every_steps=1",
                                           r"train.trainable=[mlp/]"))
    train(cfg, tmp_path / "run", show_progress=False, stop_after=2)
    frozen_dir = tmp_path / "run" / "frozen" / "model"  # written at step 0, read on resume
    written = {p: p.stat().st_mtime_ns for p in frozen_dir.rglob("*") if p.is_file()}
    train(cfg, tmp_path / "run", show_progress=False)
    assert written and {p: p.stat().st_mtime_ns for p in frozen_dir.rglob("*") if p.is_file()} == written
    assert all("mlp" in k for k in ckpt._stored_keys(tmp_path / "run" / "checkpoints", 4))
    params = final_params(tmp_path / "run", cfg)  # whole model: mlp from the checkpoint, the rest from frozen/
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(build(cfg).abstract_params))


def test_run_loading_builds_the_network_the_checkpoint_records(tiny_run, tmp_path):
    """generate/eval/convert read the model section stored with the checkpoint, not today's config.yaml."""
    import yaml

    from mathlm.train.runs import load_run
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    want = cfg["model"]["d_model"]
    cfg["model"]["d_model"], cfg["model"]["d_ff"] = 2 * want, 7
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_run(run)
    assert loaded.cfg.model.d_model == want and loaded.model.cfg.d_model == want


def test_a_checkpoint_from_before_the_split_resumes(corpus, tmp_path):
    """Older checkpoints: every weight in `params`, optax.multi_transform's optimizer keys, no `meta` item."""
    import orbax.checkpoint as ocp

    from mathlm.data.pipeline import make_source, train_dataset
    cfg = load_config(None, tiny_overrides(corpus, "train.steps=3", "mesh.data=8", r"train.trainable=[mlp/]"))
    setup = build(cfg)
    trainable, frozen, opt = setup.init_fn(0)
    legacy_opt = {(ckpt.LEGACY_OPT_PREFIX + k[len("state."):] if k.startswith("state.") else k): v
                  for k, v in ckpt.flatten(opt).items()}
    src = make_source(str(corpus["train"]), "lm", cfg.train.seq_len, 0)
    it = iter(train_dataset(src, global_batch=8, process_index=0, process_count=1, seed=0))
    with ocp.CheckpointManager(tmp_path / "old" / "checkpoints", item_handlers={
            "params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()}) as mgr:
        mgr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(ckpt.flatten(combine(trainable,
                                                                                            frozen["model"]))),
                                            opt=ocp.args.StandardSave(legacy_opt),
                                            data=ocp.args.JsonSave(it.get_state())), force=True)
    out = train(cfg, tmp_path / "old", show_progress=False)
    assert out["step"] == 3 and np.isfinite(out["loss"])
    assert (tmp_path / "old" / "frozen" / "model").is_dir()  # the frozen weights now live beside the run
    params = final_params(tmp_path / "old", cfg)
    before = combine(trainable, frozen["model"])
    for path, x, y in zip(leaf_paths(params), jax.tree.leaves(params), jax.tree.leaves(before)):
        assert np.array_equal(np.asarray(x), np.asarray(y)) == ("mlp/" not in path), path
