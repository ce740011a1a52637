"""Models in and out of the project in Hugging Face Llama format.

Data flow: params + ModelConfig + tokenizer -> `save` -> a directory that
`transformers.LlamaForCausalLM` and `AutoTokenizer` load (safetensors weights,
config.json, tokenizer files from hf_tokenizer.py), plus `tapestry.json` with what HF
has no field for (z_loss, dtypes, remat, ...). `load` reads such a directory, or any HF
Llama checkpoint in safetensors (one file or sharded), back into tapestry's layout;
`train.init_from=hf:DIR` (init_from.py) places one straight into a run's shardings.

Our model computes what HF Llama computes: rotate-half RoPE with the same frequencies,
RMSNorm with eps inside the root and the weight applied last, SwiGLU, query head h
reading kv head h // (H / K), scores scaled by 1/sqrt(head_dim). So the mapping is
layout only: matrices go to HF's [out, in] and the stacked `layers` axis becomes
`model.layers.{i}`; the q/k rows need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
from typing import Any, Callable, NamedTuple

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from tapestry_jax import hf_tokenizer
from tapestry_jax import model as model_lib
from tapestry_jax import trees
from tapestry_jax.checkpoint import InitError

TAPESTRY_JSON = "tapestry.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ARCHITECTURE = "LlamaForCausalLM"
# Weights are written in shards of at most this size, as `save_pretrained` does, so the
# host holds one shard at a time.
MAX_SHARD_BYTES = 5 * 2**30

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# ModelConfig fields that config.json carries too (tapestry.json must agree with it).
_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "rope_theta", "norm_eps", "tie_embeddings")
# Our leaf -> (HF tensor name, how many leading dims of ours are the matmul's input).
# Matrices are [in..., out...] here and [out, in] in HF; 0 = the same layout.
_TOP = {"embed": ("model.embed_tokens.weight", 0), "final_norm": ("model.norm.weight", 0),
        "unembed": ("lm_head.weight", 1)}
_LAYER = {
    "attn_norm": ("input_layernorm.weight", 0),
    "wq": ("self_attn.q_proj.weight", 1), "wk": ("self_attn.k_proj.weight", 1),
    "wv": ("self_attn.v_proj.weight", 1), "wo": ("self_attn.o_proj.weight", 2),
    "mlp_norm": ("post_attention_layernorm.weight", 0),
    "w_gate": ("mlp.gate_proj.weight", 1), "w_up": ("mlp.up_proj.weight", 1),
    "w_down": ("mlp.down_proj.weight", 1),
}
# Tensors some HF checkpoints carry that the computation does not read.
_UNUSED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# --------------------------------------------------------------------------- layout


class _Tensor(NamedTuple):
  """One HF tensor: which leaf of ours (and which layer of it) it is, and how."""
  name: str
  leaf: str
  layer: int | None
  n_in: int
  shape: tuple[int, ...]  # Our shape of this tensor (one layer's slice of the leaf).

  @property
  def hf_shape(self) -> tuple[int, ...]:
    s, n = self.shape, self.n_in
    return (math.prod(s[n:]), math.prod(s[:n])) if n else s

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(self.hf_shape[1], -1).T if self.n_in else x)

  def from_hf(self, w: np.ndarray) -> np.ndarray:
    return (w.T if self.n_in else w).reshape(self.shape)


def _tensors(cfg: model_lib.ModelConfig) -> list[_Tensor]:
  """Every HF tensor of `cfg`'s model, in HF's order."""
  specs = trees.flatten(model_lib.param_specs(cfg))
  top = lambda leaf: _Tensor(_TOP[leaf][0], leaf, None, _TOP[leaf][1], specs[leaf].shape)
  out = [top("embed")]
  for i in range(cfg.n_layers):
    out += [_Tensor(f"model.layers.{i}.{hf}", f"layers/{leaf}", i, n_in,
                    specs[f"layers/{leaf}"].shape[1:]) for leaf, (hf, n_in) in _LAYER.items()]
  out.append(top("final_norm"))
  if not cfg.tie_embeddings:
    out.append(top("unembed"))
  return out


# --------------------------------------------------------------------------- save


def save(directory: str, model_cfg: model_lib.ModelConfig, params, tokenizer, *,
         dtype: str = "", max_position_embeddings: int = 2048) -> None:
  """Writes `params` (tapestry's layout; numpy or addressable jax arrays) and
  `tokenizer` as a HF Llama directory. `dtype`: float32 | bfloat16 | float16 of the
  stored weights ("" = the params' own); `max_position_embeddings`: the context length
  to advertise (RoPE itself has no limit; pass the trained sequence length)."""
  flat = trees.flatten(params)
  want = {n: s.shape for n, s in trees.flatten(model_lib.param_specs(model_cfg)).items()}
  for name in sorted(set(want) | set(flat)):
    got = tuple(flat[name].shape) if name in flat else None
    if got != want.get(name):
      raise ValueError(f"params do not match the model config: {name} is {got}, the "
                       f"config says {want.get(name)}")
  dtype = dtype or str(np.dtype(flat["embed"].dtype))
  if dtype not in _DTYPES:
    raise ValueError(f"export dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
  os.makedirs(directory, exist_ok=True)
  kind = hf_tokenizer.save(directory, tokenizer, max_position_embeddings)
  _write_weights(directory, model_cfg, flat, _DTYPES[dtype])
  ids = {f"{k}_token_id": (int(i) if i is not None and int(i) >= 0 else None) for k, i in (
      ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))}
  _write_json(directory, "config.json", _hf_config(model_cfg, dtype, ids, max_position_embeddings))
  _write_json(directory, "generation_config.json",
              {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}})
  ours = dataclasses.replace(model_cfg, param_dtype=dtype)
  _write_json(directory, TAPESTRY_JSON, {"format": 1, "model": dataclasses.asdict(ours),
                                         "tokenizer": kind})


def _write_json(directory: str, name: str, obj) -> None:
  with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _write_weights(directory: str, cfg: model_lib.ModelConfig, flat: dict[str, Any],
                   np_dtype) -> None:
  """The weights as one safetensors file, or as shards and their index past
  MAX_SHARD_BYTES; each shard's tensors are fetched and converted only as it is written."""
  for name in os.listdir(directory):  # A previous export's shards would mislead loaders.
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
      os.remove(os.path.join(directory, name))
  itemsize = np.dtype(np_dtype).itemsize
  shards: list[list[_Tensor]] = [[]]
  size = 0
  for t in _tensors(cfg):
    nbytes = math.prod(t.shape) * itemsize
    if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  files = ([WEIGHTS] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  for file, shard in zip(files, shards):
    tensors = {}
    for t in shard:
      x = flat[t.leaf] if t.layer is None else flat[t.leaf][t.layer]
      tensors[t.name] = t.to_hf(np.asarray(x).astype(np_dtype, copy=False))
    safetensors.numpy.save_file(tensors, os.path.join(directory, file),
                                metadata={"format": "pt"})
  if len(shards) > 1:
    total = sum(math.prod(t.shape) for shard in shards for t in shard) * itemsize
    _write_json(directory, WEIGHTS_INDEX, {
        "metadata": {"total_size": total},
        "weight_map": {t.name: f for f, shard in zip(files, shards) for t in shard}})


def _hf_config(cfg: model_lib.ModelConfig, dtype: str, ids: dict[str, int | None],
               max_position_embeddings: int) -> dict[str, Any]:
  return {
      "architectures": [ARCHITECTURE], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": int(max_position_embeddings),
      "rms_norm_eps": cfg.norm_eps,
      # rope_theta for transformers 4.x, rope_parameters for 5.x.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
      "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1,
      "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": dtype, "dtype": dtype,
      **ids,
  }


# --------------------------------------------------------------------------- load


def _read_json(directory: str, name: str, required: bool = True):
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    if required:
      raise InitError(f"HF checkpoint {directory}: no {name}")
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise InitError(f"HF checkpoint {directory}: {name} is not readable JSON: {e}") from None


class _Weights(contextlib.ExitStack):
  """The safetensors tensors of a HF directory (one file, or shards and their index),
  each file opened (memory-mapped) on first use."""

  def __init__(self, directory: str):
    super().__init__()
    self.where = f"HF checkpoint {directory}"
    self._handles: dict[str, Any] = {}
    index = _read_json(directory, WEIGHTS_INDEX, required=False)
    single = os.path.join(directory, WEIGHTS)
    if index is not None:
      self.files = {n: os.path.join(directory, f)
                    for n, f in (index.get("weight_map") or {}).items()}
    elif os.path.isfile(single):
      self.files = {n: single for n in self._open(single).keys()}
    else:
      raise InitError(f"{self.where}: no {WEIGHTS} or {WEIGHTS_INDEX} (only safetensors "
                      f"checkpoints are read)")

  def _open(self, path: str):
    if path not in self._handles:
      if not os.path.isfile(path):
        raise InitError(f"{self.where}: {os.path.basename(path)} is missing")
      try:
        self._handles[path] = self.enter_context(safetensors.safe_open(path, framework="numpy"))
      except Exception as e:  # noqa: BLE001  (SafetensorError, OSError)
        raise InitError(f"{self.where}: {os.path.basename(path)} is not a safetensors "
                        f"file: {str(e)[:200]}") from None
    return self._handles[path]

  def names(self) -> set[str]:
    return set(self.files)

  def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
    s = self._open(self.files[name]).get_slice(name)
    return tuple(s.get_shape()), s.get_dtype()

  def get(self, name: str) -> np.ndarray:
    return self._open(self.files[name]).get_tensor(name)


def _config_from_hf(c: dict[str, Any], where: str) -> dict[str, Any]:
  """ModelConfig fields from a HF config.json; InitError for what our model lacks."""
  if ARCHITECTURE not in (c.get("architectures") or []) and c.get("model_type") != "llama":
    raise InitError(f"{where}: architectures={c.get('architectures')} model_type="
                    f"{c.get('model_type')!r}; only {ARCHITECTURE} is supported")
  rope = c.get("rope_parameters") or {}
  if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    raise InitError(f"{where}: RoPE scaling ({c.get('rope_scaling') or rope}) is not "
                    f"supported")
  for flag in ("attention_bias", "mlp_bias"):
    if c.get(flag):
      raise InitError(f"{where}: {flag}=true is not supported (our model has no biases)")
  if c.get("hidden_act", "silu") != "silu":
    raise InitError(f"{where}: hidden_act={c['hidden_act']!r}; only silu is supported")
  try:
    heads = int(c["num_attention_heads"])
    return dict(
        vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]),
        n_layers=int(c["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
        d_ff=int(c["intermediate_size"]),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10_000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)))
  except KeyError as e:
    raise InitError(f"{where}: config.json has no {e.args[0]}") from None


def load_config(directory: str) -> model_lib.ModelConfig:
  """The ModelConfig of a HF Llama directory: the architecture from config.json, the
  rest from tapestry.json for our own exports; elsewhere param_dtype and compute_dtype
  are the stored weights' dtype."""
  where = f"HF checkpoint {directory}"
  if not os.path.isdir(directory):
    raise InitError(f"{where}: no such directory")
  fields = _config_from_hf(_read_json(directory, "config.json"), where)
  ours = _read_json(directory, TAPESTRY_JSON, required=False)
  if ours is not None:
    known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    saved = {k: v for k, v in (ours.get("model") or {}).items() if k in known}
    for k in _ARCH_FIELDS:
      if k in saved and saved[k] != fields[k]:
        raise InitError(f"{where}: {TAPESTRY_JSON} says {k}={saved[k]!r} but config.json "
                        f"says {fields[k]!r}")
    fields = {**saved, **fields}
  else:
    embed = _TOP["embed"][0]
    with _Weights(directory) as weights:
      if embed not in weights.names():
        raise InitError(f"{where}: tensor {embed} is missing")
      stored = weights.shape_dtype(embed)[1]
    if stored not in _SAFETENSORS_DTYPES:
      raise InitError(f"{where}: weights of dtype {stored} are not supported")
    fields["param_dtype"] = fields["compute_dtype"] = _SAFETENSORS_DTYPES[stored]
  cfg = model_lib.ModelConfig(**fields)
  try:
    cfg.validate()
  except ValueError as e:
    raise InitError(f"{where}: {e}") from None
  return cfg


def load_params(directory: str, model_cfg: model_lib.ModelConfig,
                put: Callable[[str, np.ndarray], Any] | None = None):
  """The params of a HF Llama directory in tapestry's layout and model_cfg.param_dtype.
  Every tensor's presence, shape and dtype is checked first; then each leaf is assembled
  on the host and handed to `put(leaf name, array)` (default: kept as numpy) before the
  next, so a caller that moves leaves to devices holds at most one on the host."""
  where = f"HF checkpoint {directory}"
  plan = _tensors(model_cfg)
  np_dtype = _DTYPES[model_cfg.param_dtype]
  with _Weights(directory) as weights:
    names = weights.names()
    missing = [t.name for t in plan if t.name not in names]
    if missing:
      raise InitError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing)")
    extra = sorted(n for n in names - {t.name for t in plan} if not _UNUSED.fullmatch(n)
                   and not (model_cfg.tie_embeddings and n == _TOP["unembed"][0]))
    if extra:
      raise InitError(f"{where}: unexpected tensor {extra[0]} (not a plain Llama model?)")
    for t in plan:
      shape, dtype = weights.shape_dtype(t.name)
      if shape != t.hf_shape:
        raise InitError(f"{where}: {t.name} has shape {list(shape)}, config.json implies "
                        f"{list(t.hf_shape)}")
      if dtype not in _SAFETENSORS_DTYPES:
        raise InitError(f"{where}: {t.name} has dtype {dtype}; float weights expected")
    leaves = {}
    for leaf, spec in trees.flatten(model_lib.param_specs(model_cfg)).items():
      out = np.empty(spec.shape, np_dtype)
      for t in plan:
        if t.leaf == leaf:
          out[... if t.layer is None else t.layer] = t.from_hf(weights.get(t.name))
      leaves[leaf] = put(leaf, out) if put else out
  return trees.unflatten(leaves, model_lib.param_specs(model_cfg))


def load_tokenizer(directory: str):
  """Our tokenizer for an export of ours; for another HF directory, its tokenizer.json
  (as an HFTokenizer) or else its SentencePiece tokenizer.model."""
  kind = (_read_json(directory, TAPESTRY_JSON, required=False) or {}).get("tokenizer")
  config = _read_json(directory, "config.json")
  ids = [config.get(f"{k}_token_id") for k in ("bos", "eos", "pad")]
  ids = [i[0] if isinstance(i, list) and i else i for i in ids]  # Llama 3: a list of eos.
  return hf_tokenizer.load(directory, kind, ids)


def load(directory: str) -> tuple[model_lib.ModelConfig, Any, Any]:
  """(model config, params as numpy arrays in tapestry's layout, tokenizer) of a HF Llama
  directory: one written by `save`, or any LlamaForCausalLM checkpoint in safetensors.
  InitError, one line, for what cannot be read or is not a plain Llama model."""
  cfg = load_config(directory)
  return cfg, load_params(directory, cfg), load_tokenizer(directory)
