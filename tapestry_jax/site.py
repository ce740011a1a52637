"""A sovereign site in the federation: its trainer, data and state across rounds.

`SiteWorker` is the part shared by the in-process simulation and the deployed site
process: adopt a global model (keeping the site's own optimizer state and data
position; under outer "moments" the global Adam moments and step count replace the
site's, `outer.SharedMoments`), train H inner steps, and produce the pseudo-gradient
`global - local` (under "moments", with the site's first moment).
`run_site` is the deployed loop: it reads committed global rounds from the coordinator's
bucket straight into this site's mesh, after verifying the coordinator's signature and
refusing a round that goes backwards (rollback); publishes each update, signed with the
site's key, to the site's OWN bucket (arrays, manifest, commit marker last); and
checkpoints after every publish. A killed site resumes from its last checkpoint without
skipping or repeating data: if it was killed after committing an update but before that
round's checkpoint landed, it trains that round again from the same global round and data
position (deterministic, so the committed update stays valid) before it moves on.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import data_pipelines
from tapestry_jax import buckets
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import loop
from tapestry_jax import outer as outer_lib
from tapestry_jax import train as train_lib
from tapestry_jax import trees


class SiteWorker:
  """One site's compiled trainer, data iterator, train state and round bookkeeping."""

  def __init__(self, config, name: str, workdir: str, *, devices=None,
               trainer: train_lib.Trainer | None = None, reference: bool = False):
    self.name = name
    # reference: the plain `train` recipe (the site alone), not the federated inner one.
    self.config = federation.site_config(config, name, reference=reference)
    self.config_full = config  # The federation config (what and how this site sends).
    self.workdir = workdir
    if trainer is None:
      _, trainer = loop.site_setup(self.config, devices)
    self.trainer = trainer
    self.mesh = trainer.mesh
    t = self.config.train
    self.tokens_per_step = int(t.global_batch_size) * int(self.config.data.seq_len)
    local_batch = int(t.global_batch_size) // jax.process_count()
    self.train_iter = iter(data_pipelines.make_dataset(
        self.config.data, split="train", batch_size=local_batch, seed=self.config.data.seed))
    self.state = trainer.init_state(int(t.seed))
    self.base = None  # The global params the current inner phase started from.
    self._ckpt = None
    self._delta = jax.jit(outer_lib.pseudo_gradient, out_shardings=trainer.param_shardings)
    # Error feedback (federation.error_feedback, for bfloat16 / int8 updates): what
    # encoding lost from this site's updates so far, added to its next one. Part of the
    # site's checkpoint, so a restarted site sends the same updates.
    self.error_feedback = federation.error_feedback(config) and not reference
    self.residual = (jax.tree.map(lambda p, s: jnp.zeros(p.shape, jnp.float32, device=s),
                                  self.state.params, trainer.param_shardings)
                     if self.error_feedback else None)
    self._carry = jax.jit(lambda d, r: jax.tree.map(jnp.add, d, r),
                          out_shardings=trainer.param_shardings)
    self._lost = jax.jit(lambda x, sent: jax.tree.map(jnp.subtract, x, sent),
                         out_shardings=trainer.param_shardings)

  # ---------------------------------------------------------------- checkpoints

  @property
  def checkpointer(self) -> checkpoint_lib.Checkpointer:
    if self._ckpt is None:
      t = self.config.train
      self._ckpt = checkpoint_lib.Checkpointer(
          os.path.join(self.workdir, "checkpoints"), save_every=1,
          keep=int(t.keep_checkpoints), async_save=bool(t.async_checkpoints))
    return self._ckpt

  def restore(self) -> dict | None:
    """Restores the latest checkpoint (state, data position, meta); None if there is none."""
    step = self.checkpointer.latest_step()
    if step is None:
      return None
    abstract = self.trainer.abstract_state()
    if self.residual is None:
      self.state = self.checkpointer.restore(step, abstract, self.train_iter)
    else:
      target = {"train": abstract, "residual": jax.tree.map(
          lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding),
          abstract.params)}
      restored = self.checkpointer.restore(step, target, self.train_iter)
      self.state, self.residual = restored["train"], restored["residual"]
    return self.checkpointer.restore_meta(step)

  def save(self, meta: dict) -> None:
    state = (self.state if self.residual is None
             else {"train": self.state, "residual": self.residual})
    self.checkpointer.save(int(self.state.step), state, self.train_iter, force=True, meta=meta)

  def close(self) -> None:
    if self._ckpt is not None:
      self._ckpt.wait()
      self._ckpt.close()

  # ---------------------------------------------------------------- rounds

  def adopt(self, params, moments: dict[str, Any] | None = None) -> None:
    """Replaces the params by the global model (any host or device arrays), keeping the
    optimizer state, step, PRNG key and data position; remembers it as the base.

    `moments` (outer "moments" only): the global outer state, {param name: its state
    leaves "count", "mu", "nu"} (or `outer.SharedMoments` states); they replace the
    inner AdamW's moments and the step count its bias correction and lr schedule use."""
    shardings = self.trainer.param_shardings
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    self.base = params
    state = self.state.replace(params=jax.tree.map(jnp.copy, params))
    if moments is not None:
      count, mu, nu = outer_lib.global_moments(moments)
      flat_shardings = trees.flatten(shardings)
      if sorted(mu) != sorted(flat_shardings):
        raise ValueError(f"site {self.name}: the global moments do not match the params")
      put = lambda flat: trees.unflatten(  # noqa: E731
          {n: jax.device_put(jnp.asarray(flat[n], jnp.float32), s)
           for n, s in flat_shardings.items()}, shardings)
      state = state.replace(opt_state=outer_lib.set_adam_state(
          state.opt_state, put(mu), put(nu),
          lambda: jax.device_put(jnp.asarray(count, jnp.int32), self.trainer.replicated)))
    self.state = state

  def train(self, steps: int) -> dict[str, Any]:
    """Runs `steps` inner steps; host reads the metrics once, at the end."""
    t0 = time.perf_counter()
    losses = []
    with jax.set_mesh(self.mesh):
      for _ in range(steps):
        batch = self.trainer.shard_batch(next(self.train_iter))
        self.state, m = self.trainer.train_step(self.state, batch)
        losses.append(m["loss"])
      losses = [float(x) for x in jax.device_get(losses)]
    return {"train_loss": float(np.mean(losses)), "train_loss_last": losses[-1],
            "tokens": steps * self.tokens_per_step, "compute_s": time.perf_counter() - t0,
            "step": int(self.state.step)}

  def delta(self):
    """The pseudo-gradient `base - params` (float32, on this site's mesh)."""
    if self.base is None:
      raise RuntimeError("delta() before adopt(): the site has no global base")
    with jax.set_mesh(self.mesh):
      return self._delta(self.base, self.state.params)

  def encoded_update(self) -> dict[str, Any]:
    """This round's update as it is sent (`exchange.encode_update` of `delta()`, a flat
    dict). With error feedback, the residual is added first, and what the encoding loses
    of that sum becomes the next residual: over rounds, the site sends all of its
    updates. Call once per round."""
    delta = self.delta()
    if federation.shared_moments(self.config_full):
      mu = optax.tree_utils.tree_get(self.state.opt_state, "mu")
      sent = exchange.encode_update(delta, self.config_full)
      sent.update({exchange.moment_key(n): v for n, v in
                   exchange.encode_update(mu, self.config_full).items()})
      return sent
    if self.residual is None:
      return exchange.encode_update(delta, self.config_full)
    with jax.set_mesh(self.mesh):
      x = self._carry(delta, self.residual)
      sent = exchange.encode_update(x, self.config_full)
      decoded = trees.unflatten(exchange.decode_update(sent), x)
      self.residual = self._lost(x, decoded)
    return sent

  def evaluate(self, params=None) -> dict[str, float]:
    """Held-out metrics of `params` (default: the current params) on this site's data."""
    params = self.state.params if params is None else params
    with jax.set_mesh(self.mesh):
      return train_lib.evaluate(self.trainer, params, loop.eval_batches(self.config))


# -------------------------------------------------------------------- deployment

def _wait(what: str, poll: Callable[[], Any], timeout_s: float, poll_s: float):
  """Polls until `poll()` returns non-None; logs while waiting; raises after timeout."""
  t0 = last_log = time.monotonic()
  while True:
    out = poll()
    if out is not None:
      return out
    now = time.monotonic()
    if now - t0 > timeout_s:
      raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
    if now - last_log > 30:
      logging.info("still waiting for %s (%.0f s)", what, now - t0)
      last_log = now
    time.sleep(poll_s)


def _unsaved_base(own: buckets.Bucket, glob: buckets.Bucket, last_base: int) -> int | None:
  """The global round that this site's oldest committed update newer than its checkpoint
  was trained from; None if there is none.

  A site killed after publishing an update and before that round's checkpoint landed
  must train that round again, from the same global round and the restored data
  position (the publish keeps the committed update): moving on to the newest global
  instead would train it on data already used and lose the round from the site's state.
  Updates are only ever published for rounds up to LATEST + 1, so few are looked at."""
  latest = exchange.read_latest(glob)
  for r in range(last_base + 2, (latest if latest is not None else -1) + 2):
    manifest = exchange.read_manifest(own, exchange.update_prefix(r))
    if manifest is not None:
      return int(manifest["base_round"])
  return None


def run_site(config, name: str, workdir: str, *, devices=None, private_key: str | None = None,
             credentials: str | None = None) -> list[dict]:
  """The deployed site: loops over global rounds until the last one, then evaluates it.

  `private_key`: this site's key file (default WORKDIR/keys/NAME.key); `credentials`: its
  own S3 credentials ('env', a credentials file, or None for TensorStore's default chain).

  Writes `WORKDIR/sites/NAME/rounds.jsonl` (one record per global model it trained
  from: eval of that global on this site's held-out data, train loss, compute and
  exchange seconds, bytes up and down). Returns the records of this run."""
  federation.check_federation_config(config, devices, site=name)
  f = config.federation
  root, signer = federation.party_trust(config, name, workdir, private_key)
  urls = federation.bucket_urls(config, workdir)
  retries = int(f.storage_retries)
  own = buckets.Bucket(urls[name], max_retries=retries, credentials=credentials)
  glob = buckets.Bucket(urls[federation.GLOBAL], max_retries=retries, credentials=credentials)
  own.check_writable()
  site_dir = os.path.join(workdir, "sites", name)
  os.makedirs(site_dir, exist_ok=True)
  worker = SiteWorker(config, name, site_dir, devices=devices)
  meta = worker.restore()
  last_base = meta["base_round"] if meta else -1
  if meta:
    logging.info("site %s: resumed at step %d (trained from global round %d)", name,
                 int(worker.state.step), last_base)
  schema = federation.param_schema(config)  # Once, not per round.
  records = []
  out = open(os.path.join(site_dir, "rounds.jsonl"), "a")
  replaying = True  # Until no update published before a lost checkpoint is left.
  try:
    while True:
      t_wait = time.perf_counter()
      g = _unsaved_base(own, glob, last_base) if replaying else None
      replaying = g is not None
      if replaying:
        logging.info("site %s: its update trained from global round %d is committed but "
                     "its checkpoint was lost; training that round again", name, g)
      else:
        g = _wait(f"a global round newer than {last_base} in {glob.url}",
                  lambda: exchange.newer_global_round(glob, last_base), float(f.site_wait_s), float(f.poll_s))
      wait_s = time.perf_counter() - t_wait
      read0, t_read = glob.bytes_read, time.perf_counter()
      params, moments, _ = exchange.read_global_round(glob, config, g, worker.trainer.param_shardings,
                                             schema, root=root, last_round=last_base)
      worker.adopt(params, moments)
      read_s = time.perf_counter() - t_read
      t_eval = time.perf_counter()
      rec = {"site": name, "global_round": g, "wait_s": wait_s, "read_s": read_s,
             "bytes_down": glob.bytes_read - read0}
      if federation.evaluate_round(config, g):
        rec.update(worker.evaluate(), eval_s=time.perf_counter() - t_eval)
      if g >= int(f.rounds):
        records.append(rec)
        out.write(json.dumps(rec) + "\n")
        break
      rec.update(worker.train(int(f.inner_steps)))
      write0, t_pub = own.bytes_written, time.perf_counter()
      try:
        sent = worker.encoded_update()
      except ValueError:  # int8: a NaN or Inf leaves nothing to quantize.
        raise exchange.diverged(name, g + 1) from None
      exchange.publish_update(own, config, name, g + 1, g, sent, rec["tokens"],
                     extra={"train_loss": rec["train_loss"], "step": rec["step"]},
                     signer=signer)
      rec.update(publish_s=time.perf_counter() - t_pub, bytes_up=own.bytes_written - write0)
      worker.save({"base_round": g, "published_round": g + 1})
      last_base = g
      records.append(rec)
      out.write(json.dumps(rec) + "\n")
      out.flush()
      logging.info("site %s: round %d published (train loss %.4f)", name, g + 1,
                   rec["train_loss"])
  finally:
    out.close()
    worker.close()
  return records
