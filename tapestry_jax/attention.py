"""Attention kernels, and which one each platform uses.

Training attention is causal within packed documents: `segment_ids_BxL` numbers the
documents of a row as contiguous runs (1, 2, ... and 0 for padding, as the data pipeline
packs them), and position i sees j iff j <= i and both are in the same run.
`ModelConfig.attention` picks the implementation:

  reference  `grouped_attention`: plain XLA laid out for the CPU, with a flash-style
             backward (keeps the row logsumexp, recomputes the probabilities).
  xla        `jax.nn.dot_product_attention`'s XLA path, with the B x 1 x L x L mask.
  cudnn      cuDNN flash attention with the documents as its packed (ragged) layout:
             per-row segment offsets and lengths, causal within each; no L x L mask is
             ever built. Needs at most `ModelConfig.max_segments` documents per row.
  splash     Pallas splash attention (TPU) with segment ids, block-sparse over the
             causal mask; runs in interpret mode off TPU (the parity tests).
  auto       reference on CPU, cudnn on Hopper or newer GPUs (xla on older ones: cuDNN's
             packed layout needs compute capability 9.0), splash on TPU.

`prepare` turns segment ids into what the chosen kernel needs once per forward pass
(outside the scan over layers); `attend` runs one layer's attention. Decoding against a
KV cache (T queries over S keys) uses `masked`, the general masked form.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tapestry_jax import sharding

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "splash")
_AUTO = {"cpu": "reference", "gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
SPLASH_BLOCK = 512  # Splash tile (queries and keys); a row's length is cut to a multiple.


def resolve(name: str, backend: str | None = None) -> str:
  """The implementation `name` means on `backend` (default: JAX's default backend)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model: attention must be one of {'|'.join(IMPLEMENTATIONS)}, got {name!r}")
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  impl = _AUTO.get(backend, "xla")
  if impl == "cudnn" and not _hopper_or_newer(backend):
    return "xla"
  return impl


def _hopper_or_newer(backend: str) -> bool:
  capability = getattr(jax.devices(backend)[0], "compute_capability", "0")
  return tuple(int(x) for x in str(capability).split(".")) >= (9, 0)


def mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Causal and within-document: position i sees j iff j <= i and same segment.

  Padding (segment 0) attends to earlier padding only, so no row is empty."""
  L = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((L, L), jnp.bool_))
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (same_BxLxL & causal_LxL)[:, None, :, :]  # B x 1 x L x L (broadcast over heads)


def _bias(mask_Bx1xTxS: jax.Array) -> jax.Array:
  return jnp.where(mask_Bx1xTxS, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


# --------------------------------------------------------------------------- reference


def _to_head_major(x_BxLxNxDh: jax.Array, K: int) -> jax.Array:
  """[B, L, K*G, Dh] -> [B, K, G*L, Dh] (kv-head major; the G query heads of a group
  stacked along the row dim, so one matmul per (b, kv head) serves the whole group)."""
  B, L, N, Dh = x_BxLxNxDh.shape
  return x_BxLxNxDh.reshape(B, L, K, N // K, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, Dh)


def _from_head_major(x_BxKxGLxDh: jax.Array, L: int) -> jax.Array:
  B, K, GL, Dh = x_BxKxGLxDh.shape
  G = GL // L
  return x_BxKxGLxDh.reshape(B, K, G, L, Dh).transpose(0, 3, 1, 2, 4).reshape(B, L, K * G, Dh)


def _batched_dot(a, b, contract_a: int, contract_b: int):
  """dot_general over 4-D operands batched on their leading (B, K) dims."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                             preferred_element_type=jnp.float32)


def _attention_scores(q_BxKxGTxDh, k_BxKxSxDh, bias_Bx1xTxS):
  """Scores of T queries against S keys (T = S in training, T < S against a KV cache)."""
  B, K, GT, Dh = q_BxKxGTxDh.shape
  T, S = bias_Bx1xTxS.shape[2:]
  s_BxKxGTxS = _batched_dot(q_BxKxGTxDh, k_BxKxSxDh, 3, 3) * (1.0 / math.sqrt(Dh))
  s_BxKxGxTxS = s_BxKxGTxS.reshape(B, K, GT // T, T, S) + bias_Bx1xTxS[:, :, None]
  return s_BxKxGxTxS.reshape(B, K, GT, S)


def _attention_fwd(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, bias_Bx1xLxL):
  L = q_BxLxHxDh.shape[1]
  K = k_BxLxKxDh.shape[2]
  q_ = _to_head_major(q_BxLxHxDh, K)
  k_ = _to_head_major(k_BxLxKxDh, K)
  v_ = _to_head_major(v_BxLxKxDh, K)
  s_BxKxGLxL = _attention_scores(q_, k_, bias_Bx1xLxL)
  lse_BxKxGL = jax.nn.logsumexp(s_BxKxGLxL, axis=-1)
  p_BxKxGLxL = jnp.exp(s_BxKxGLxL - lse_BxKxGL[..., None]).astype(q_.dtype)
  o_ = _batched_dot(p_BxKxGLxL, v_, 3, 2).astype(q_.dtype)
  return _from_head_major(o_, L), (q_, k_, v_, o_, lse_BxKxGL, bias_Bx1xLxL)


@jax.custom_vjp
def grouped_attention(q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array,
                      bias_Bx1xLxL: jax.Array) -> jax.Array:
  """Grouped-query softmax attention with an additive fp32 mask bias (0 = visible, very
  negative = hidden); what jax.nn.dot_product_attention computes, laid out for XLA:CPU.

  q/k/v are transposed once to kv-head-major [B, K, (G x) L, Dh], so every matmul of the
  forward and backward is batched over the leading (B, K) dims and no B x H x L x L
  tensor is transposed. The backward keeps only q, k, v, the output and the row
  logsumexp (flash-attention style) and recomputes the probabilities, instead of storing
  two B x H x L x L tensors per layer."""
  return _attention_fwd(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, bias_Bx1xLxL)[0]


def _attention_bwd(res, do_BxLxHxDh):
  q_, k_, v_, o_, lse_BxKxGL, bias_Bx1xTxS = res
  T, S = bias_Bx1xTxS.shape[2:]
  Dh = q_.shape[-1]
  K = k_.shape[1]
  do_ = _to_head_major(do_BxLxHxDh, K)
  p_BxKxGLxL = jnp.exp(_attention_scores(q_, k_, bias_Bx1xTxS) - lse_BxKxGL[..., None])
  dv_ = _batched_dot(p_BxKxGLxL.astype(q_.dtype), do_, 2, 2)
  dp_BxKxGLxL = _batched_dot(do_, v_, 3, 3)
  delta_BxKxGL = jnp.sum(do_.astype(jnp.float32) * o_.astype(jnp.float32), axis=-1)
  ds_BxKxGLxL = (p_BxKxGLxL * (dp_BxKxGLxL - delta_BxKxGL[..., None]) *
                 (1.0 / math.sqrt(Dh))).astype(q_.dtype)
  dq_ = _batched_dot(ds_BxKxGLxL, k_, 3, 2)
  dk_ = _batched_dot(ds_BxKxGLxL, q_, 2, 2)
  dt = q_.dtype
  return (_from_head_major(dq_.astype(dt), T), _from_head_major(dk_.astype(dt), S),
          _from_head_major(dv_.astype(dt), S), jnp.zeros_like(bias_Bx1xTxS))


grouped_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------- cuDNN


def segment_runs(segment_ids_BxL: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """A row's documents as cuDNN's packed layout: (lengths_BxM, offsets_BxM1), the first
  `max_segments` = M runs of equal ids (padding is a run too), -1 past the last. A row
  with more runs than M would merge its tail: `count_runs` checks batches on the host."""
  B, L = segment_ids_BxL.shape
  M = max_segments
  start_BxL = jnp.concatenate([jnp.ones((B, 1), jnp.bool_),
                               segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  offsets_BxM = jax.vmap(lambda s: jnp.nonzero(s, size=M, fill_value=-1)[0])(start_BxL)
  offsets_BxM = offsets_BxM.astype(jnp.int32)
  next_BxM = jnp.concatenate([offsets_BxM[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
  ends_BxM = jnp.where(next_BxM >= 0, next_BxM, L)
  lengths_BxM = jnp.where(offsets_BxM >= 0, ends_BxM - offsets_BxM, -1)
  offsets_BxM1 = jnp.concatenate([offsets_BxM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
  return lengths_BxM, offsets_BxM1


def count_runs(segment_ids_BxL: np.ndarray) -> int:
  """The most runs of equal segment ids in any row of a host batch."""
  seg = np.asarray(segment_ids_BxL)
  if seg.size == 0:
    return 0
  return int((np.diff(seg, axis=1) != 0).sum(axis=1).max()) + 1


def _cudnn(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, lengths_BxM, offsets_BxM1):
  # jax.nn.dot_product_attention does not expose the packed layout; its cuDNN backend does.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  return cudnn.dot_product_attention(
      q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM,
      q_offsets=offsets_BxM1, kv_offsets=offsets_BxM1,
      scale=1.0 / math.sqrt(q_BxLxHxDh.shape[-1]), mask_type=cudnn.MaskType.PADDING_CAUSAL)


# --------------------------------------------------------------------------- splash


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, L: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top
  b = min(SPLASH_BLOCK, L)
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  causal = sm.MultiHeadMask([sm.CausalMask((L, L))] * heads)
  with jax.ensure_compile_time_eval():  # Concrete block tables, cached across traces.
    kernel = sk.make_splash_mha(causal, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                interpret=interpret)
  return kernel, sk.SegmentIds


def _splash_local(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL):
  """Splash over this device's rows and heads (a whole array off a mesh)."""
  B, L, H, Dh = q_BxLxHxDh.shape
  kernel, segment_ids = _splash_kernel(H, L, jax.default_backend() != "tpu")
  q_BxHxLxDh = (q_BxLxHxDh * (1.0 / math.sqrt(Dh))).astype(q_BxLxHxDh.dtype).transpose(0, 2, 1, 3)
  k_BxKxLxDh = k_BxLxKxDh.transpose(0, 2, 1, 3)
  v_BxKxLxDh = v_BxLxKxDh.transpose(0, 2, 1, 3)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s))
  o_BxHxLxDh = jax.vmap(one)(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL)
  return o_BxHxLxDh.transpose(0, 2, 1, 3)


def _splash(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL):
  """Splash is a Pallas call, which the compiler cannot partition: on a mesh each device
  runs it on its own rows (batch axes) and heads (tensor axis) under shard_map."""
  L = q_BxLxHxDh.shape[1]
  if L % min(SPLASH_BLOCK, L):
    raise ValueError(f"model: attention=splash needs the sequence length ({L}) to be a "
                     f"multiple of {SPLASH_BLOCK} (or at most {SPLASH_BLOCK})")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _splash_local(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)
  q_spec = sharding.logical_to_spec(("batch", "length", "act_heads", None))
  kv_spec = sharding.logical_to_spec(("batch", "length", "act_kv", None))
  seg_spec = sharding.logical_to_spec(("batch", "length"))
  return jax.shard_map(_splash_local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(
                           q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)


# --------------------------------------------------------------------------- entry points


def prepare(impl: str, segment_ids_BxL: jax.Array, max_segments: int) -> dict[str, Any]:
  """What kernel `impl` (resolved) needs to attend within `segment_ids_BxL`'s documents,
  computed once per forward pass."""
  if impl == "reference":
    return {"bias_Bx1xLxL": _bias(mask(segment_ids_BxL))}
  if impl == "xla":
    return {"mask_Bx1xLxL": mask(segment_ids_BxL)}
  if impl == "cudnn":
    lengths_BxM, offsets_BxM1 = segment_runs(segment_ids_BxL, max_segments)
    return {"lengths_BxM": lengths_BxM, "offsets_BxM1": offsets_BxM1}
  if impl == "splash":
    return {"segment_ids_BxL": segment_ids_BxL}
  raise ValueError(f"model: attention {impl!r} is not a resolved implementation")


def attend(impl: str, context: dict[str, Any], q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array,
           v_BxLxKxDh: jax.Array) -> jax.Array:
  """One layer's attention within documents, with `prepare(impl, ...)`'s context."""
  if impl == "reference":
    return grouped_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, context["bias_Bx1xLxL"])
  if impl == "xla":
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh,
                                        mask=context["mask_Bx1xLxL"], implementation="xla")
  if impl == "cudnn":
    return _cudnn(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, context["lengths_BxM"],
                  context["offsets_BxM1"])
  if impl == "splash":
    return _splash(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, context["segment_ids_BxL"])
  raise ValueError(f"model: attention {impl!r} is not a resolved implementation")


def masked(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array,
           mask_Bx1xTxS: jax.Array) -> jax.Array:
  """T queries over S keys where `mask_Bx1xTxS` is True (decoding against a KV cache):
  the reference kernel on CPU, XLA's elsewhere (the fused kernels are built for
  training lengths, not one new token)."""
  if jax.default_backend() == "cpu":
    return grouped_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, _bias(mask_Bx1xTxS))
  return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_Bx1xTxS,
                                      implementation="xla")
