"""Generation with a KV cache: cached logits equal the full forward's, greedy equals the
recomputed argmax, batching, sampling support, seeds, stop ids, one compile per bucket."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapestry_jax import decode
from tapestry_jax import generate as generate_lib
from tapestry_jax import model as model_lib
from tapestry_jax.validate import ConfigError

CFG = model_lib.ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=16, d_ff=128)
PARAMS = model_lib.init_params(CFG, jax.random.key(0))
generate = generate_lib.generate


def _prompts(*lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]


_forward = jax.jit(model_lib.forward, static_argnums=4)


def _full_logits(cfg, params, seqs, length=32):
  """model.forward over whole sequences, right-padded to one `length` (so one compile;
  padding comes after every real token, which the causal mask hides): logits_BxLxV."""
  tokens_BxL = np.zeros((len(seqs), length), np.int32)
  segments_BxL = np.zeros((len(seqs), length), np.int32)
  for b, s in enumerate(seqs):
    tokens_BxL[b, :len(s)] = s
    segments_BxL[b, :len(s)] = 1
  positions_BxL = np.tile(np.arange(length, dtype=np.int32), (len(seqs), 1))
  return np.asarray(_forward(params, tokens_BxL, positions_BxL, segments_BxL, cfg))


def _greedy_reference(cfg, params, prompt, n):
  """Greedy decoding by recomputing the full forward for every new token."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(_full_logits(cfg, params, [seq])[0, len(seq) - 1])))
  return np.asarray(seq[len(prompt):])


@pytest.mark.parametrize("kw", [
    dict(),  # scanned layers, GQA (2 query heads per kv head), untied embeddings
    dict(scan_layers=False, tie_embeddings=True),
    dict(n_kv_heads=1, tie_embeddings=True),  # multi-query
    dict(n_kv_heads=4, scan_layers=False, attention="xla")])  # jax.nn.dot_product_attention
def test_cached_logits_equal_full_forward_at_every_step(kw):
  cfg = dataclasses.replace(CFG, **kw)
  params = model_lib.init_params(cfg, jax.random.key(1))
  prompts = _prompts(7, 4)
  P, steps = 8, 6
  start_B = jnp.asarray([P - len(p) for p in prompts], jnp.int32)
  tokens_BxP = np.zeros((2, P), np.int32)
  for b, p in enumerate(prompts):
    tokens_BxP[b, P - len(p):] = p
  extend = jax.jit(decode.extend, static_argnums=3)
  step = jax.jit(decode.step, static_argnums=3)

  new_BxT = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, steps)).astype(np.int32)
  want_BxLxV = _full_logits(cfg, params, [np.concatenate([p, n]) for p, n in zip(prompts, new_BxT)])

  cache = decode.init_cache(cfg, start_B, max_len=P + steps)
  logits_BxPxV, cache = extend(params, cache, tokens_BxP, cfg)
  last_BxV, _ = jax.jit(decode.prefill, static_argnums=(3, 4))(params, tokens_BxP, start_B,
                                                               P + steps, cfg)
  np.testing.assert_allclose(last_BxV, logits_BxPxV[:, -1], rtol=1e-5, atol=1e-5)
  for b, p in enumerate(prompts):
    np.testing.assert_allclose(logits_BxPxV[b, P - len(p):], want_BxLxV[b, :len(p)],
                               rtol=1e-5, atol=1e-5)
  for t in range(steps):
    logits_BxV, cache = step(params, cache, new_BxT[:, t], cfg)
    for b, p in enumerate(prompts):
      np.testing.assert_allclose(logits_BxV[b], want_BxLxV[b, len(p) + t], rtol=1e-5, atol=1e-5)
  assert int(cache.length) == P + steps


def test_greedy_equals_recomputed_argmax_and_is_deterministic():
  prompts = _prompts(6, 13)
  out = generate(CFG, PARAMS, prompts, max_new_tokens=12)
  for p, o in zip(prompts, out):
    np.testing.assert_array_equal(o, _greedy_reference(CFG, PARAMS, p, 12))
  again = generate(CFG, PARAMS, prompts, max_new_tokens=12)
  for o, a in zip(out, again):
    np.testing.assert_array_equal(o, a)


def test_batched_prompts_of_different_lengths_equal_each_alone():
  prompts = _prompts(3, 11, 20, seed=3)  # buckets: 16 alone for two, 32 together
  together = generate(CFG, PARAMS, prompts, max_new_tokens=10)
  for p, t in zip(prompts, together):
    np.testing.assert_array_equal(t, generate(CFG, PARAMS, [p], max_new_tokens=10)[0])


def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature():
  prompts = _prompts(5, 9, seed=4)
  greedy = generate(CFG, PARAMS, prompts, max_new_tokens=8)
  for kw in [dict(temperature=0.7, top_k=1), dict(temperature=5.0, top_k=1, seed=3),
             dict(temperature=5.0, top_p=1e-6)]:
    for g, s in zip(greedy, generate(CFG, PARAMS, prompts, max_new_tokens=8, **kw)):
      np.testing.assert_array_equal(s, g, err_msg=str(kw))


def _allowed(logits_V, temperature, top_k, top_p):
  """The sampling support, computed from the logits in numpy."""
  order = np.argsort(-logits_V)
  if top_k:
    order = order[:top_k]
  probs = np.exp((logits_V[order] - logits_V[order[0]]) / temperature)
  probs /= probs.sum()
  n = np.searchsorted(np.cumsum(probs), top_p) + 1 if top_p < 1 else len(order)
  return set(order[:n].tolist())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (2.0, 0, 0.3), (1.5, 40, 0.5)])
def test_top_k_and_top_p_restrict_the_sampled_support(temperature, top_k, top_p):
  rows, steps = 64, 3
  prompt = _prompts(6, seed=5)[0]
  out = generate(CFG, PARAMS, [prompt] * rows, max_new_tokens=steps, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=7)
  seqs_BxL = np.stack([np.concatenate([prompt, o]) for o in out])
  logits_BxLxV = _full_logits(CFG, PARAMS, seqs_BxL, length=seqs_BxL.shape[1])
  for t in range(steps):
    at = len(prompt) + t
    for b in range(rows):
      allowed = _allowed(logits_BxLxV[b, at - 1], temperature, top_k, top_p)
      assert seqs_BxL[b, at] in allowed, (t, b, len(allowed))
  first = {int(o[0]) for o in out}
  assert len(first) > 1, "64 samples from a support of several tokens were all the same"
  assert first <= _allowed(logits_BxLxV[0, len(prompt) - 1], temperature, top_k, top_p)


def test_seed_reproduces_and_a_different_seed_differs():
  prompts = _prompts(4, 7, 5, 8, seed=6)
  a = generate(CFG, PARAMS, prompts, max_new_tokens=8, temperature=1.0, seed=1)
  b = generate(CFG, PARAMS, prompts, max_new_tokens=8, temperature=1.0, seed=1)
  c = generate(CFG, PARAMS, prompts, max_new_tokens=8, temperature=1.0, seed=2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_stop_ids_end_each_row_at_its_first_stop():
  prompts = _prompts(5, 10, seed=8)
  full = generate(CFG, PARAMS, prompts, max_new_tokens=16)
  stop = int(full[0][4])
  out = generate(CFG, PARAMS, prompts, max_new_tokens=16, stop_ids=[stop, CFG.vocab_size - 1])
  for f, o in zip(full, out):
    hits = np.flatnonzero(np.isin(f, [stop, CFG.vocab_size - 1]))
    want = f[:hits[0] + 1] if hits.size else f
    np.testing.assert_array_equal(o, want)
  assert len(out[0]) <= 5 and out[0][-1] == stop


def test_one_compile_per_bucket_not_per_token(monkeypatch):
  traces = []
  real_step = decode.step

  def counting_step(*args, **kwargs):
    traces.append(1)  # Runs once per trace of the decode loop, never per executed token.
    return real_step(*args, **kwargs)

  monkeypatch.setattr(decode, "step", counting_step)
  jax.clear_caches()
  prompts = _prompts(6, 9, 4, 12, 7, seed=9)  # 5 rows: a batch size no other test uses
  five = generate(CFG, PARAMS, prompts, max_new_tokens=5)
  assert len(traces) == 1
  twenty = generate(CFG, PARAMS, prompts, max_new_tokens=20)
  generate(CFG, PARAMS, _prompts(3, 16, 1, 2, 5, seed=10), max_new_tokens=9)  # same buckets
  assert len(traces) == 1, "generation recompiled for a new length within its buckets"
  assert [len(x) for x in five] == [5] * 5 and [len(x) for x in twenty] == [20] * 5
  for f, t in zip(five, twenty):
    np.testing.assert_array_equal(f, t[:5])
  generate(CFG, PARAMS, _prompts(17, 2, 3, 4, 5), max_new_tokens=5)  # prompt bucket 32
  assert len(traces) == 2


def test_bfloat16_compute_caches_in_bfloat16():
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
  start_B = jnp.zeros((1,), jnp.int32)
  _, cache = decode.prefill(PARAMS, jnp.ones((1, 4), jnp.int32), start_B, 8, cfg)
  assert cache.k_NxBxSxKxDh.dtype == jnp.bfloat16
  out = generate(cfg, PARAMS, _prompts(5, 3), max_new_tokens=4, temperature=1.0)
  assert [len(o) for o in out] == [4, 4]


@pytest.mark.parametrize("prompts,kw,message", [
    ([np.array([1, 2, 384])], {}, "outside [0, 384)"),
    ([np.array([], np.int32)], {}, "non-empty"),
    ([np.array([1, 2])], dict(max_new_tokens=0), "max_new_tokens=0"),
    ([np.array([1, 2])], dict(top_p=0.0), "top_p"),
])
def test_bad_input_is_one_clear_error(prompts, kw, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    generate(CFG, PARAMS, prompts, **{"max_new_tokens": 4, **kw})


def test_params_of_another_model_are_a_clear_error():
  other = dataclasses.replace(CFG, d_model=32)
  with pytest.raises(ConfigError, match=r"param \['embed'\] has shape \(384, 64\)"):
    generate(other, PARAMS, _prompts(3), max_new_tokens=2)
  with pytest.raises(ConfigError, match=re.escape(str(["['unembed']"]) + ", missing []")):
    generate(dataclasses.replace(CFG, tie_embeddings=True), PARAMS, _prompts(3), max_new_tokens=2)
