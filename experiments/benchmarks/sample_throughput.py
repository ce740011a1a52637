"""Generation throughput: the KV cache (tapestry_jax.generate) against recomputing.

  python -m experiments.benchmarks.sample_throughput                       # small, B=4, 256 new
  python -m experiments.benchmarks.sample_throughput --preset=tiny --new_tokens=64

Both generate greedily from the same random-weight model and prompts, measured in this run:

  kv_cache  `generate.generate`: one prefill, then one `decode.step` per new token (a
            jitted while_loop over a static [layers, B, S, kv_heads, head_dim] cache).
  baseline  a jitted fori_loop that runs the full `model.forward` over the whole
            [B, prompt + new_tokens] buffer for every new token and takes the argmax at
            the last filled position (static shapes: one compile, no per-token dispatch).

Each is compiled and run once untimed, then timed over `--repeats` runs (the fastest
counts: the machine is shared). Prints tokens/s of both, the ratio, and the share of
greedy tokens on which the two agree (1.0 unless fp32 rounding splits a near tie).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tapestry_jax import generate as generate_lib
from tapestry_jax import model as model_lib

_PRESET = flags.DEFINE_string("preset", "small", "Model preset (tapestry_jax.model.PRESETS).")
_BATCH = flags.DEFINE_integer("batch", 4, "Prompts generated together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "New tokens per prompt.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype (default: float32 on CPU, else bfloat16).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs of each (after one untimed).")
_JSON = flags.DEFINE_string("json_out", "", "Also write the results here.")


def _recompute_loop(cfg: model_lib.ModelConfig, prompt_len: int, new_tokens: int):
  """Greedy generation without a cache: the full forward of the buffer per new token."""

  @jax.jit
  def run(params, buffer_BxS):
    B, S = buffer_BxS.shape
    positions_BxS = jnp.tile(jnp.arange(S, dtype=jnp.int32), (B, 1))
    segments_BxS = jnp.ones_like(buffer_BxS)  # Causal: unfilled slots are never seen.

    def body(i, buffer_BxS):
      at = prompt_len + i
      logits_BxSxV = model_lib.forward(params, buffer_BxS, positions_BxS, segments_BxS, cfg)
      logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxSxV, at - 1, axis=1, keepdims=False)
      tok_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice(buffer_BxS, tok_B[:, None], (0, at))

    return jax.lax.fori_loop(0, new_tokens, body, buffer_BxS)[:, prompt_len:]

  return run


def _best_of(fn, repeats: int) -> tuple[float, object]:
  out = jax.block_until_ready(fn())  # Compiles.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times), out


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = _DTYPE.value or ("float32" if device.platform == "cpu" else "bfloat16")
  cfg = model_lib.ModelConfig(**{**model_lib.PRESETS[_PRESET.value], "compute_dtype": dtype})
  B, P, N = _BATCH.value, _PROMPT.value, _NEW.value
  params = model_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts_BxP = rng.integers(3, min(cfg.vocab_size, 259), (B, P)).astype(np.int32)

  kv_s, kv_out = _best_of(lambda: generate_lib.generate(cfg, params, list(prompts_BxP),
                                                        max_new_tokens=N), _REPEATS.value)
  buffer_BxS = jnp.asarray(np.pad(prompts_BxP, ((0, 0), (0, N))))
  recompute = _recompute_loop(cfg, P, N)
  base_s, base_out = _best_of(lambda: recompute(params, buffer_BxS), _REPEATS.value)

  kv_BxN = np.stack(kv_out)
  result = {
      "device": device.device_kind, "preset": _PRESET.value, "compute_dtype": dtype, "batch": B,
      "prompt_len": P, "new_tokens": N, "load_average_1min": os.getloadavg()[0],
      "kv_cache_s": kv_s, "kv_cache_tokens_per_s": B * N / kv_s,
      "baseline_s": base_s, "baseline_tokens_per_s": B * N / base_s,
      "ratio_kv_cache_vs_baseline": base_s / kv_s,
      "greedy_tokens_agreeing": float(np.mean(kv_BxN == np.asarray(base_out))),
  }
  for k, v in result.items():
    print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
