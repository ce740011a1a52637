"""Cross-entropy over the vocabulary without the B x L x V logits tensor.

`logsumexp_and_target` is what a language-model loss needs from the output layer: each
token's log-partition (logsumexp of its logits) and its target's logit. It computes them
`chunk_len` positions of every row at a time (all rows together, so each chunk keeps the
batch's sharding), and its backward recomputes each chunk's logits instead of storing
them: at any moment one B x chunk_len x V block of float32 logits exists, not all L
positions' (32k vocabulary, 16 x 2048 tokens: 4 GiB of logits and as much again for their
gradient). The matmuls accumulate in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tapestry_jax import sharding


def _chunks(x_BxLx_: jax.Array, chunk_len: int) -> jax.Array:
  """[B, L, ...] -> [L / chunk_len, B, chunk_len, ...]."""
  B, L = x_BxLx_.shape[:2]
  x = x_BxLx_.reshape(B, L // chunk_len, chunk_len, *x_BxLx_.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x_NxBxCx_: jax.Array) -> jax.Array:
  N, B, C = x_NxBxCx_.shape[:3]
  return jnp.moveaxis(x_NxBxCx_, 0, 1).reshape(B, N * C, *x_NxBxCx_.shape[3:])


def _logits(x_BxCxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  logits_BxCxV = jnp.einsum("bcd,dv->bcv", x_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  return sharding.constrain(logits_BxCxV, ("batch", "length", "act_vocab"))


def _forward(x_BxLxD, w_DxV, targets_BxL, chunk_len):
  def one(_, chunk):
    x_BxCxD, t_BxC = chunk
    logits_BxCxV = _logits(x_BxCxD, w_DxV)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    return None, (lse_BxC, target_BxC)

  _, (lse, target) = jax.lax.scan(one, None, (_chunks(x_BxLxD, chunk_len),
                                              _chunks(targets_BxL, chunk_len)))
  return _unchunk(lse), _unchunk(target)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def logsumexp_and_target(x_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                         chunk_len: int) -> tuple[jax.Array, jax.Array]:
  """(logsumexp_BxL, target_logit_BxL) of the logits x_BxLxD @ w_DxV, in float32, over
  chunks of `chunk_len` positions (which must divide L)."""
  return _forward(x_BxLxD, w_DxV, targets_BxL, chunk_len)


def _fwd(x_BxLxD, w_DxV, targets_BxL, chunk_len):
  lse_BxL, target_BxL = _forward(x_BxLxD, w_DxV, targets_BxL, chunk_len)
  return (lse_BxL, target_BxL), (x_BxLxD, w_DxV, targets_BxL, lse_BxL)


def _bwd(chunk_len, res, cotangents):
  x_BxLxD, w_DxV, targets_BxL, lse_BxL = res
  g_lse_BxL, g_target_BxL = cotangents
  V = w_DxV.shape[1]

  def one(dw_DxV, chunk):
    x_BxCxD, t_BxC, lse_BxC, g_lse_BxC, g_t_BxC = chunk
    p_BxCxV = jnp.exp(_logits(x_BxCxD, w_DxV) - lse_BxC[..., None])
    dlogits_BxCxV = (p_BxCxV * g_lse_BxC[..., None] +
                     jax.nn.one_hot(t_BxC, V, dtype=jnp.float32) * g_t_BxC[..., None])
    dlogits_BxCxV = sharding.constrain(dlogits_BxCxV.astype(x_BxCxD.dtype),
                                       ("batch", "length", "act_vocab"))
    dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, w_DxV,
                          preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
    dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV,
                                 preferred_element_type=jnp.float32)
    return dw_DxV, dx_BxCxD

  chunks = tuple(_chunks(a, chunk_len) for a in (x_BxLxD, targets_BxL, lse_BxL, g_lse_BxL,
                                                  g_target_BxL))
  dw_DxV, dx = jax.lax.scan(one, jnp.zeros(w_DxV.shape, jnp.float32), chunks)
  return _unchunk(dx), dw_DxV.astype(w_DxV.dtype), None


logsumexp_and_target.defvjp(_fwd, _bwd)
