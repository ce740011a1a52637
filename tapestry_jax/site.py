"""A sovereign site in the federation: its trainer, data and state across rounds.

`SiteWorker` is the part shared by the in-process simulation and the deployed site
process: adopt a global model (keeping the site's own optimizer state and data
position; under outer "moments" the global Adam moments and step count replace the
site's, `outer.SharedMoments`), train H inner steps, and produce the pseudo-gradient
`global - local` (under "moments", with the site's first moment).
`run_site` is the deployed loop: it reads committed global rounds from the coordinator's
bucket straight into this site's mesh, after verifying the coordinator's signature and
refusing a round that goes backwards (rollback); with `federation.download_dtype` on, only
a round's small encoded download when it holds the previous round (`read_global`). It
publishes each update, signed with the
site's key, to the site's OWN bucket (arrays, manifest, commit marker last); and
checkpoints after every publish. A killed site resumes from its last checkpoint without
skipping or repeating data: if it was killed after committing an update but before that
round's checkpoint landed, it trains that round again from the same global round and data
position (deterministic, so the committed update stays valid) before it moves on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import data_pipelines
from tapestry_jax import buckets
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import distributed
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import loop
from tapestry_jax import outer as outer_lib
from tapestry_jax import preemption
from tapestry_jax import quantize
from tapestry_jax import retention
from tapestry_jax import train as train_lib
from tapestry_jax import trees


# The key in a checkpoint's meta that says it holds what the last update was sent from.
_SENT_SAVED = "sent_saved"


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
    self.train_iter = data_pipelines.make_iterator(
        self.config.data, split="train", global_batch_size=int(t.global_batch_size),
        seed=self.config.data.seed)
    self.state = trainer.init_state(int(t.seed))
    self.base = None  # The global params the current inner phase started from.
    # Downloads (federation.download_dtype): the round `base` is (None: unknown) and,
    # under shared moments, copies of that round's global moments {name: Adam state}
    # (the train state's own are trained on): what the next round's download applies to.
    self.downloads = federation.download(config) is not None and not reference
    self.base_round: int | None = None
    self.base_moments: dict[str, optax.ScaleByAdamState] | None = None
    self._ckpt = None
    self._delta = jax.jit(outer_lib.pseudo_gradient, out_shardings=trainer.param_shardings)
    # Error feedback (federation.error_feedback for lossy update dtypes, always with
    # top-k): what encoding lost from this site's pseudo-gradients so far, added to its
    # next one. Part of the site's checkpoint, so a restarted site sends the same updates.
    self.error_feedback = federation.error_feedback(config) and not reference
    self.residual = (jax.tree.map(lambda p, s: jnp.zeros(p.shape, jnp.float32, device=s),
                                  self.state.params, trainer.param_shardings)
                     if self.error_feedback else None)
    self._carry = jax.jit(lambda d, r: jax.tree.map(jnp.add, d, r),
                          out_shardings=trainer.param_shardings)
    self._lost = jax.jit(lambda x, sent: jax.tree.map(jnp.subtract, x, sent),
                         out_shardings=trainer.param_shardings)
    # federation.overlap_steps: what this site's last update was sent from (params and,
    # under shared moments, the Adam moments), while its next phase's first steps train
    # on before the global round that update went into arrives; None otherwise.
    self.overlap_steps = 0 if reference else federation.overlap_steps(config)
    self.sent = None
    self._carry_over = jax.jit(outer_lib.carry_progress, static_argnames="nonnegative",
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
    meta = self.checkpointer.restore_meta(step)
    with_sent = meta is not None and bool(meta.pop(_SENT_SAVED, False))
    abstract = self.trainer.abstract_state()
    if self.residual is None and not with_sent:
      self.state = self.checkpointer.restore(step, abstract, self.train_iter)
      return meta
    target = {"train": abstract}
    if self.residual is not None:
      target["residual"] = jax.tree.map(
          lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding),
          abstract.params)
    if with_sent:
      target["sent"] = self._sent_of(abstract)
    restored = self.checkpointer.restore(step, target, self.train_iter)
    self.state = restored["train"]
    self.residual = restored.get("residual")
    self.sent = restored.get("sent")
    return meta

  def save(self, meta: dict) -> None:
    """Checkpoints the train state, data position and `meta`, with the error-feedback
    residual and what the last update was sent from (`keep_sent`) when there are any."""
    extra = {k: v for k, v in (("residual", self.residual), ("sent", self.sent))
             if v is not None}
    state = {"train": self.state, **extra} if extra else self.state
    if self.sent is not None:
      meta = {**meta, _SENT_SAVED: True}
    self.checkpointer.save(int(self.state.step), state, self.train_iter, force=True, meta=meta)

  def close(self) -> None:
    if self._ckpt is not None:
      self._ckpt.wait()
      self._ckpt.close()

  # ---------------------------------------------------------------- rounds

  def _sent_of(self, state) -> dict[str, Any]:
    """What `keep_sent` keeps of `state` (arrays or their abstract values)."""
    sent = {"params": state.params}
    if federation.shared_moments(self.config_full):
      for k in ("mu", "nu"):
        sent[k] = optax.tree_utils.tree_get(state.opt_state, k)
    return sent

  def keep_sent(self) -> None:
    """Remembers the params (under shared moments also the Adam moments) this site's
    update was just sent from, L: the next `adopt(..., carry=True)` moves the progress
    made since then onto the global round that update went into."""
    self.sent = jax.tree.map(jnp.copy, self._sent_of(self.state))

  def adopt(self, params, moments: dict[str, Any] | None = None,
            round_: int | None = None, *, carry: bool = False) -> None:
    """Replaces the params by the global model (any host or device arrays), keeping the
    optimizer state, step, PRNG key and data position; remembers it as the base.

    `moments` (outer "moments" only): the global outer state, {param name: its state
    leaves "count", "mu", "nu"} (or `outer.SharedMoments` states); they replace the
    inner AdamW's moments and the step count its bias correction and lr schedule use.
    `round_`: which global round this is exactly (with downloads on, the next round's
    download then applies to it, `holds`); None: not known to be one.

    `carry` (federation.overlap_steps tau, after `keep_sent`): the site trained tau steps
    on from what it sent (L) while the exchange ran, and keeps that progress: params <-
    G + (now - L); under moments, the moments those tau steps would have given from the
    global ones, mu <- b1^tau mu_G + (mu_now - b1^tau mu_L) and likewise nu with b2
    (`outer.carry_progress`), and the count <- count_G + tau (the site's own count, so
    the bias correction and lr schedule stand where they would). Without it, what was
    kept is dropped and the global round is taken as it is."""
    sent, self.sent = self.sent, None
    if carry and sent is None:
      raise ValueError(f"site {self.name}: adopt(carry=True) without keep_sent()")
    shardings = self.trainer.param_shardings
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    self.base = params
    # A param round of moments synced every K rounds (`federation.moment_round`) keeps
    # the global moments of the round before it: still those its download applies to.
    kept = (self.base_moments if moments is None and round_ is not None
            and self.base_round == int(round_) - 1
            and not federation.moment_round(self.config_full, round_) else None)
    self.base_round, self.base_moments = None, kept
    if carry:
      with jax.set_mesh(self.mesh):
        new = self._carry_over(params, self.state.params, sent["params"], np.float32(1))
    else:
      new = jax.tree.map(jnp.copy, params)
    state = self.state.replace(params=new)
    if moments is not None:
      count, mu, nu = outer_lib.global_moments(moments)
      flat_shardings = trees.flatten(shardings)
      if sorted(mu) != sorted(flat_shardings):
        raise ValueError(f"site {self.name}: the global moments do not match the params")
      put = lambda flat: trees.unflatten(  # noqa: E731
          {n: jax.device_put(jnp.asarray(flat[n], jnp.float32), s)
           for n, s in flat_shardings.items()}, shardings)
      mu, nu = put(mu), put(nu)
      if self.downloads and round_ is not None:  # Copies: training donates the state's.
        self.base_moments = {n: optax.ScaleByAdamState(count=count, mu=jnp.copy(m),
                                                       nu=jnp.copy(v))
                             for (n, m), v in zip(trees.flatten(mu).items(),
                                                  trees.flatten(nu).values())}
      if carry:
        now, t, tau = self._sent_of(state), self.config.train, self.overlap_steps
        with jax.set_mesh(self.mesh):
          mu = self._carry_over(mu, now["mu"], sent["mu"], np.float32(float(t.b1) ** tau))
          nu = self._carry_over(nu, now["nu"], sent["nu"], np.float32(float(t.b2) ** tau),
                                nonnegative=True)
        count = int(count) + tau
      state = state.replace(opt_state=outer_lib.set_adam_state(
          state.opt_state, mu, nu,
          lambda: jax.device_put(jnp.asarray(count, jnp.int32), self.trainer.replicated)))
    if self.downloads and round_ is not None and (
        moments is not None or kept is not None
        or not federation.shared_moments(self.config_full)):
      self.base_round = int(round_)
    self.state = state

  def holds(self, round_: int) -> bool:
    """Whether this site holds global round `round_` exactly (its params and, under
    shared moments, its moments), so that round `round_` + 1's download applies to it."""
    return self.downloads and self.base is not None and self.base_round == round_

  def next_global(self, down: dict[str, outer_lib.Download]) -> tuple[Any, dict | None]:
    """Global round `base_round` + 1 from the round this site holds and that round's
    download {param name: `outer.Download`} (host or device arrays; read and checked by
    `exchange.read_global_download`): (params, moments or None), as `adopt` takes them.
    The coordinator computes the round with the same jitted `outer.download_step`, so
    they are its float32 arrays bit for bit. ExchangeError, with this site's state
    untouched, if a value comes out non-finite."""
    if self.base_round is None:
      raise RuntimeError(f"site {self.name}: next_global() without a global round held")
    spec = federation.merge_spec(self.config_full).for_round(self.base_round + 1)
    flat_shardings = trees.flatten(self.trainer.param_shardings)
    flat_base = trees.flatten(self.base)
    if sorted(down) != sorted(flat_base):
      raise ValueError(f"site {self.name}: the download does not match the params")
    put = lambda c, s: quantize.BlockCodes(  # noqa: E731
        jax.device_put(c.codes, s), jax.device_put(c.scales, self.trainer.replicated))
    params, moments, ok = {}, {}, []
    for n, d in down.items():
      s = spec.download.codes_sharding(flat_shardings[n], np.ndim(flat_base[n]))
      d = outer_lib.Download(put(d.update, s), None if d.grad is None else put(d.grad, s))
      # (A param round of moments synced every K rounds leaves them to the site.)
      state = (self.base_moments[n] if self.base_moments is not None and spec.shared_moments
               else None)
      params[n], state, finite = outer_lib.download_step(spec.download, spec.tx, flat_base[n],
                                                         d, state)
      ok.append(finite)
      if state is not None:
        moments[n] = {"count": state.count, "mu": state.mu, "nu": state.nu}
    bad = [n for n, f in zip(down, ok) if not bool(f)]
    if bad:
      raise exchange.ExchangeError(
          f"site {self.name}: the download of global round {self.base_round + 1} decodes to "
          f"non-finite values in {bad[:3]}; refusing it")
    return trees.unflatten(params, self.trainer.param_shardings), moments or None

  def train(self, steps: int, *, preempt: preemption.Preemption | None = None,
            losses: Sequence[float] = ()) -> dict[str, Any]:
    """Runs up to `steps` inner steps (fewer when `preempt` stops the job); the host reads
    the metrics once, at the end. `losses`: this phase's losses before a preemption, so
    that a resumed phase reports what an uninterrupted one does."""
    t0 = time.perf_counter()
    new_losses = []
    step = int(self.state.step)
    preempted = False
    with jax.set_mesh(self.mesh):
      for _ in range(steps):
        batch = self.trainer.shard_batch(next(self.train_iter))
        self.state, m = self.trainer.train_step(self.state, batch)
        new_losses.append(m["loss"])
        step += 1
        if preempt is not None:
          # At most one step ahead of the device: JAX's preemption sync stops the job a
          # step after the furthest step any process has called it with, so a host that
          # dispatched the whole phase ahead would only stop after it.
          if len(new_losses) > 1:
            jax.block_until_ready(new_losses[-2])
          if preempt.should_stop(step):
            preempted = True
            break
      losses = [*losses, *(float(x) for x in jax.device_get(new_losses))]
    return {"train_loss": float(np.mean(losses)), "train_loss_last": losses[-1],
            "tokens": len(losses) * self.tokens_per_step, "compute_s": time.perf_counter() - t0,
            "step": step, "losses": losses, "preempted": preempted}

  def delta(self):
    """The pseudo-gradient `base - params` (float32, on this site's mesh)."""
    if self.base is None:
      raise RuntimeError("delta() before adopt(): the site has no global base")
    with jax.set_mesh(self.mesh):
      return self._delta(self.base, self.state.params)

  def encoded_update(self, round_: int | None = None) -> dict[str, Any]:
    """This round's update as it is sent (`exchange.encode_update` of `delta()`, and
    under shared moments of the first moment too, a flat dict); `round_`, the global
    round it goes into, leaves the first moment out of a param round
    (`federation.moment_round`; None: sent under shared moments). With error feedback
    (`federation.error_feedback`, always with top-k), the residual is added to the
    pseudo-gradient first, and what the encoding loses of that sum becomes the next
    residual: over rounds, the site sends all of its pseudo-gradients (first moments are
    sent as they are). Call once per round. The arrays are not the train state's, so a
    background publish may read them while the site trains on."""
    x = self.delta()
    with jax.set_mesh(self.mesh):
      if self.residual is not None:
        x = self._carry(x, self.residual)
      flat = trees.flatten(x)
      if (federation.shared_moments(self.config_full) if round_ is None
          else federation.moment_round(self.config_full, round_)):
        mu = optax.tree_utils.tree_get(self.state.opt_state, "mu")
        flat.update({exchange.moment_key(n): v for n, v in trees.flatten(mu).items()})
      sent = exchange.encode_update(flat, self.config_full)
      # Sent as they are (float32): copies, as training on donates the state's buffers.
      state_ids = {id(a) for a in jax.tree.leaves(self.state)}
      sent = {n: jnp.copy(v) if id(v) in state_ids else v for n, v in sent.items()}
      if self.residual is not None:
        decoded = exchange.decode_update({n: sent[n] for n in trees.flatten(x)})
        self.residual = self._lost(x, trees.unflatten(decoded, x))
    return sent

  def evaluate(self, params=None) -> dict[str, float]:
    """Held-out metrics of `params` (default: the current params) on this site's data."""
    params = self.state.params if params is None else params
    with jax.set_mesh(self.mesh):
      return train_lib.evaluate(self.trainer, params, loop.eval_batches(self.config))


# -------------------------------------------------------------------- deployment

class Cancelled(Exception):
  """A background exchange was told to stop (`_Exchange.cancel`)."""


def _wait(what: str, poll: Callable[[], Any], timeout_s: float, poll_s: float,
          stop: threading.Event | None = None):
  """Polls until `poll()` returns non-None; logs while waiting; raises after timeout, or
  `Cancelled` once `stop` is set."""
  t0 = last_log = time.monotonic()
  while True:
    if stop is not None and stop.is_set():
      raise Cancelled(what)
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


@dataclasses.dataclass
class Progress:
  """Where a site stands, saved as the `meta` of every checkpoint it writes: the global
  round its current inner phase trains from, the inner steps of that phase done (and
  their losses), and whether that phase's update is published. A fresh site has
  published 'round -1'. `ahead` (published, federation.overlap_steps): the losses of the
  next phase's steps trained from what was sent, before its global round is adopted."""
  base_round: int = -1
  steps_done: int = 0
  published: bool = True
  losses: list[float] = dataclasses.field(default_factory=list)
  ahead: list[float] = dataclasses.field(default_factory=list)

  @classmethod
  def from_meta(cls, meta: dict | None) -> "Progress":
    if meta is None:
      return cls()
    if "published" not in meta:  # Written before phases could be interrupted.
      return cls(int(meta["base_round"]))
    return cls(**meta)


class _Site:
  """The deployed site's round steps (`run_site`); one per process of the site. Decisions
  that must agree (which global round is next) are process 0's, sent to the others."""

  def __init__(self, config, name: str, workdir: str, devices, private_key, credentials):
    federation.check_federation_config(config, devices, site=name)
    self.config, self.name, self.f = config, name, config.federation
    urls = federation.bucket_urls(config, workdir)
    retries = int(self.f.storage_retries)
    self.own = buckets.Bucket(urls[name], max_retries=retries, credentials=credentials)
    self.glob = buckets.Bucket(urls[federation.GLOBAL], max_retries=retries,
                               credentials=credentials)
    # Its key may have been rotated by a trust-root update in the global bucket's log.
    log = exchange.read_trust_updates(self.glob) if self.f.trust.require_signatures else None
    self.root, self.signer = federation.party_trust(config, name, workdir, private_key,
                                                    updates=log)
    self.own.check_writable()
    self.dir = os.path.join(workdir, "sites", name)
    os.makedirs(self.dir, exist_ok=True)
    self.worker = SiteWorker(config, name, self.dir, devices=devices)
    self.schema = federation.param_schema(config)  # Once, not per round.
    self.channel = distributed.Channel(f"site/{name}") if jax.process_count() > 1 else None
    self._decisions = 0
    self.keep = retention.keep_rounds(config)  # 0: no resume marker, nothing collected.
    self._durable = 0  # Base round of the newest checkpoint known to be durable.

  def saved(self, base_round: int, *, restored: bool = False) -> None:
    """Retention: after a checkpoint trained from `base_round` is saved, marks the base
    round of the one before it (durable now: a save waits for the previous one; a
    `restored` one is durable) as the oldest global round this site may still read, then
    removes its own update rounds that neither it nor an audit can use
    (`retention.collect_updates`). Storage errors are logged: a stale marker keeps more."""
    if not self.keep or jax.process_index() != 0:
      return
    if restored:
      self._durable = max(0, base_round)
    resume, self._durable = self._durable, max(0, base_round)
    try:
      retention.write_resume(self.own, self.config, self.name, resume, self.signer)
      retention.collect_updates(self.own, self.glob, self.config, self.name, resume, self.root)
    except (buckets.BucketError, exchange.ExchangeError) as e:
      logging.warning("site %s: retention skipped: %s", self.name, e)

  def next_round(self, last_base: int,
                 stop: threading.Event | None = None) -> tuple[int, float]:
    """(the global round to train from next, seconds waited): a round whose update is
    committed but whose checkpoint was lost (trained again), else the newest global round
    after `last_base`. `stop`: see `_wait`."""
    t0 = time.perf_counter()
    decision = None
    if jax.process_index() == 0:
      try:
        g = _unsaved_base(self.own, self.glob, last_base)
        if g is not None:
          logging.info("site %s: its update trained from global round %d is committed but "
                       "its checkpoint was lost; training that round again", self.name, g)
        else:
          g = _wait(f"a global round newer than {last_base} in {self.glob.url}",
                    lambda: exchange.newer_global_round(self.glob, last_base),
                    float(self.f.site_wait_s), float(self.f.poll_s), stop)
        decision = {"round": g}
      except TimeoutError as e:
        decision = {"timeout": str(e)}
    if self.channel is not None:
      decision = self.channel.broadcast(f"next/{self._decisions}", decision,
                                        float(self.f.site_wait_s) + 600)
      self._decisions += 1
    if "timeout" in decision:
      raise TimeoutError(decision["timeout"])
    return decision["round"], time.perf_counter() - t0

  def read_global(self, g: int, last_base: int):
    """Global round `g`, verified: (params, moments or None, manifest) on this site's
    mesh."""
    return _read_global(self.worker, self.glob, g, self.schema, root=self.root,
                        last_round=last_base)

  def fetch_global(self, g: int, last_base: int) -> "_Fetched":
    """`read_global`'s reads only (no computation on the mesh, so a background thread
    may run it while the site trains): `apply_global` finishes it."""
    return _fetch_global(self.worker, self.glob, g, self.schema, root=self.root,
                         last_round=last_base)

  def merged_into(self, manifest: dict) -> bool:
    """Whether this site's update is one of the inputs of the global round `manifest`."""
    return self.name in [i.get("site") for i in manifest["extra"].get("inputs", [])]

  def encode(self, progress: Progress) -> dict[str, Any]:
    """This phase's update as it is sent (`SiteWorker.encoded_update`, on the mesh)."""
    try:
      return self.worker.encoded_update(round_=progress.base_round + 1)
    except ValueError:  # Coded: a NaN or Inf leaves nothing to quantize.
      raise exchange.diverged(self.name, progress.base_round + 1) from None

  def publish(self, progress: Progress, rec: dict, sent: dict[str, Any]) -> None:
    """Publishes `sent` (from `encode`) as this site's update trained from global round
    `progress.base_round`: writes and host reads only, so it may run in the background."""
    g = progress.base_round
    exchange.publish_update(self.own, self.config, self.name, g + 1, g, sent, rec["tokens"],
                            extra={"train_loss": rec["train_loss"], "step": rec["step"]},
                            signer=self.signer, channel=self.channel)


def read_global(worker: SiteWorker, glob: buckets.Bucket, round_: int, schema=None, *,
                root=None, last_round: int | None = None) -> tuple[Any, dict | None]:
  """Global round `round_` as `worker` adopts it, verified: (params, moments or None) on
  its mesh. With downloads on and `worker` holding round `round_` - 1 exactly, only the
  round's download is read (`exchange.read_global_download`) and applied
  (`SiteWorker.next_global`); otherwise (the first round, after a restart, after
  missing a round) the whole float32 round (`exchange.read_global_round`)."""
  return _read_global(worker, glob, round_, schema, root=root, last_round=last_round)[:2]


def _read_global(worker: SiteWorker, glob: buckets.Bucket, round_: int, schema=None, *,
                 root=None, last_round: int | None = None) -> tuple[Any, dict | None, dict]:
  """`read_global`, and the round's verified manifest."""
  return _apply_global(worker, _fetch_global(worker, glob, round_, schema, root=root,
                                             last_round=last_round))


@dataclasses.dataclass
class _Fetched:
  """A verified global round as read: its download (applied by `_apply_global` to the
  round the site holds) or the whole round (params, moments or None)."""
  manifest: dict
  download: dict | None = None
  params: Any = None
  moments: dict | None = None


def _fetch_global(worker: SiteWorker, glob: buckets.Bucket, round_: int, schema=None, *,
                  root=None, last_round: int | None = None) -> _Fetched:
  """The reads of `_read_global` (into the site's shardings; nothing computed)."""
  shardings = worker.trainer.param_shardings
  if round_ >= 1 and worker.holds(round_ - 1):
    down, manifest = exchange.read_global_download(
        glob, worker.config_full, round_, shardings, worker.trainer.replicated, schema,
        root=root, last_round=last_round)
    return _Fetched(manifest, download=down)
  params, moments, manifest = exchange.read_global_round(
      glob, worker.config_full, round_, shardings, schema, root=root, last_round=last_round)
  return _Fetched(manifest, params=params, moments=moments)


def _apply_global(worker: SiteWorker, fetched: _Fetched) -> tuple[Any, dict | None, dict]:
  """(params, moments or None, manifest) of a fetched round, as `adopt` takes them."""
  if fetched.download is not None:
    return (*worker.next_global(fetched.download), fetched.manifest)
  return fetched.params, fetched.moments, fetched.manifest


class _Exchange:
  """One round's exchange behind the steps a site trains ahead (federation.overlap_steps):
  in a background thread, publish the update (`_Site.publish`), then wait for the next
  global round and read it (`_Site.fetch_global`). Only writes, reads and host work run
  there: every computation on the mesh (encoding the update, applying a download) stays
  on the site's main thread, in the same order on every process of the site. The update
  is committed once `published` is set; `join` returns (global round, `_Fetched`) and
  the timings and bytes, or raises what the thread raised."""

  def __init__(self, site: "_Site", progress: Progress, rec: dict, sent: dict[str, Any]):
    self.published, self._stop = threading.Event(), threading.Event()
    self._out: dict[str, Any] = {}
    self._error: BaseException | None = None
    self.t0 = time.perf_counter()
    args = (site, Progress(**dataclasses.asdict(progress)), dict(rec), sent)
    self._thread = threading.Thread(target=self._run, args=args, daemon=True,
                                    name=f"exchange-{site.name}-{progress.base_round + 1}")
    self._thread.start()

  def _run(self, site, progress, rec, sent) -> None:
    out = self._out
    try:
      write0, t = site.own.bytes_written, time.perf_counter()
      site.publish(progress, rec, sent)
      out.update(publish_s=time.perf_counter() - t, bytes_up=site.own.bytes_written - write0)
      self.published.set()
      read0 = site.glob.bytes_read
      out["round"], out["poll_s"] = site.next_round(progress.base_round, self._stop)
      t = time.perf_counter()
      out["fetched"] = site.fetch_global(out["round"], progress.base_round)
      out.update(read_s=time.perf_counter() - t, bytes_down=site.glob.bytes_read - read0)
    except BaseException as e:  # noqa: BLE001  (raised in the main thread by join)
      self._error = e
    finally:
      self.published.set()

  def wait_published(self) -> dict[str, Any]:
    """Blocks until the update is committed: {publish_s, bytes_up}."""
    self.published.wait()
    if "bytes_up" not in self._out:
      self._thread.join()
      raise self._error
    return {k: self._out[k] for k in ("publish_s", "bytes_up")}

  def join(self) -> dict[str, Any]:
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._out

  def cancel(self) -> None:
    """Stops waiting for the next global round (a read under way finishes first)."""
    self._stop.set()


def run_site(config, name: str, workdir: str, *, devices=None, private_key: str | None = None,
             credentials: str | None = None) -> list[dict]:
  """The deployed site: loops over global rounds until the last one, then evaluates it.
  Every process of a multi-process site runs it.

  `private_key`: this site's key file (default WORKDIR/keys/NAME.key); `credentials`: its
  own S3 credentials ('env', a credentials file, or None for TensorStore's default chain).

  Resumes from its last checkpoint and the `Progress` saved with it. On SIGTERM every
  process stops at one step, saves a checkpoint and raises `preemption.Preempted`.
  Writes `WORKDIR/sites/NAME/rounds.jsonl` (one record per global model it trained
  from: eval of that global on this site's held-out data, train loss, compute and
  exchange seconds, bytes up and down, when it was adopted (adopted_at, Unix seconds);
  wait_s is the wait for it that was exposed, round_trip_s the seconds from publishing
  the update before it to finding it, hidden_s their difference, the part spent on the
  checkpoint and the steps ahead; with federation.overlap_steps also overlap_steps,
  carried, ahead_s, and, where the exchange ran in the background, encode_s (encoding
  the update, on the main thread), fetch_s (the background read; read_s is then applying
  it)). Returns the records of this run."""
  site = _Site(config, name, workdir, devices, private_key, credentials)
  worker, f = site.worker, config.federation
  progress = Progress.from_meta(worker.restore())
  if progress.base_round >= 0:
    logging.info("site %s: resumed at step %d (%s)", name, int(worker.state.step), progress)
  site.saved(progress.base_round, restored=True)  # A fresh site marks round 0.

  def save(p: Progress) -> None:
    worker.save(dataclasses.asdict(p))
    site.saved(p.base_round)
  records = []
  out = open(os.path.join(site.dir, "rounds.jsonl"), "a") if jax.process_index() == 0 else None

  def record(rec: dict) -> None:
    records.append(rec)
    if out is not None:
      out.write(json.dumps(rec) + "\n")
      out.flush()

  def overlaps(p: Progress) -> bool:  # Train ahead of the global round after `p`'s?
    return worker.overlap_steps > 0 and p.published and 0 <= p.base_round < int(f.rounds) - 1

  if overlaps(progress) and worker.sent is None and not progress.ahead:
    worker.keep_sent()  # Checkpointed right after a publish: its state is what was sent.
  t_sent = None  # When this run last published an update (perf_counter).
  # federation.overlap_steps: the exchange running behind the steps trained ahead, and
  # the record of the phase whose update it publishes (written once that is committed).
  pending: _Exchange | None = None
  pending_rec: dict = {}
  preempt = preemption.Preemption()
  try:
    while True:
      read0, rec = site.glob.bytes_read, {"site": name}
      if progress.published:  # Next phase: adopt a newer global round (params, moments).
        ahead, ahead_s = worker.sent is not None, 0.0
        if ahead and len(progress.ahead) < worker.overlap_steps:  # Hides the exchange.
          trained = worker.train(worker.overlap_steps - len(progress.ahead), preempt=preempt,
                                 losses=progress.ahead)
          progress.ahead, ahead_s = trained["losses"], trained["compute_s"]
          if trained["preempted"]:
            if pending is not None:  # A checkpoint says "published" once it is committed.
              pending_rec.update(pending.wait_published())
              pending.cancel()
              record(pending_rec)
            save(progress)
            raise preemption.Preempted(trained["step"])
        if pending is not None:  # The exchange ran behind the steps ahead: join it.
          t_join = time.perf_counter()
          done = pending.join()
          rec["wait_s"] = time.perf_counter() - t_join  # Exposed at step tau.
          rec["round_trip_s"] = time.perf_counter() - pending.t0
          rec["hidden_s"] = rec["round_trip_s"] - rec["wait_s"]
          pending_rec.update(publish_s=done["publish_s"], bytes_up=done["bytes_up"])
          record(pending_rec)
          pending = None
          # Committed: checkpoint the state trained ahead with what was sent.
          save(progress)
          g, t_read = done["round"], time.perf_counter()
          params, moments, manifest = _apply_global(worker, done["fetched"])
          rec.update(read_s=time.perf_counter() - t_read, fetch_s=done["read_s"],
                     bytes_down=done["bytes_down"])
        else:
          g, rec["wait_s"] = site.next_round(progress.base_round)  # Exposed at step tau.
          if t_sent is not None:  # The exchange behind the checkpoint and the steps ahead.
            rec["round_trip_s"] = time.perf_counter() - t_sent
            rec["hidden_s"] = rec["round_trip_s"] - rec["wait_s"]
          t_read = time.perf_counter()
          params, moments, manifest = site.read_global(g, progress.base_round)
          rec["read_s"] = time.perf_counter() - t_read
        # Carried only onto the round this site's update went into.
        carry = ahead and g == progress.base_round + 1 and site.merged_into(manifest)
        worker.adopt(params, moments, round_=g, carry=carry)
        rec.update(global_round=g, adopted_at=time.time())
        if ahead:
          rec.update(overlap_steps=len(progress.ahead), carried=carry, ahead_s=ahead_s)
        if federation.evaluate_round(config, g):
          t_eval = time.perf_counter()
          rec.update(worker.evaluate(worker.base), eval_s=time.perf_counter() - t_eval)
        progress = Progress(g, len(progress.ahead), False, progress.ahead)
      else:  # A preempted phase: its base again (verified), the trained state as restored.
        params, _, _ = site.read_global(progress.base_round, progress.base_round)
        worker.base = params
        rec.update(global_round=progress.base_round, resumed_at_step=progress.steps_done)
        ahead_s = 0.0
      rec.setdefault("bytes_down", site.glob.bytes_read - read0)
      if progress.base_round >= int(f.rounds):
        record(rec)
        break
      trained = worker.train(int(f.inner_steps) - progress.steps_done, preempt=preempt,
                             losses=progress.losses)
      progress.losses = trained.pop("losses")
      progress.steps_done = len(progress.losses)
      if trained.pop("preempted"):
        save(progress)
        raise preemption.Preempted(trained["step"])
      trained["compute_s"] += ahead_s  # The phase's steps, those ahead included.
      rec.update(trained)
      if overlaps(dataclasses.replace(progress, published=True)):
        # Encoded here (on the mesh), published in the background while the next phase's
        # first tau steps train; checkpointed when that is joined (`_Exchange`).
        t_enc = time.perf_counter()
        sent = site.encode(progress)
        rec["encode_s"] = time.perf_counter() - t_enc
        pending, pending_rec = _Exchange(site, progress, rec, sent), rec
        progress.published = True
        worker.keep_sent()
        logging.info("site %s: round %d publishing in the background (train loss %.4f)",
                     name, progress.base_round + 1, rec["train_loss"])
        continue
      write0, t_pub = site.own.bytes_written, time.perf_counter()
      site.publish(progress, rec, site.encode(progress))
      t_sent = time.perf_counter()
      rec.update(publish_s=t_sent - t_pub, bytes_up=site.own.bytes_written - write0)
      progress.published = True
      save(progress)
      record(rec)
      logging.info("site %s: round %d published (train loss %.4f)", name,
                   progress.base_round + 1, rec["train_loss"])
  finally:
    if pending is not None:
      pending.cancel()
    preempt.close()
    if out is not None:
      out.close()
    worker.close()
  return records
