"""Shared by the Control-LLM unit tests (tests/test_control_llm_*.py): the tiny base configuration, the merges
and their gate weights, the `base_params` fixture, and helpers that expand, build, perturb and feed tiny models.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mathlm import models
from mathlm.models import variants
from mathlm.models.transformer import ModelConfig
from mathlm.train.state import combine, partition

BASE = ModelConfig(vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
MERGES = ("lerp", "slerp", "dlerp", "dlerpin", "moe", "proj", "prog")
# Per merge: the gate weights that always train, and those that train unless freeze_gate.
GATES = {"lerp": ((), ("interpolation_factor",)), "slerp": ((), ("interpolation_factor",)),
         "dlerp": (("interp_w",), ("interp_b",)), "dlerpin": (("interp_w",), ("interp_b",)),
         "moe": (("router",), ("router_bias",)), "proj": (("proj",), ("interpolation_factor",)),
         "prog": (("proj",), ("interpolation_factor",))}


def _cfg(base: ModelConfig = BASE, **opts) -> ModelConfig:
    return dataclasses.replace(base, variant={"name": "expand", **opts})


@pytest.fixture(scope="module", name="base_params")  # test modules import it as base_params_fixture
def base_params_fixture():
    return models.init_params(BASE, 0)


def _expanded_params(base_params, cfg: ModelConfig) -> dict:
    return variants.from_base(cfg, BASE, base_params, models.init_params(cfg, 1))


_ABSTRACT: dict[str, tuple] = {}


def _abstract(cfg: ModelConfig):
    """models.abstract, once per configuration (the trace is the slow part of these tiny tests)."""
    if repr(cfg) not in _ABSTRACT:
        _ABSTRACT[repr(cfg)] = models.abstract(cfg)
    return _ABSTRACT[repr(cfg)]


def _model(cfg: ModelConfig, params: dict):
    return nnx.merge(_abstract(cfg)[0], params)


def _perturbed(params: dict, cfg: ModelConfig, scale: float = 0.05, seed: int = 7) -> dict:
    """Brief training, simulated: noise on every trainable weight (copies, insertions, gates, P), so the branches
    differ."""
    is_trainable = variants.trainable_filter(cfg)
    trainable, frozen = partition(params, is_trainable)
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) * (1.0 if x.ndim >= 2 else 4.0) for x, k in zip(leaves, keys)]
    return combine(jax.tree.unflatten(tree, noisy), frozen)


def _tokens(b=2, t=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, BASE.vocab_size, (b, t)), jnp.int32)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
