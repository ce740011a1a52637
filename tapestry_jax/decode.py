"""The model's forward pass over a key/value cache, for generation.

Data flow: left-padded prompts -> `prefill` -> (last logits, `Cache`) -> `step` per new
token -> logits. Every layer is `model.py`'s own (attention_inputs, attend,
attention_output_and_mlp, output_logits); this module only keeps keys and values.

The cache has a static shape [layers, B, S, kv_heads, head_dim], so one compiled step
serves every position. Prompts are left-padded: row b's tokens start at slot `start_B[b]`
and every row writes its next token to the same slot, `length`, so writes are one
dynamic-update-slice; RoPE positions are per row (slot - start).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tapestry_jax import attention
from tapestry_jax import model as model_lib

Params = model_lib.Params


class Cache(NamedTuple):
  """Keys and values of every filled slot, rotated to their positions."""
  k_NxBxSxKxDh: jax.Array
  v_NxBxSxKxDh: jax.Array
  start_B: jax.Array  # int32: first slot holding a real token (slots before it are padding)
  length: jax.Array  # int32 scalar: slots filled so far, the same for every row


def init_cache(cfg: model_lib.ModelConfig, start_B: jax.Array, max_len: int) -> Cache:
  """An empty cache of `max_len` slots per row in the compute dtype."""
  shape = (cfg.n_layers, start_B.shape[0], max_len, cfg.n_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.compute_dtype)
  return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), start_B.astype(jnp.int32),
               jnp.zeros((), jnp.int32))


def _cache_mask(cache: Cache, T: int) -> jax.Array:
  """Query slot q sees key slot j iff j <= q and both are real tokens or both padding,
  `attention.mask`'s rule with padding as segment 0 (no row is empty)."""
  S = cache.k_NxBxSxKxDh.shape[2]
  q_T = cache.length + jnp.arange(T)
  real_BxT = q_T[None, :] >= cache.start_B[:, None]
  real_BxS = jnp.arange(S)[None, :] >= cache.start_B[:, None]
  causal_TxS = jnp.arange(S)[None, :] <= q_T[:, None]
  same_BxTxS = real_BxT[:, :, None] == real_BxS[:, None, :]
  return (same_BxTxS & causal_TxS)[:, None]  # B x 1 x T x S


def _extend_hidden(params: Params, cache: Cache, tokens_BxT: jax.Array,
                   cfg: model_lib.ModelConfig) -> tuple[jax.Array, Cache]:
  """Runs T new tokens through every layer at slots [length, length + T); returns the
  last layer's output x_BxTxD and the cache holding their keys and values."""
  T = tokens_BxT.shape[1]
  positions_BxT = jnp.maximum(cache.length + jnp.arange(T)[None, :] - cache.start_B[:, None], 0)
  mask_Bx1xTxS = _cache_mask(cache, T)
  x_BxTxD = model_lib.embed(params, tokens_BxT, cfg)

  def body(carry, layer_and_index):
    x_BxTxD, k_NxBxSxKxDh, v_NxBxSxKxDh = carry
    layer, i = layer_and_index
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = model_lib.attention_inputs(cfg, x_BxTxD, layer,
                                                                    positions_BxT)
    at = (i, 0, cache.length, 0, 0)
    k_NxBxSxKxDh = jax.lax.dynamic_update_slice(k_NxBxSxKxDh, k_BxTxKxDh[None], at)
    v_NxBxSxKxDh = jax.lax.dynamic_update_slice(v_NxBxSxKxDh, v_BxTxKxDh[None], at)
    o_BxTxHxDh = attention.masked(q_BxTxHxDh, k_NxBxSxKxDh[i], v_NxBxSxKxDh[i], mask_Bx1xTxS)
    x_BxTxD = model_lib.attention_output_and_mlp(cfg, x_BxTxD, layer, o_BxTxHxDh)
    return (x_BxTxD, k_NxBxSxKxDh, v_NxBxSxKxDh), None

  carry = (x_BxTxD, cache.k_NxBxSxKxDh, cache.v_NxBxSxKxDh)
  if cfg.scan_layers:
    carry, _ = jax.lax.scan(body, carry, (params["layers"], jnp.arange(cfg.n_layers)))
  else:
    for i in range(cfg.n_layers):
      carry, _ = body(carry, (jax.tree.map(lambda p: p[i], params["layers"]), i))
  x_BxTxD, k_NxBxSxKxDh, v_NxBxSxKxDh = carry
  return x_BxTxD, cache._replace(k_NxBxSxKxDh=k_NxBxSxKxDh, v_NxBxSxKxDh=v_NxBxSxKxDh,
                                 length=cache.length + T)


def extend(params: Params, cache: Cache, tokens_BxT: jax.Array,
           cfg: model_lib.ModelConfig) -> tuple[jax.Array, Cache]:
  """Appends T tokens per row to the cache; returns their fp32 logits_BxTxV (the same
  as `model.forward` over each row's whole sequence) and the grown cache."""
  x_BxTxD, cache = _extend_hidden(params, cache, tokens_BxT, cfg)
  return model_lib.output_logits(params, x_BxTxD, cfg), cache


def prefill(params: Params, tokens_BxP: jax.Array, start_B: jax.Array, max_len: int,
            cfg: model_lib.ModelConfig) -> tuple[jax.Array, Cache]:
  """Left-padded prompts (row b's tokens in slots [start_B[b], P)) -> the logits_BxV of
  each prompt's last token and a cache of `max_len` slots holding the prompts."""
  x_BxPxD, cache = _extend_hidden(params, init_cache(cfg, start_B, max_len), tokens_BxP, cfg)
  return model_lib.output_logits(params, x_BxPxD[:, -1:], cfg)[:, 0], cache


def step(params: Params, cache: Cache, tokens_B: jax.Array,
         cfg: model_lib.ModelConfig) -> tuple[jax.Array, Cache]:
  """One new token per row -> its logits_BxV and the cache with it appended."""
  logits_Bx1xV, cache = extend(params, cache, tokens_B[:, None], cfg)
  return logits_Bx1xV[:, 0], cache
