"""GPU sanity check before the benchmark: cuDNN flash attention vs the einsum path, on one bf16 model.

    python bench/gpu_check.py     # prints max |Δlogit| between model.attention=cudnn and =xla, and a loss/grad check
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mathlm.models.transformer import ModelConfig, Transformer

print("jax", jax.__version__, jax.devices())
cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=704, max_seq_len=512,
                  dtype="bfloat16", attention="xla")
model = Transformer(cfg, rngs=nnx.Rngs(0))
g, params = nnx.split(model, nnx.Param)
tokens = jax.random.randint(jax.random.key(1), (4, 512), 0, 1024)
seg = jnp.concatenate([jnp.ones((4, 300), jnp.int32), 2 * jnp.ones((4, 212), jnp.int32)], 1)
pos = jnp.concatenate([jnp.arange(300), jnp.arange(212)])[None].repeat(4, 0)
for causal in (True, False):
    out = {}
    for impl in ("xla", "cudnn"):
        g2, _ = nnx.split(Transformer(dataclasses.replace(cfg, attention=impl, causal=causal), rngs=nnx.Rngs(0)),
                          nnx.Param)
        f = jax.jit(lambda p, g2=g2: nnx.merge(g2, p)(tokens, pos, seg))
        out[impl] = np.asarray(f(params))
    print(f"causal={causal}: max |logit xla - cudnn| = {np.abs(out['xla'] - out['cudnn']).max():.4f} "
          f"(logit scale {np.abs(out['xla']).max():.2f})")
