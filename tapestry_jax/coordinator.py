"""The coordinator: waits for a quorum of committed site updates, merges them with the
outer optimizer, and publishes the next global round to the bucket it owns.

It only ever reads the sites' buckets and only ever writes the global bucket. Every
update is verified before a value of it is used: the author's signature against the
trust root, freshness (its round, and the global round it was trained from), its schema
against the model (before anything is allocated), then, while it streams through the
merge, the digest of every chunk and the finiteness of every value. A round is published
as arrays (params and outer state; with `federation.download_dtype` on, also the round's
encoded update, which sites holding the previous round read instead) in an attempt
directory of its own, a manifest naming
its inputs (by manifest digest) signed with the coordinator's key, a commit marker
created last with a create-only write (so of two coordinators racing on a round exactly
one commits), then the LATEST pointer. A restarted coordinator finds the last committed
round and redoes any round that was not committed (the merge is deterministic, so the
redo is bit-identical; `launch.audit` checks any round the same way).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from tapestry_jax import buckets
from tapestry_jax import contribution
from tapestry_jax import distributed
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import merge as merge_lib
from tapestry_jax import merge_workers
from tapestry_jax import outer as outer_lib
from tapestry_jax import retention
from tapestry_jax import train as train_lib
from tapestry_jax import trees


class QuorumError(RuntimeError):
  """A round did not reach its quorum before `federation.round_timeout_s`."""


def initial_round(config) -> tuple[dict, dict]:
  """Round 0 on the host: the initial params (the init every site's trainer makes from
  train.seed) and the outer optimizer's initial state, as flat name -> numpy dicts."""
  mcfg = model_lib.ModelConfig.from_config(config.model)
  params = trees.flatten(jax.device_get(train_lib.initial_params(
      mcfg, int(config.train.seed), config.train)))
  state = jax.device_get(outer_lib.init_outer_state(federation.merge_spec(config).tx, params))
  return params, state


class Coordinator:
  """Publishes global rounds; see the module docstring."""

  def __init__(self, config, workdir: str, *, private_key: str | None = None,
               credentials: str | None = None):
    """`private_key`: the coordinator's key file (default WORKDIR/keys/coordinator.key);
    `credentials`: its own S3 credentials ('env', a file, or None for the default chain)."""
    federation.check_federation_config(config)
    self.config = config
    self.f = config.federation
    self.names = sorted(federation.site_names(config))  # The merge's fixed order.
    urls = federation.bucket_urls(config, workdir)
    retries = int(self.f.storage_retries)
    self.glob = buckets.Bucket(urls[federation.GLOBAL], max_retries=retries,
                               credentials=credentials)
    # Its key may have been rotated by a trust-root update in the global bucket's log.
    log = exchange.read_trust_updates(self.glob) if self.f.trust.require_signatures else None
    self.root, self.signer = federation.party_trust(config, federation.COORDINATOR, workdir,
                                                    private_key, updates=log)
    self.sites = {n: buckets.Bucket(urls[n], max_retries=retries, credentials=credentials)
                  for n in self.names}
    self.spec = federation.merge_spec(config)  # How every round is merged.
    self.block_bytes = merge_lib.block_bytes(self.f.get("merge_block_mib"))  # Not the bits.
    self.schema = exchange.update_schema(config)  # What a site update must be.
    self._schemas: dict[bool, dict] = {}  # (moment_sync_every > 1) per kind of round.
    self.quorum = federation.quorum(config)
    self.dir = os.path.join(workdir, "coordinator")
    os.makedirs(self.dir, exist_ok=True)
    self._missing: set[tuple[str, int]] = set()  # (site, closed round) without its update.
    self._rejected: set[str] = set()  # Sites whose update the last gather refused.
    self.workers = merge_workers.Workers(distributed.group())
    self._seq = 0  # Merge jobs sent to the workers so far.
    self.keep = retention.keep_rounds(config)  # 0: every round is kept.
    # federation.contribution: scores every update on the coordinator's validation set.
    self.scorer = (contribution.Scorer(config)
                   if contribution.policy(config).on and self.workers.leader else None)

  # ---------------------------------------------------------------- rounds

  def latest(self) -> int | None:
    """The latest committed round, repairing the pointer if a crash left it behind."""
    latest = exchange.read_latest(self.glob)
    r = -1 if latest is None else latest
    while exchange.read_manifest(self.glob, exchange.global_prefix(r + 1)) is not None:
      r += 1
    if r >= 0 and r != latest:
      logging.info("coordinator: LATEST pointer said %s; round %d is committed", latest, r)
      exchange.write_latest(self.glob, r)
    return None if r < 0 else r

  def publish_initial(self) -> None:
    params, state = initial_round(self.config)
    arrays = exchange.global_arrays(params, {n: {k: np.asarray(v) for k, v in
                                                 outer_lib.state_leaves(s).items()}
                                             for n, s in state.items()})
    prefix = exchange.global_prefix(0)
    attempt = exchange.new_attempt()
    records = exchange.write_arrays(self.glob, exchange.data_prefix(prefix, attempt), arrays)
    self._commit(prefix, exchange.make_manifest(
        federation=self.f.id, kind="global", round=0, author=federation.COORDINATOR,
        attempt=attempt, base_round=None, tokens=0, arrays=records, extra={"inputs": []}))
    exchange.write_latest(self.glob, 0)

  def _commit(self, prefix: str, manifest: dict) -> tuple[dict, bool]:
    """Signs and commits `manifest`; (the committed manifest, whether it is ours).

    If another coordinator committed the round first, its (verified) manifest is
    returned and ours is dropped: exactly one commit per round."""
    if self.signer is not None:
      manifest = self.signer.sign(manifest)
    try:
      exchange.write_manifest(self.glob, prefix, manifest)
      return manifest, True
    except exchange.CommitConflict:
      theirs = self.read_global(prefix)
      logging.warning("coordinator: %s was committed by another coordinator (attempt %s) "
                      "before ours (attempt %s); keeping theirs", prefix, theirs["attempt"],
                      manifest["attempt"])
      return theirs, False

  def read_global(self, prefix: str) -> dict:
    """A committed global round's manifest, signature verified."""
    return exchange.read_global_manifest(self.glob, prefix, self.root)

  def merge_settings(self) -> dict:
    """What besides the inputs decides the merge (recorded in each round for audits)."""
    robust = self.f.get("robust")
    settings = {"weight_cap_tokens": int(self.spec.weight_cap),
                "robust": robust.to_dict() if robust is not None else None}
    if self.spec.moment_sync_every > 1:  # Recorded only when on: older rounds read as 1.
      settings["moment_sync_every"] = self.spec.moment_sync_every
    download = federation.download(self.config)
    if download is not None:  # Recorded only when on: older rounds read as off.
      settings["download"] = download
    return settings

  def _log_late(self) -> None:
    """Logs, once each, updates that were committed after their round had closed."""
    for n, r in sorted(self._missing):
      try:
        late = exchange.read_manifest(self.sites[n], exchange.update_prefix(r))
      except buckets.BucketError:
        continue  # Unreachable now; gather() reports it.
      if late is not None:
        logging.warning("coordinator: late update of site %s for closed round %d ignored", n, r)
        self._missing.discard((n, r))

  def update_schema(self, round_: int) -> dict:
    """What a site update for `round_` must be: with first moments only in the moment
    rounds of shared moments synced every K > 1 rounds (`federation.moment_round`)."""
    if federation.moment_sync_every(self.config) == 1:
      return self.schema
    key = federation.moment_round(self.config, round_)
    if key not in self._schemas:
      self._schemas[key] = exchange.update_schema(self.config, round_)
    return self._schemas[key]

  def gather(self, round_: int) -> dict[str, dict]:
    """Waits for the round's quorum (then `deadline_s` more for stragglers)."""
    base = round_ - 1
    accepted: dict[str, dict] = {}
    rejected = self._rejected = set()  # Committed but refused: not missing, never late.
    t0 = last_log = time.monotonic()
    first = None
    unreachable: set[str] = set()  # Sites whose bucket failed a read (logged once).
    while True:
      self._log_late()
      for n in self.names:
        if n in accepted or n in rejected:
          continue
        try:
          m = exchange.read_manifest(self.sites[n], exchange.update_prefix(round_))
        except buckets.BucketError as e:
          # The site's store is unreachable even after the bucket's retries: treat it as
          # not committed yet (polled again), so the round still closes on quorum or
          # times out, instead of the coordinator dying with one site's storage.
          if n not in unreachable:
            logging.warning("coordinator: round %d: site %s's bucket: %s", round_, n, e)
            unreachable.add(n)
          continue
        except exchange.ExchangeError as e:  # A torn or tampered manifest: refuse, go on.
          m, why = {}, str(e)
        else:
          if m is None:
            continue
          exchange.refresh_trust(self.root, self.glob)  # A key rotated for this round?
          why = exchange.validate_update(m, self.config, n, round_, base,
                                         self.update_schema(round_), self.root)
        if why is not None:
          digest = exchange.manifest_digest(m)[:16] if m else "-"
          logging.warning("coordinator: round %d: rejected update of site %s (manifest "
                          "sha256 %s): %s", round_, n, digest, why)
          rejected.add(n)
          continue
        accepted[n] = m
        first = first or time.monotonic()
      now = time.monotonic()
      if len(accepted) == len(self.names):
        return accepted
      # Every site has answered (a rejected update cannot be replaced): no use waiting.
      settled = len(accepted) + len(rejected) == len(self.names)
      if len(accepted) >= self.quorum and (settled or now - first >= float(self.f.deadline_s)):
        missing = sorted(set(self.names) - set(accepted))
        logging.warning("coordinator: round %d closes on quorum %d/%d; missing: %s", round_,
                        len(accepted), len(self.names), missing)
        return accepted
      if len(accepted) < self.quorum and now - t0 > float(self.f.round_timeout_s):
        missing = sorted(set(self.names) - set(accepted))
        raise QuorumError(
            f"round {round_} reached {len(accepted)} of quorum {self.quorum} updates in "
            f"{self.f.round_timeout_s:.0f} s; missing sites: {missing}; "
            f"the latest global round stays {base}")
      if now - last_log > 30:
        logging.info("coordinator: round %d has %d/%d updates (quorum %d), waiting",
                     round_, len(accepted), len(self.names), self.quorum)
        last_log = now
      time.sleep(float(self.f.poll_s))

  def run_round(self, round_: int) -> dict:
    """Gathers, merges and publishes global round `round_` (from round_ - 1)."""
    t0 = time.perf_counter()
    updates = self.gather(round_)
    wait_s = time.perf_counter() - t0
    gathered = [n for n in self.names if n in updates]
    base_prefix = exchange.global_prefix(round_ - 1)
    base_manifest = self.read_global(base_prefix)
    read0 = self.glob.bytes_read + sum(self.sites[n].bytes_read for n in gathered)
    write0 = self.glob.bytes_written
    t1 = time.perf_counter()
    checked = (self.check_contributions(round_, base_prefix, base_manifest, updates)
               if self.scorer is not None else None)
    prefix = exchange.global_prefix(round_)
    attempt = exchange.new_attempt()
    while True:
      names = [n for n in self.names if n in updates]
      tokens = [updates[n]["tokens"] for n in names]
      weights = (self.spec.weights(tokens) if checked is None
                 else checked.weights(names, tokens, self.spec.weight_cap))
      job = {"kind": "merge", "round": round_, "sites": names, "attempt": attempt,
             "digests": [exchange.manifest_digest(updates[n]) for n in names],
             "weights": [float(w) for w in weights],
             "base": exchange.manifest_digest(base_manifest)}
      try:
        records = self._merge(self._send(job), base_manifest, updates)
        break
      except merge_lib.BadUpdate as e:
        # Found while merging (the values are only read there); nothing is committed yet.
        bad = names[e.index]
        why = e.reason
        logging.warning("coordinator: round %d: rejected update of site %s (manifest "
                        "sha256 %s): %s", round_, bad,
                        exchange.manifest_digest(updates[bad])[:16], why)
        self._rejected.add(bad)  # Committed but refused: never reported as late.
        del updates[bad]
        if len(updates) < self.quorum:
          raise QuorumError(
              f"round {round_}: rejected update of site {bad}: {why}; {len(updates)} "
              f"updates remain, quorum {self.quorum}; the latest global round stays "
              f"{round_ - 1}") from None
    inputs = [{"site": n, "round": round_, "manifest_sha256": exchange.manifest_digest(updates[n]),
               "tokens": t, "weight": float(w)} for n, t, w in zip(names, tokens, weights)]
    extra = {"inputs": inputs, "base_manifest_sha256": exchange.manifest_digest(base_manifest),
             "outer": federation.outer_config(self.config), "merge": self.merge_settings()}
    if self.spec.moment_sync_every > 1:  # Whether this round synced the shared moments.
      extra["moment_round"] = self.spec.moment_round(round_)
    if checked is not None:  # Recorded only when on: the scores and what they decided.
      extra["contribution"] = checked.record()
    committed, ours = self._commit(prefix, exchange.make_manifest(
        federation=self.f.id, kind="global", round=round_, author=federation.COORDINATOR,
        attempt=attempt, base_round=round_ - 1, tokens=int(sum(tokens)), arrays=records,
        extra=extra))
    exchange.write_latest(self.glob, round_)
    if not ours:
      names = [i["site"] for i in committed["extra"]["inputs"]]
      weights = [i["weight"] for i in committed["extra"]["inputs"]]
    rec = {"round": round_, "sites": names, "weights": [float(w) for w in weights],
           "committed_by_us": ours,
           "wait_s": wait_s, "merge_s": time.perf_counter() - t1,
           "bytes_read": (self.glob.bytes_read + sum(self.sites[n].bytes_read for n in gathered)
                          - read0),
           "bytes_written": self.glob.bytes_written - write0,
           "site_train_loss": {n: updates[n].get("extra", {}).get("train_loss") for n in names}}
    if checked is not None:
      rec["contribution_scores"] = dict(zip(checked.sites, checked.scores))
      rec["contribution_refused"] = checked.refused
    self._missing = {(n, r) for n, r in self._missing if r >= round_ - 2}
    self._missing |= {(n, round_) for n in self.names
                      if n not in updates and n not in self._rejected}
    return rec

  def collect(self) -> dict | None:
    """Retention (`federation.retention.keep_rounds`): removes the global rounds no site
    may still need (`retention.collect_global`). A storage error is logged, not fatal:
    the next round collects again."""
    if not self.keep:
      return None
    try:
      return retention.collect_global(self.glob, self.sites, self.config, self.root,
                                      self.signer)
    except (buckets.BucketError, exchange.ExchangeError) as e:
      logging.warning("coordinator: retention skipped this round: %s", e)
      return None
  def check_contributions(self, round_: int, base_prefix: str, base_manifest: dict,
                          updates: dict[str, dict]) -> contribution.Checked:
    """Scores the round's updates (`contribution.Scorer`) and drops from `updates` those
    the policy refuses and those the merge would refuse; QuorumError when fewer than the
    quorum remain (the latest global round stays round_ - 1)."""
    inputs = {n: (self.sites[n], exchange.update_prefix(round_), updates[n])
              for n in self.names if n in updates}
    checked = self.scorer.check_stored(self.glob, base_prefix, base_manifest, inputs)
    why = {**checked.bad, **{n: f"contribution score {checked.score(n)!r} is below "
                                f"contribution.threshold {checked.policy.threshold!r}"
                             for n in checked.refused}}
    for n in sorted(why):
      logging.warning("coordinator: round %d: refused update of site %s (manifest sha256 %s): "
                      "%s", round_, n, exchange.manifest_digest(updates[n])[:16], why[n])
      self._rejected.add(n)  # Committed but refused: never reported as late.
      del updates[n]
    if len(updates) < self.quorum:
      raise QuorumError(f"round {round_}: refused updates of {sorted(why)}; {len(updates)} "
                        f"updates remain, quorum {self.quorum}; the latest global round "
                        f"stays {round_ - 1}")
    return checked

  # ---------------------------------------------------------------- merge workers

  def _send(self, job: dict) -> dict:
    """Leader: numbers `job` and sends it to the merge workers (if any)."""
    job = dict(job, seq=self._seq)
    self.workers.send_job(str(self._seq), job)
    self._seq += 1
    return job

  def _merge(self, job: dict, base_manifest: dict, updates: dict[str, dict]) -> dict:
    """This process's part of merge job `job` (all of it with one process); the leader
    gets the round's records."""
    r = job["round"]
    inputs = [(self.sites[n], exchange.update_prefix(r), updates[n]) for n in job["sites"]]
    plan = merge_lib.plan_round(self.spec.for_round(r), self.glob,
                                exchange.global_prefix(r - 1), base_manifest, inputs,
                                job["weights"], max_block_bytes=self.block_bytes)
    out = exchange.data_prefix(exchange.global_prefix(r), job["attempt"])
    return self.workers.merge(str(job["seq"]), plan, self.glob, out)

  def _job_inputs(self, job: dict) -> tuple[dict, dict]:
    """Worker: the base manifest and updates a job names, read here and checked against
    the digests the leader sent."""
    r = job["round"]
    base = self.read_global(exchange.global_prefix(r - 1))
    if exchange.manifest_digest(base) != job["base"]:
      raise exchange.ExchangeError(f"global round {r - 1} is not the one the leader merges on")
    updates = {}
    for n, digest in zip(job["sites"], job["digests"]):
      m = exchange.read_manifest(self.sites[n], exchange.update_prefix(r))
      if m is None or exchange.manifest_digest(m) != digest:
        raise exchange.ExchangeError(f"site {n}'s update for round {r} is not the one the "
                                     f"leader merges")
      updates[n] = m
    return base, updates

  def serve(self) -> int:
    """Worker (process > 0): merges its range of every job the leader sends, until the
    leader stops. Returns the number of merge jobs served."""
    served = 0
    while True:
      job = self.workers.next_job(str(served))
      served += 1
      if job["kind"] == "stop":
        return served - 1
      try:
        base, updates = self._job_inputs(job)
      except (exchange.ExchangeError, buckets.BucketError) as e:
        self.workers.report_failure(str(job["seq"]), str(e))
        continue
      try:
        self._merge(job, base, updates)
      except merge_lib.BadUpdate:
        pass  # The leader refuses that update and sends the next job.

  def run(self) -> list[dict]:
    """Runs rounds until `federation.rounds`; resumes after the last committed round.
    In a coordinator of several processes, process 0 runs the rounds and the others
    serve its merges."""
    if not self.workers.leader:
      self.serve()
      return []
    try:
      return self._run()
    finally:
      self._send({"kind": "stop"})

  def _run(self) -> list[dict]:
    self.glob.check_writable()
    latest = self.latest()
    if latest is None:
      self.publish_initial()
      latest = 0
      logging.info("coordinator: published initial global round 0 to %s", self.glob.url)
    else:
      self.collect()  # A restart (or a rerun after the last round) collects what it may.
    records = []
    with open(os.path.join(self.dir, "rounds.jsonl"), "a") as out:
      for r in range(latest + 1, int(self.f.rounds) + 1):
        rec = self.run_round(r)
        if self.keep:
          rec["retention"] = self.collect()
        records.append(rec)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        logging.info("coordinator: published global round %d from %s (wait %.1f s, merge %.2f s)",
                     r, rec["sites"], rec["wait_s"], rec["merge_s"])
    return records
