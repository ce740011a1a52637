"""Training throughput and MFU of a preset against this machine's measured matmul peak.

  python -m experiments.benchmarks.train_throughput --preset=small          # CPU target
  python -m experiments.benchmarks.train_throughput --preset=1b --dtype=bfloat16 \
      --batch=16 --seq_len=2048 --remat=dots_no_batch                        # GPU target

  python -m experiments.benchmarks.train_throughput --preset=7b --batch=4 --remat=full \
      --compile_only                                 # memory of the compiled step, no run

Both numbers come from this run on the same machine: first the sustained rate of a large
square matmul in the compute dtype (the practical peak), then the jitted train step of
the preset (forward, backward, AdamW update) on packed batches. Prints tokens/s, achieved
FLOP/s, MFU against the measured peak and, on accelerators, against the spec-sheet peak,
and the memory the step needs: the compiled program's buffers (any platform) and the
device's peak (where the device reports it).
Targets: `small` on CPU >= 0.50 of the measured fp32 matmul peak (issue 2); on one H200,
1b >= 0.55 MFU against the spec peak and >= 0.68 against the measured matmul peak, 350m
>= 0.45, 125m >= 0.40 (issue 16).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from experiments.configs import lm
from tapestry_jax import attention
from tapestry_jax import metrics as metrics_lib
from tapestry_jax import model as model_lib
from tapestry_jax import sharding
from tapestry_jax import train as train_lib

_PRESET = flags.DEFINE_string("preset", "small", "Model preset (tapestry_jax.model.PRESETS).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch in sequences (0 = the preset's config).")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Sequence length (0 = the preset's config).")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype (default: float32 on CPU, else bfloat16).")
_REMAT = flags.DEFINE_string("remat", "", "Remat policy override (none|full|dots|dots_no_batch).")
_SCAN = flags.DEFINE_enum("scan_layers", "", ["", "true", "false"],
                          "Scan over layers (default: the preset config's setting).")
_ATTENTION = flags.DEFINE_string("attention", "", "model.attention override (attention.py).")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", -1, "model.loss_chunk override (-1 = config).")
_MICRO = flags.DEFINE_integer("microbatches", 0, "train.microbatches override (0 = config).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the step from abstract shapes (nothing allocated) and "
    "print its memory; no matmul peak, no steps.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "Side of the peak matmul (0 = 2048 on CPU, 8192 else).")
_JSON = flags.DEFINE_string("json_out", "", "Also write the results here.")


def _packed_batch(rng, B, L, vocab, docs_per_row=4):
  """Random tokens packed as `docs_per_row` documents per row (real masking work)."""
  tokens = rng.integers(3, min(vocab, 259), size=(B, L + 1)).astype(np.int32)
  doc = np.minimum(np.arange(L) * docs_per_row // L, docs_per_row - 1)
  starts = np.searchsorted(doc, np.arange(docs_per_row))
  pos = (np.arange(L) - starts[doc]).astype(np.int32)
  seg = (doc + 1).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.tile(seg, (B, 1)),
              positions=np.tile(pos, (B, 1)), target_bytes=np.ones((B, L), np.int32))


def main(argv):
  del argv
  devices = jax.devices()
  platform = devices[0].platform
  config = lm.get_config(_PRESET.value)
  dtype = _DTYPE.value or ("float32" if platform == "cpu" else "bfloat16")
  config.model.compute_dtype = dtype
  if _REMAT.value:
    config.model.remat = _REMAT.value
  if _SCAN.value:
    config.model.scan_layers = _SCAN.value == "true"
  if _ATTENTION.value:
    config.model.attention = _ATTENTION.value
  if _LOSS_CHUNK.value >= 0:
    config.model.loss_chunk = _LOSS_CHUNK.value
  if _MICRO.value:
    config.train.microbatches = _MICRO.value
  B = _BATCH.value or config.train.global_batch_size
  L = _SEQ.value or config.data.seq_len
  mcfg = model_lib.ModelConfig.from_config(config.model)
  mcfg.validate()
  if _COMPILE_ONLY.value:
    _compile_only(config, mcfg, B, L, devices)
    return

  # 1. The machine's practical peak, measured now.
  n = _MATMUL_N.value or (2048 if platform == "cpu" else 8192)
  matmul_peak = metrics_lib.measure_matmul_peak(jnp.dtype(dtype), n=n, seconds=3.0)
  matmul_peak_total = matmul_peak * (1 if platform == "cpu" else len(devices))
  spec_peak = None if platform == "cpu" else metrics_lib.peak_flops(dtype, devices)

  # 2. The train step of the preset.
  tcfg = ml_collections.ConfigDict(dict(config.train))
  tcfg.global_batch_size = B
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  trainer = train_lib.Trainer(mcfg, tcfg, mesh)
  state = trainer.init_state(0)
  rng = np.random.default_rng(0)
  batches = [trainer.shard_batch(_packed_batch(rng, B, L, mcfg.vocab_size)) for _ in range(2)]
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    for i in range(2):
      state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(_STEPS.value):
      state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / _STEPS.value

  tokens = B * L
  flops = model_lib.flops_per_token(mcfg, L) * tokens
  achieved = flops / step_s
  device_peak = (devices[0].memory_stats() or {}).get("peak_bytes_in_use")
  result = {
      "device": f"{len(devices)} x {devices[0].device_kind}",
      "preset": _PRESET.value, "params": model_lib.count_params(mcfg), "batch": B, "seq_len": L,
      "compute_dtype": dtype, "remat": mcfg.remat, "scan_layers": mcfg.scan_layers, "compile_s": round(compile_s, 1),
      "step_s": step_s, "tokens_per_s": tokens / step_s, "achieved_tflops": achieved / 1e12,
      "matmul_peak_tflops": matmul_peak_total / 1e12, "matmul_n": n,
      "ratio_vs_measured_matmul_peak": achieved / matmul_peak_total,
      "mfu_vs_spec_peak": (achieved / spec_peak) if spec_peak else None,
      "final_loss": float(m["loss"]),
      "attention": attention.resolve(mcfg.attention), "loss_chunk": mcfg.loss_chunk,
      "microbatches": int(tcfg.microbatches),
      "compiled_memory_gib": _compiled_bytes(compiled) / 2**30,
      "device_peak_memory_gib": device_peak / 2**30 if device_peak else None,
  }
  _print(result)


def _compiled_bytes(compiled) -> float:
  """Bytes the compiled step holds at its peak: arguments, outputs (less the donated
  buffers they reuse) and temporaries, by XLA's buffer assignment for this platform."""
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes)


def _compile_only(config, mcfg, B, L, devices):
  tcfg = ml_collections.ConfigDict(dict(config.train))
  tcfg.global_batch_size = B
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  trainer = train_lib.Trainer(mcfg, tcfg, mesh)
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=trainer.batch_sharding)
           for k in train_lib.BATCH_KEYS}
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
  _print({"device": f"{len(devices)} x {devices[0].device_kind}", "preset": _PRESET.value,
          "params": model_lib.count_params(mcfg), "batch": B, "seq_len": L,
          "compute_dtype": mcfg.compute_dtype, "remat": mcfg.remat,
          "attention": attention.resolve(mcfg.attention), "loss_chunk": mcfg.loss_chunk,
          "microbatches": int(tcfg.microbatches), "compile_s": time.perf_counter() - t0,
          "compiled_memory_gib": _compiled_bytes(compiled) / 2**30})


def _print(result):
  for k, v in result.items():
    print(f"{k:>30}: {v:.4g}" if isinstance(v, float) else f"{k:>30}: {v}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
