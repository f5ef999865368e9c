"""KV-cache decoding: equal to full recomputation, reproducible sampling, sharded == single device, CLI."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from typer.testing import CliRunner

from mathlm.models import sharding as shard_rules
from mathlm.models.generate import Generator, Sampling, greedy_reference, sample_logits
from mathlm.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
EOS = 2


def _prompts(seed=0, lengths=(5, 17, 1, 9, 30, 2, 12, 7)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in lengths]


def _keys(n, seed=0):
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n)))


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


def test_cached_extend_matches_full_forward_logits(model):
    """Prefill + token-by-token extension gives the full forward's logits at every position (tolerance 1e-4)."""
    tokens = jnp.asarray([_prompts(1, (24,))[0]], jnp.int32)
    full = np.asarray(model(tokens))
    cache = model.init_cache(1, 32)
    pos = jnp.arange(24)[None]
    ones = jnp.ones((1, 24), bool)
    first, cache = model.extend(tokens[:, :10], pos[:, :10], ones[:, :10], cache)
    steps = [first]
    for t in range(10, 24):
        lg, cache = model.extend(tokens[:, t:t + 1], pos[:, t:t + 1], ones[:, t:t + 1], cache)
        steps.append(lg)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "attention_bias": True, "n_kv_heads": 1}])
def test_greedy_with_cache_is_token_identical_to_recomputation(kw):
    """Ragged prompts in one left-padded batch vs each prompt decoded alone by full recomputation."""
    m = Transformer(ModelConfig(**{**CFG.__dict__, **kw}), nnx.Rngs(3))
    prompts = _prompts()
    out = Generator(m, eos_id=EOS)(prompts, Sampling(max_new_tokens=24))
    for p, got in zip(prompts, out.tokens):
        assert got == greedy_reference(m, p, 24, EOS)
    assert out.new_tokens == sum(min(len(t) + 1, 24) for t in out.tokens)


def test_decode_step_updates_the_cache_in_place(model):
    """The cache is stored in the layouts attention reads, keys (B, K, Dh, S) and values (B, K, S, Dh): the
    compiled decode loop neither copies nor transposes it (it used to, every step and layer) and updates the
    donated buffers in place."""
    g = Generator(model, eos_id=-1)
    seen, decode = [], g._decode
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    def spy(params, state, stop_at, sampling):
        seen.append((shapes(state), sampling))
        return decode(params, state, stop_at, sampling=sampling)

    g._decode = spy
    g(_prompts(), Sampling(max_new_tokens=8))
    state, sampling = seen[0]
    b, slots, kv, dh = 8, 32 + 8, CFG.n_kv_heads, CFG.head_dim  # prompts up to 30 tokens -> 32 slots, + 8 new
    for k, v in state["cache"]["layers"]:
        assert (k.shape, v.shape) == ((b, kv, dh, slots), (b, kv, slots, dh))
    leaves = jax.tree.leaves(state["cache"]["layers"])
    compiled = decode.lower(g.params, state, jnp.int32(8), sampling=sampling).compile()
    n = b * kv * slots * dh
    ops = re.findall(r"= f32\[([\d,]+)\]\S* (copy|transpose)\(", compiled.as_text())
    assert not [op for dims, op in ops if math.prod(map(int, dims.split(","))) == n]
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes >= sum(x.size * 4 for x in leaves)  # the donated cache is the output's buffer
    assert mem.temp_size_in_bytes < n * 4  # no room for even one copy of one layer's k or v


def test_eos_ends_a_row_and_is_not_returned(model):
    prompts = _prompts()
    first = Generator(model, eos_id=EOS)(prompts, Sampling(max_new_tokens=8)).tokens
    row = next(r for r in first if len(r) == 8 and len(set(r)) > 2)
    cut = next(i for i in range(1, 8) if row[i] not in row[:i])  # pretend this greedy token is EOS
    out = Generator(model, eos_id=row[cut])(prompts, Sampling(max_new_tokens=8))
    assert out.tokens[first.index(row)] == row[:cut] and out.finished[first.index(row)]


def test_sampling_with_fixed_keys_is_reproducible_and_batch_independent(model):
    prompts = _prompts()
    s = Sampling(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9)
    g = Generator(model, eos_id=EOS)
    a = g(prompts, s, _keys(8)).tokens
    assert g(prompts, s, _keys(8)).tokens == a
    assert g(prompts[:3], s, _keys(8)[:3], pad_batch_to=8).tokens == a[:3]  # other rows do not matter
    assert g(prompts, s, _keys(8, seed=1)).tokens != a


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    draw = lambda s: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, s))(keys))
    assert set(draw(Sampling(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(Sampling(temperature=1.0, top_p=0.75))) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draw(Sampling(temperature=1.0, top_p=0.5))) == {0}
    full = np.bincount(draw(Sampling(temperature=1.0)), minlength=4) / 2000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert int(sample_logits(logits, keys[0], Sampling(temperature=0.0))) == 0


def test_is_done_stops_rows_between_chunks(model):
    out = Generator(model, eos_id=-1, chunk=4)(_prompts(), Sampling(max_new_tokens=32),
                                               is_done=lambda r, toks: r % 2 == 0 and len(toks) >= 6)
    for r, toks in enumerate(out.tokens):
        assert len(toks) == (8 if r % 2 == 0 else 32)  # checked after each 4-token chunk
        assert out.finished[r] == (r % 2 == 0)


def test_stop_is_checked_after_the_last_chunk_too(model):
    """A budget smaller than the chunk still consults is_done (and reports the row as finished)."""
    out = Generator(model, eos_id=-1, chunk=4)(_prompts()[:2], Sampling(max_new_tokens=3),
                                               is_done=lambda r, toks: r == 0)
    assert out.finished == [True, False] and [len(t) for t in out.tokens] == [3, 3]


def test_sampling_arguments_are_checked(model):
    g = Generator(model, eos_id=EOS)
    big_k = g(_prompts()[:2], Sampling(max_new_tokens=4, temperature=1.0, top_k=10_000), _keys(2)).tokens
    assert big_k == g(_prompts()[:2], Sampling(max_new_tokens=4, temperature=1.0), _keys(2)).tokens  # k >= V: no cut
    with pytest.raises(ValueError, match="one raw PRNG key"):
        g(_prompts()[:3], Sampling(max_new_tokens=4, temperature=1.0), _keys(2))
    with pytest.raises(ValueError, match="top_p"):
        g(_prompts()[:1], Sampling(max_new_tokens=4, temperature=1.0, top_p=0.0), _keys(1))


def test_sharded_decoding_equals_single_device(model):
    assert jax.device_count() == 8
    prompts, s = _prompts(), Sampling(max_new_tokens=16, temperature=0.7)
    single = Generator(model, eos_id=EOS)
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    placed = jax.device_put(pure, shard_rules.param_shardings(pure, mesh, shard_rules.DEFAULT_RULES))
    nnx.replace_by_pure_dict(state, placed)
    sharded_model = nnx.merge(graphdef, state)
    sharded = Generator(sharded_model, eos_id=EOS,
                        batch_sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    assert sharded_model.blocks[0].mlp.up.kernel[...].sharding.spec != PartitionSpec()
    for sampling in (Sampling(max_new_tokens=16), s):
        assert sharded(prompts, sampling, _keys(8)).tokens == single(prompts, sampling, _keys(8)).tokens


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        Generator(model, eos_id=EOS)([[5] * 120], Sampling(max_new_tokens=16))


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def test_generate_cli_prints_completions(run_dir, tmp_path):
    from mathlm.cli.main import app
    from mathlm.data.tokenizer import Tokenizer
    from mathlm.train.runs import load_run
    r = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "Question: 2+3?\nAnswer:", "-n", "12"])
    assert r.exit_code == 0, r.output
    run = load_run(run_dir)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    ids = [tok.bos_id] + tok.encode("Question: 2+3?\nAnswer:")
    want = tok.decode(greedy_reference(run.model, ids, 12, tok.eos_id))
    assert r.stdout.rstrip("\n") == want.rstrip("\n")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"question": "What is 1+1?"}) + "\n" + json.dumps({"prompt": "7 *"}) + "\n")
    r = CliRunner().invoke(app, ["generate", str(run_dir), "--prompts", str(f), "-n", "5", "-t", "0.8"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Question: What is 1+1?\nAnswer:", "7 *"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "-t", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "-n", "500"], "exceeds the model's context"),
    ([], "give --prompt"),
    (["--prompt", "x", "--fsdp", "3"], "does not match the 8 available devices"),
])
def test_generate_cli_bad_input(run_dir, args, message):
    from mathlm.cli.main import app
    r = CliRunner().invoke(app, ["generate", str(run_dir), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_generate_cli_refuses_a_non_run(tmp_path):
    from mathlm.cli.main import app
    r = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "x"])
    assert r.exit_code == 2 and "not a mathlm run" in r.output
