"""Text generation: prompts (token ids) -> new token ids, greedy or sampled.

Data flow: prompts -> left-padded to a length bucket -> one jitted program (`decode.prefill`,
then a `lax.while_loop` of sample + `decode.step`) -> new ids per prompt, cut after a stop
id. Prompt lengths and max_new_tokens are rounded up to powers of two, so one compiled
program serves every call with the same batch size, buckets and sampling mode; the
number of steps, temperature, top_p, seed and stop ids are runtime values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tapestry_jax import decode
from tapestry_jax import model as model_lib
from tapestry_jax.validate import ConfigError

_MIN_PROMPT_BUCKET = 16
_MIN_NEW_BUCKET = 32


class _Sampler(NamedTuple):
  """The compile-time part of the sampling settings (the rest are runtime values)."""
  greedy: bool
  top_k: int  # 0 = off
  top_p: bool  # whether nucleus filtering is on


def _bucket(n: int, floor: int) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def _filter_logits(logits_BxV: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
  """Hides (-inf) every token outside the top k, then outside the smallest set whose
  probability reaches top_p (the most likely token always stays). Ties at a cut stay."""
  if top_k:
    kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1]
    logits_BxV = jnp.where(logits_BxV < kth_B[:, None], -jnp.inf, logits_BxV)
  if top_p is not None:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_kept_B = jnp.sum(mass_before_BxV < top_p, axis=-1)
    cut_B = jnp.take_along_axis(sorted_BxV, n_kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cut_B, -jnp.inf, logits_BxV)
  return logits_BxV


def _sample(logits_BxV, key, temperature, top_p, sampler: _Sampler) -> jax.Array:
  if sampler.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = _filter_logits(logits_BxV / temperature, sampler.top_k,
                              top_p if sampler.top_p else None)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "n_out", "sampler"))
def _generate_padded(params, tokens_BxP, start_B, max_new_tokens, temperature, top_p, stop_ids,
                     key, *, cfg, max_len, n_out, sampler):
  """Left-padded prompts -> out_BxN (N = n_out >= max_new_tokens) new ids; a row's ids
  after its first stop id, and all ids past max_new_tokens, are filler."""
  B = tokens_BxP.shape[0]
  logits_BxV, cache = decode.prefill(params, tokens_BxP, start_B, max_len, cfg)

  def emit(i, logits_BxV, out_BxN, done_B):
    tok_B = _sample(logits_BxV, jax.random.fold_in(key, i), temperature, top_p, sampler)
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, tok_B[:, None], (0, i))
    return tok_B, out_BxN, done_B | jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)

  tok_B, out_BxN, done_B = emit(0, logits_BxV, jnp.zeros((B, n_out), jnp.int32),
                                jnp.zeros((B,), jnp.bool_))

  def cond(state):
    i, _, _, _, done_B = state
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    i, cache, tok_B, out_BxN, done_B = state
    logits_BxV, cache = decode.step(params, cache, tok_B, cfg)
    tok_B, out_BxN, done_B = emit(i, logits_BxV, out_BxN, done_B)
    return i + 1, cache, tok_B, out_BxN, done_B

  state = (jnp.ones((), jnp.int32), cache, tok_B, out_BxN, done_B)
  return jax.lax.while_loop(cond, body, state)[3]


def _check(model_cfg, params, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids):
  try:
    model_cfg.validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not prompts:
    raise ConfigError("generate: no prompts")
  for i, p in enumerate(prompts):
    if p.ndim != 1 or p.size == 0:
      raise ConfigError(f"generate: prompt {i} must be a non-empty 1-D array of token ids, "
                        f"got shape {p.shape}")
    if p.min() < 0 or p.max() >= model_cfg.vocab_size:
      raise ConfigError(f"generate: prompt {i} has token ids outside [0, "
                        f"{model_cfg.vocab_size}) (model.vocab_size)")
  for i in stop_ids:
    if not 0 <= i < model_cfg.vocab_size:
      raise ConfigError(f"generate: stop id {i} is outside [0, {model_cfg.vocab_size})")
  if max_new_tokens < 1:
    raise ConfigError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ConfigError(f"generate: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                      f"temperature={temperature} top_k={top_k} top_p={top_p}")
  leaves, name = jax.tree_util.tree_leaves_with_path, jax.tree_util.keystr
  is_spec = lambda x: isinstance(x, model_lib.ParamSpec)  # noqa: E731
  want = {name(k): s.shape for k, s in leaves(model_lib.param_specs(model_cfg), is_leaf=is_spec)}
  got = {name(k): tuple(a.shape) for k, a in leaves(params)}
  extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
  if extra or missing:
    raise ConfigError(f"generate: params do not fit the model config (tie_embeddings="
                      f"{model_cfg.tie_embeddings}): unexpected {extra}, missing {missing}")
  for k, shape in want.items():
    if got[k] != shape:
      raise ConfigError(f"generate: param {k} has shape {got[k]}, the model config needs {shape}")


def generate(model_cfg: model_lib.ModelConfig, params, prompts: Sequence[np.ndarray], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_ids: Sequence[int] = ()) -> list[np.ndarray]:
  """New token ids per prompt: at most max_new_tokens, ending with the first stop id
  generated (included). temperature 0 is greedy (deterministic, top_k/top_p unused);
  top_k 0 and top_p 1 are off. Computes in model_cfg.compute_dtype. Bad input raises
  `ConfigError` with one line."""
  prompts = [np.asarray(p) for p in prompts]
  _check(model_cfg, params, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids)
  B = len(prompts)
  P = _bucket(max(p.size for p in prompts), _MIN_PROMPT_BUCKET)
  n_out = _bucket(max_new_tokens, _MIN_NEW_BUCKET)
  tokens_BxP = np.zeros((B, P), np.int32)
  start_B = np.array([P - p.size for p in prompts], np.int32)
  for b, p in enumerate(prompts):
    tokens_BxP[b, start_B[b]:] = p
  sampler = _Sampler(greedy=temperature == 0, top_k=min(top_k, model_cfg.vocab_size),
                     top_p=top_p < 1.0)
  out_BxN = _generate_padded(
      params, tokens_BxP, start_B, np.int32(max_new_tokens), np.float32(temperature or 1.0),
      np.float32(top_p), np.asarray(stop_ids, np.int32).reshape(-1), jax.random.key(seed),
      cfg=model_cfg, max_len=P + n_out, n_out=n_out, sampler=sampler)
  out_BxN = np.asarray(out_BxN)[:, :max_new_tokens]
  results = []
  for row in out_BxN:
    stops = np.flatnonzero(np.isin(row, stop_ids))
    results.append(row[:stops[0] + 1] if stops.size else row)
  return results


def complete(model_cfg: model_lib.ModelConfig, params, tokenizer, prompts: Sequence[str], *,
             max_new_tokens: int, **sampling) -> list[str]:
  """Text continuations of text `prompts`, each the start of a document (after BOS, as the
  data pipeline starts documents in training); generation stops at the tokenizer's EOS.
  `sampling`: `generate`'s temperature, top_k, top_p and seed."""
  ids = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(p)]).astype(np.int32)
         for p in prompts]
  new = generate(model_cfg, params, ids, max_new_tokens=max_new_tokens,
                 stop_ids=(tokenizer.eos_id,), **sampling)
  return [tokenizer.decode(n) for n in new]
