"""The chunked output-layer loss against the whole-logits formula, in values and
gradients (with z-loss, tied and untied embeddings), and that it never holds the
whole B x L x V logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapestry_jax import losses
from tapestry_jax import model as model_lib


def _batch(B, L, V, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (B, L + 1)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[0, L // 2:] = 2
  seg[1, -5:] = 0
  pos = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(B, 0)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
              positions=pos.astype(np.int32))


def _whole_logits_losses(params, batch, cfg):
  """token_losses as it was before chunking: the B x L x V logits, then logsumexp."""
  logits = model_lib.forward(params, batch["inputs"], batch["positions"], batch["segment_ids"], cfg)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  mask = (batch["segment_ids"] > 0).astype(jnp.float32)
  return (logz - target) * mask, cfg.z_loss * jnp.square(logz) * mask, mask


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [0, 16, 24])
def test_chunked_loss_matches_the_whole_logits_in_values_and_gradients(tie, chunk):
  cfg = model_lib.ModelConfig(tie_embeddings=tie, z_loss=1e-3, loss_chunk=chunk)
  assert model_lib.loss_chunk_len(cfg, 64) == {0: 64, 16: 16, 24: 16}[chunk]
  params = model_lib.init_params(cfg, jax.random.key(0))
  batch = _batch(2, 64, cfg.vocab_size)

  def total(fn):
    return lambda p: sum(x.sum() for x in fn(p, batch, cfg)[:2])

  want, g_want = jax.value_and_grad(total(_whole_logits_losses))(params)
  got, g_got = jax.jit(jax.value_and_grad(total(model_lib.token_losses)))(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(_assert_close, g_got, g_want)


def _assert_close(got, want, rel=1e-5):
  """Close as a whole array: float32 summation order alone moves a few elements of a
  gradient by ~1e-4 of their own size (as jit against no jit of the same formula does)."""
  assert float(jnp.linalg.norm(got - want)) <= rel * float(jnp.linalg.norm(want))


def test_bf16_compute_stays_close_to_float32():
  cfg32 = model_lib.ModelConfig(loss_chunk=16)
  cfg16 = model_lib.ModelConfig(loss_chunk=16, compute_dtype="bfloat16")
  params = model_lib.init_params(cfg32, jax.random.key(1))
  batch = _batch(2, 64, cfg32.vocab_size, seed=1)
  ce32 = model_lib.token_losses(params, batch, cfg32)[0].sum()
  ce16 = jax.jit(lambda p: model_lib.token_losses(p, batch, cfg16)[0].sum())(params)
  np.testing.assert_allclose(ce16, ce32, rtol=2e-2)


def test_no_whole_logits_tensor_is_ever_built():
  """In the compiled gradient, no array has all L positions and the vocabulary; with one
  chunk (loss_chunk=0) there is (the test can fail)."""
  B, L, D, V = 4, 256, 32, 1024
  x = jax.ShapeDtypeStruct((B, L, D), jnp.float32)
  w = jax.ShapeDtypeStruct((D, V), jnp.float32)
  t = jax.ShapeDtypeStruct((B, L), jnp.int32)

  def hlo(chunk_len):
    loss = lambda x, w, t: sum(a.sum() for a in losses.logsumexp_and_target(x, w, t, chunk_len))
    return jax.jit(jax.grad(loss, (0, 1))).lower(x, w, t).compile().as_text()

  whole = f"f32[{B},{L},{V}]"
  assert whole in hlo(L)
  assert whole not in hlo(32) and f"f32[{B},32,{V}]" in hlo(32)
