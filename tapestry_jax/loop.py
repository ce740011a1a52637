"""The site training loop: data -> train steps -> metrics, evaluation, checkpoints.

`train_and_evaluate(config, workdir)` is what `launch/train.py` calls. A rerun with the
same workdir resumes from the latest checkpoint (params, optimizer state, step, PRNG key
and data position), and continues bit-for-bit as if never interrupted.

Many processes (a site of many hosts): every process runs this same function; the data
is `data.shards` streams split over the processes (the same global batches on any
process count), every process writes its checkpoint shards, and process 0 alone writes
metrics, config.json, final_metrics.json, the plots (plots.py) and the progress bar. A
SIGTERM to any process (preemption.py) stops all of them at one agreed step with a
checkpoint.

Host/device overlap: step t is dispatched before step t-1's metrics are read, so the
host never waits on the device except when a metrics line, an eval or a checkpoint is
due.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import jax
from absl import logging
from tqdm import tqdm

import data_pipelines
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import metrics as metrics_lib
from tapestry_jax import model as model_lib
from tapestry_jax import plots
from tapestry_jax import preemption as preemption_lib
from tapestry_jax import sharding
from tapestry_jax import train as train_lib
from tapestry_jax import validate


def site_setup(config, devices=None):
  """Checks the config, builds the mesh and the compiled trainer (no data, no state)."""
  validate.check_site_config(config, devices)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  mcfg = model_lib.ModelConfig.from_config(config.model)
  return mesh, train_lib.Trainer(mcfg, config.train, mesh)


def eval_batches(config, split: str = "eval"):
  """The fixed held-out batches one evaluation runs over (same every time, and the same
  on any process count for a fixed data.shards)."""
  it = data_pipelines.make_iterator(config.data, split=split, seed=config.data.seed,
                                    global_batch_size=config.train.global_batch_size)
  n = int(config.train.eval_batches)
  return itertools.islice(it, n) if n > 0 else it


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Trains `config.train.steps` steps (resuming if WORKDIR has a checkpoint).

  `stop_at_step` ends the run early without a final checkpoint or evaluation, the way
  a killed job would (used by the resume tests). A SIGTERM ends it at a step all
  processes agree on, with a checkpoint there and no evaluation (`preempted` in the
  result). Returns the last train and eval metrics."""
  data_pipelines.shards.num_streams(config.data, config.train.global_batch_size)
  mesh, trainer = site_setup(config, devices)
  t = config.train
  primary = jax.process_index() == 0
  logging.info("site mesh %s on %d %s devices", dict(mesh.shape), mesh.size,
               mesh.devices.flat[0].platform)

  train_iter = data_pipelines.make_iterator(config.data, split="train", seed=config.data.seed,
                                            global_batch_size=t.global_batch_size)
  ckpt = checkpoint_lib.Checkpointer(t.get("checkpoint_dir", "") or os.path.join(workdir, "checkpoints"),
                                     t.checkpoint_every, t.keep_checkpoints, t.async_checkpoints)
  start = ckpt.latest_step()
  if start is None:
    start, state = 0, trainer.init_state(t.seed)
  else:
    logging.info("resuming from checkpoint at step %d", start)
    state = ckpt.restore(start, trainer.abstract_state(), train_iter)
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  writer = metrics_lib.MetricWriter(workdir, enabled=primary)
  tokens_per_step = t.global_batch_size * config.data.seq_len
  flops_per_step = model_lib.flops_per_token(trainer.model_cfg, config.data.seq_len) * tokens_per_step
  peak = float(t.peak_flops) or metrics_lib.peak_flops(trainer.model_cfg.compute_dtype,
                                                       list(mesh.devices.flat))
  bar = tqdm(total=t.steps, initial=start, disable=not (t.progress_bar and primary),
             unit="step", dynamic_ncols=True)

  window = {"step": start, "time": time.perf_counter()}
  last: dict[str, Any] = {}

  def flush(step: int, device_metrics) -> None:
    """Reads one step's metrics (the device has finished it by now) and writes them."""
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    steps, seconds = step - window["step"], now - window["time"]
    if steps > 0 and seconds > 0:
      host["tokens_per_s"] = steps * tokens_per_step / seconds
      host["step_time_s"] = seconds / steps
      if peak:
        host["mfu"] = steps * flops_per_step / seconds / peak
    window.update(step=step, time=now)
    writer.write(step, host)
    bar.set_postfix(loss=f"{host['loss']:.3f}", refresh=False)
    last["train"] = host

  def run_eval(step: int) -> None:
    result = train_lib.evaluate(trainer, state.params, eval_batches(config))
    writer.write(step, result)
    logging.info("step %d: eval loss %.4f, bits/byte %.4f", step, result["eval_loss"],
                 result["eval_bits_per_byte"])
    last["eval"] = result
    window["time"] = time.perf_counter()  # Eval time is not training throughput.

  pending = None
  step = start
  preempt = preemption_lib.Preemption()
  preempted = False
  try:
    with jax.set_mesh(mesh):
      while step < t.steps:
        if stop_at_step is not None and step >= stop_at_step:
          break
        state, step_metrics = trainer.train_step(state, trainer.shard_batch(next(train_iter)))
        step += 1
        if pending is not None:
          flush(*pending)
        pending = (step, step_metrics) if (step % t.log_every == 0 or step == t.steps) else None
        preempted = preempt.should_stop(step)
        ckpt.save(step, state, train_iter, force=step == t.steps or preempted)
        if preempted:
          logging.warning("preempted at step %d: saving a checkpoint", step)
          break
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
          run_eval(step)
        bar.update(1)
      if pending is not None:
        flush(*pending)
      if stop_at_step is None and not preempted:
        run_eval(step)
  finally:
    preempt.close()
  bar.close()
  ckpt.wait()
  ckpt.close()
  writer.close()
  if primary and stop_at_step is None and not preempted:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **last}, f, indent=2)
    plots.plot_run_or_warn(workdir)
  return {"step": step, "state": state, "preempted": preempted, **last}
