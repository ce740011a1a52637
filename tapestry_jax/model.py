"""Decoder-only transformer (LLaMA style) as pure functions over a parameter pytree.

Data flow: token ids -> `hidden` -> `token_losses` (train.py, eval) or `forward` -> logits
(decoding). Pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query
attention (the kernel per platform is attention.py's), optional tied embeddings and
z-loss; the loss never builds the whole logits (losses.py). Layers are stacked along a leading `layers` axis
(always, so checkpoints do not depend on `scan_layers`), and either scanned (compile
time flat in depth) or unrolled. Every parameter and activation names its logical axes;
`sharding.LOGICAL_RULES` maps them to the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from tapestry_jax import attention
from tapestry_jax import losses
from tapestry_jax import sharding

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters. Hashable, so it can be a static jit argument."""
  vocab_size: int = 384
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 32
  d_ff: int = 384
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  z_loss: float = 0.0
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = True
  attention: str = "auto"  # auto | reference | xla | cudnn | splash (attention.py)
  max_segments: int = 32  # Documents per packed row the cudnn kernel is built for.
  loss_chunk: int = 512  # Positions per chunk of the output layer's loss (0 = all).

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in fields})

  def validate(self) -> None:
    if self.param_dtype not in _DTYPES or self.compute_dtype not in _DTYPES:
      raise ValueError(f"model: dtypes must be one of {sorted(_DTYPES)}, got "
                       f"param_dtype={self.param_dtype!r} compute_dtype={self.compute_dtype!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model: n_heads={self.n_heads} must be a multiple of "
                       f"n_kv_heads={self.n_kv_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"model: head_dim={self.head_dim} must be even (rotary embeddings)")
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(f"model: remat must be one of {sorted(_REMAT_POLICIES)}, got {self.remat!r}")
    attention.resolve(self.attention)  # ValueError naming the choices.
    if self.max_segments < 1 or self.loss_chunk < 0:
      raise ValueError(f"model: max_segments={self.max_segments} must be >= 1 and "
                       f"loss_chunk={self.loss_chunk} >= 0")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model: {name} must be positive, got {getattr(self, name)}")


# name -> architecture. Vocab 384 covers the byte tokenizer (259 ids) padded to a
# multiple of 128; the accelerator presets assume a 32k SentencePiece vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=384, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                 head_dim=32, d_ff=384),
    "small": dict(vocab_size=384, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4,
                  head_dim=64, d_ff=1536),
    "125m": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                 head_dim=64, d_ff=2048),
    "350m": dict(vocab_size=32768, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8,
                 head_dim=64, d_ff=2816),
    "1b": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
               head_dim=64, d_ff=8192, tie_embeddings=True),
    "7b": dict(vocab_size=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               head_dim=128, d_ff=14336),
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical axis names, one per dim
  init: str  # "normal:<std>" | "ones"


def param_specs(cfg: ModelConfig) -> Params:
  """The parameter pytree's structure: shape, logical axes and initialiser per leaf."""
  D, H, K, Dh, F, V, N = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                          cfg.vocab_size, cfg.n_layers)
  std_in = 1.0 / math.sqrt(D)
  # Residual-branch outputs are scaled down with depth (GPT-2 / OLMo style).
  std_out_attn = 1.0 / math.sqrt(H * Dh) / math.sqrt(2 * N)
  std_out_mlp = 1.0 / math.sqrt(F) / math.sqrt(2 * N)
  # Tied embeddings double as the output layer, so they get the output layer's scale.
  std_embed = std_in if cfg.tie_embeddings else 1.0
  specs: Params = {
      "embed": ParamSpec((V, D), ("vocab", "embed"), f"normal:{std_embed}"),
      "layers": {
          "attn_norm": ParamSpec((N, D), ("layers", "norm"), "ones"),
          "wq": ParamSpec((N, D, H, Dh), ("layers", "embed", "heads", "head_dim"), f"normal:{std_in}"),
          "wk": ParamSpec((N, D, K, Dh), ("layers", "embed", "kv", "head_dim"), f"normal:{std_in}"),
          "wv": ParamSpec((N, D, K, Dh), ("layers", "embed", "kv", "head_dim"), f"normal:{std_in}"),
          "wo": ParamSpec((N, H, Dh, D), ("layers", "heads", "head_dim", "embed"),
                          f"normal:{std_out_attn}"),
          "mlp_norm": ParamSpec((N, D), ("layers", "norm"), "ones"),
          "w_gate": ParamSpec((N, D, F), ("layers", "embed", "mlp"), f"normal:{std_in}"),
          "w_up": ParamSpec((N, D, F), ("layers", "embed", "mlp"), f"normal:{std_in}"),
          "w_down": ParamSpec((N, F, D), ("layers", "mlp", "embed"), f"normal:{std_out_mlp}"),
      },
      "final_norm": ParamSpec((D,), ("norm",), "ones"),
  }
  if not cfg.tie_embeddings:
    specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), f"normal:{std_in}")
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def logical_axes(cfg: ModelConfig) -> Params:
  """Pytree (same structure as params) of logical axis tuples."""
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Params:
  return jax.tree.map(lambda s: sharding.named_sharding(mesh, s.axes), param_specs(cfg),
                      is_leaf=_is_spec)


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
  leaves = jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec)
  n = sum(math.prod(s.shape) for s in leaves)
  if not include_embedding:
    n -= cfg.vocab_size * cfg.d_model
  return n


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Initialises parameters; jit this with `out_shardings=param_shardings(...)` so every
  device creates only its own shards (threefry is partitionable: values do not depend
  on the mesh)."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))
  dtype = _DTYPES[cfg.param_dtype]

  def one(spec: ParamSpec, k):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    std = float(spec.init.split(":")[1])
    return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


# --------------------------------------------------------------------------- layers


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x32 = x_BxLxD.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale_D.astype(jnp.float32)).astype(x_BxLxD.dtype)


def rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embeddings (rotate-half convention), computed in fp32."""
  half = x_BxLxHxDh.shape[-1] // 2
  freq_half = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxhalf = positions_BxL[..., None].astype(jnp.float32) * freq_half
  sin = jnp.sin(angle_BxLxhalf)[:, :, None, :]
  cos = jnp.cos(angle_BxLxhalf)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxDh.dtype)


def _matmul(x_BxLxI: jax.Array, w: jax.Array) -> jax.Array:
  """x_BxLxI @ w, with w's leading dims contracted against I and its trailing dims
  (one or more) kept: (B, L, *w.shape[n_in:]). Done as one 2-D matmul over flattened
  tokens ((B*L) x I @ I x O): with B and L as two separate dims, the weight gradient
  contracts over two dims and XLA:CPU inserts strided transposes of the (large)
  activation gradients before its matmuls; the 2-D form needs none."""
  B, L = x_BxLxI.shape[:2]
  n_in = x_BxLxI.ndim - 2
  i_size = math.prod(x_BxLxI.shape[2:])
  out_dims = w.shape[n_in:]
  y_TxO = jnp.dot(x_BxLxI.reshape(B * L, i_size), w.reshape(i_size, math.prod(out_dims)))
  return y_TxO.reshape(B, L, *out_dims)


def _act_constrain(a_TxF: jax.Array, B: int, L: int) -> jax.Array:
  F = a_TxF.shape[-1]
  return sharding.constrain(a_TxF.reshape(B, L, F), ("batch", "length", "act_mlp")).reshape(B * L, F)


def _swiglu_fwd(h_BxLxD, w_gate_DxF, w_up_DxF, w_down_FxD):
  B, L, D = h_BxLxD.shape
  h_TxD = h_BxLxD.reshape(B * L, D)
  gate_TxF = _act_constrain(jnp.dot(h_TxD, w_gate_DxF), B, L)
  up_TxF = _act_constrain(jnp.dot(h_TxD, w_up_DxF), B, L)
  act_TxF = _act_constrain(jax.nn.silu(gate_TxF) * up_TxF, B, L)
  y_BxLxD = jnp.dot(act_TxF, w_down_FxD).reshape(B, L, D)
  return y_BxLxD, (h_BxLxD, gate_TxF, up_TxF, w_gate_DxF, w_up_DxF, w_down_FxD)


@jax.custom_vjp
def swiglu_mlp(h_BxLxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array,
               w_down_FxD: jax.Array) -> jax.Array:
  """down(silu(h @ W_gate) * (h @ W_up)) over flattened tokens, with a hand-written
  backward that keeps only the two matmul outputs (gate, up) as residuals and
  recomputes silu / the gating derivative elementwise; autodiff would keep five
  (B*L) x d_ff tensors per layer (sigmoid, silu, product, ...)."""
  return _swiglu_fwd(h_BxLxD, w_gate_DxF, w_up_DxF, w_down_FxD)[0]


def _swiglu_bwd(res, dy_BxLxD):
  h_BxLxD, gate_TxF, up_TxF, w_gate_DxF, w_up_DxF, w_down_FxD = res
  B, L, D = h_BxLxD.shape
  h_TxD = h_BxLxD.reshape(B * L, D)
  dy_TxD = dy_BxLxD.reshape(B * L, D)
  sig_TxF = jax.nn.sigmoid(gate_TxF)
  silu_TxF = gate_TxF * sig_TxF
  act_TxF = silu_TxF * up_TxF
  dw_down_FxD = jnp.dot(act_TxF.T, dy_TxD)
  dact_TxF = _act_constrain(jnp.dot(dy_TxD, w_down_FxD.T), B, L)
  dup_TxF = dact_TxF * silu_TxF
  dgate_TxF = dact_TxF * up_TxF * sig_TxF * (1 + gate_TxF * (1 - sig_TxF))
  dw_gate_DxF = jnp.dot(h_TxD.T, dgate_TxF)
  dw_up_DxF = jnp.dot(h_TxD.T, dup_TxF)
  dh_TxD = jnp.dot(dgate_TxF, w_gate_DxF.T) + jnp.dot(dup_TxF, w_up_DxF.T)
  return (dh_TxD.reshape(B, L, D).astype(h_BxLxD.dtype), dw_gate_DxF.astype(w_gate_DxF.dtype),
          dw_up_DxF.astype(w_up_DxF.dtype), dw_down_FxD.astype(w_down_FxD.dtype))


swiglu_mlp.defvjp(_swiglu_fwd, _swiglu_bwd)


def attention_inputs(cfg: ModelConfig, x_BxLxD: jax.Array, layer: Params,
                     positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One layer's pre-norm queries, keys and values, rotated to `positions_BxL`."""
  cdt = _DTYPES[cfg.compute_dtype]
  h_BxLxD = rms_norm(x_BxLxD, layer["attn_norm"], cfg.norm_eps)
  q_BxLxHxDh = _matmul(h_BxLxD, layer["wq"].astype(cdt))
  k_BxLxKxDh = _matmul(h_BxLxD, layer["wk"].astype(cdt))
  v_BxLxKxDh = _matmul(h_BxLxD, layer["wv"].astype(cdt))
  q_BxLxHxDh = sharding.constrain(rope(q_BxLxHxDh, positions_BxL, cfg.rope_theta),
                                  ("batch", "length", "act_heads", None))
  k_BxLxKxDh = sharding.constrain(rope(k_BxLxKxDh, positions_BxL, cfg.rope_theta),
                                  ("batch", "length", "act_kv", None))
  v_BxLxKxDh = sharding.constrain(v_BxLxKxDh, ("batch", "length", "act_kv", None))
  return q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh


def attention_output_and_mlp(cfg: ModelConfig, x_BxLxD: jax.Array, layer: Params,
                             o_BxLxHxDh: jax.Array) -> jax.Array:
  """The rest of a layer after attention: output projection, residual, MLP, residual."""
  cdt = _DTYPES[cfg.compute_dtype]
  attn_BxLxD = _matmul(o_BxLxHxDh, layer["wo"].astype(cdt))
  x_BxLxD = sharding.constrain(x_BxLxD + attn_BxLxD, ("batch", "length", "act_embed"))

  h_BxLxD = rms_norm(x_BxLxD, layer["mlp_norm"], cfg.norm_eps)
  mlp_BxLxD = swiglu_mlp(h_BxLxD, layer["w_gate"].astype(cdt), layer["w_up"].astype(cdt),
                         layer["w_down"].astype(cdt))
  return sharding.constrain(x_BxLxD + mlp_BxLxD, ("batch", "length", "act_embed"))


def _layer(cfg: ModelConfig, impl: str, x_BxLxD, layer: Params, positions_BxL, context):
  q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh = attention_inputs(cfg, x_BxLxD, layer, positions_BxL)
  o_BxLxHxDh = attention.attend(impl, context, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)
  return attention_output_and_mlp(cfg, x_BxLxD, layer, o_BxLxHxDh)


_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def embed(params: Params, inputs_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Token ids -> input embeddings x_BxLxD in the compute dtype."""
  # Gather from a table that is whole on every device (one all-gather, like FSDP does
  # for every weight): a gather from a sharded table makes GSPMD replicate the result.
  embed_VxD = sharding.constrain(params["embed"].astype(_DTYPES[cfg.compute_dtype]), (None, None))
  x_BxLxD = jnp.take(embed_VxD, inputs_BxL, axis=0)
  return sharding.constrain(x_BxLxD, ("batch", "length", "act_embed"))


def forward_embeddings(params: Params, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                       segment_ids_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Input embeddings -> fp32 logits_BxLxV (split from `forward` so tests can
  differentiate with respect to the inputs)."""
  return output_logits(params, hidden(params, x_BxLxD, positions_BxL, segment_ids_BxL, cfg), cfg)


def hidden(params: Params, x_BxLxD: jax.Array, positions_BxL: jax.Array,
           segment_ids_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Input embeddings -> the last layer's output x_BxLxD (before the final norm)."""
  impl = attention.resolve(cfg.attention)
  context = attention.prepare(impl, segment_ids_BxL, cfg.max_segments)

  def body(x, layer):
    return _layer(cfg, impl, x, layer, positions_BxL, context), None

  if cfg.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, params["layers"])
  else:
    for i in range(cfg.n_layers):
      x_BxLxD, _ = body(x_BxLxD, jax.tree.map(lambda p: p[i], params["layers"]))
  return x_BxLxD


def _unembed(params: Params, cfg: ModelConfig) -> jax.Array:
  return (params["embed"].T if cfg.tie_embeddings else params["unembed"]).astype(
      _DTYPES[cfg.compute_dtype])


def output_logits(params: Params, x_BxLxD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The last layer's output -> final norm -> fp32 logits_BxLxV."""
  x_BxLxD = rms_norm(x_BxLxD, params["final_norm"], cfg.norm_eps)
  logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, _unembed(params, cfg))
  logits_BxLxV = sharding.constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
  return logits_BxLxV.astype(jnp.float32)


def forward(params: Params, inputs_BxL: jax.Array, positions_BxL: jax.Array,
            segment_ids_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Token ids -> fp32 logits_BxLxV. Attention never crosses segments or looks ahead."""
  return forward_embeddings(params, embed(params, inputs_BxL, cfg), positions_BxL,
                            segment_ids_BxL, cfg)


def loss_chunk_len(cfg: ModelConfig, L: int) -> int:
  """Positions per chunk of the loss: L cut into the fewest equal chunks of at most
  `cfg.loss_chunk` positions (0 = one chunk)."""
  if cfg.loss_chunk <= 0 or L <= cfg.loss_chunk:
    return L
  n = -(-L // cfg.loss_chunk)
  while L % n:
    n += 1
  return L // n


def token_losses(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig):
  """Per-token cross-entropy (nats) and z-loss, both BxL, plus the BxL loss mask. The
  logits are never whole: `losses.logsumexp_and_target` works through chunks of
  positions."""
  x_BxLxD = hidden(params, embed(params, batch["inputs"], cfg), batch["positions"],
                   batch["segment_ids"], cfg)
  x_BxLxD = rms_norm(x_BxLxD, params["final_norm"], cfg.norm_eps)
  logz_BxL, target_logit_BxL = losses.logsumexp_and_target(
      x_BxLxD, _unembed(params, cfg), batch["targets"], loss_chunk_len(cfg, x_BxLxD.shape[1]))
  ce_BxL = logz_BxL - target_logit_BxL
  mask_BxL = (batch["segment_ids"] > 0).astype(jnp.float32)
  return ce_BxL * mask_BxL, cfg.z_loss * jnp.square(logz_BxL) * mask_BxL, mask_BxL


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Analytic training FLOPs per token (forward + backward = 3x forward), PaLM style:
  6 x (matmul params) + 12 x layers x heads x head_dim x seq_len for attention.
  The embedding lookup is not a matmul and is not counted; the unembedding is."""
  D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  per_layer = D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F
  matmul_params = cfg.n_layers * per_layer + D * cfg.vocab_size
  attn = 12 * cfg.n_layers * H * Dh * seq_len
  return 6.0 * matmul_params + attn
