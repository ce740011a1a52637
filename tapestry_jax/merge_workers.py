"""A coordinator of many processes: each round's streaming merge split across workers.

The processes of one coordinator job (`distributed.initialize`) share every merge. The
leader (process 0) gathers the updates and decides the round's inputs; it sends every
worker a job naming them (by manifest digest). Every process plans the same merge
(`merge.plan_round`) and merges its own range of blocks (`merge.split_work`) into the
round's attempt directory: whole output chunks, so the ranges never touch the same
chunk. The outer clip's global norm is reduced across workers (per-block squares,
summed in work order). The leader combines the ranges' records (`merge.finish_round`)
and signs and commits the round only when every range is written. Any split merges
the same bits as one process.

Jobs and results travel through JAX's coordination service (`distributed.Channel`). A
process that dies fails the job (JAX's heartbeats stop every process); nothing is
committed, and the restarted job redoes the round, bit-identically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from absl import logging

from tapestry_jax import distributed
from tapestry_jax import merge as merge_lib
from tapestry_jax.buckets import Bucket
from tapestry_jax import exchange
from tapestry_jax.exchange import ExchangeError

# Long waits (a round waits for the sites' training) are polled in slices of this.
_POLL_S = 60.0
# Fault injection for tests: a worker (not the leader) sleeps this long before it merges.
_FAULT_DELAY = "TAPESTRY_FAULT_WORKER_MERGE_DELAY_S"


def _bad_report(e: merge_lib.BadUpdate) -> dict:
  return {"bad": {"work": getattr(e, "work", -1), "index": e.index, "name": e.name,
                  "reason": e.reason, "message": str(e),
                  "non_finite": isinstance(e, merge_lib.NonFiniteUpdate)}}


def _raise_first_bad(reports: Sequence[dict]) -> None:
  """Raises what one process would have raised: the refusal earliest in the work order,
  else the first error."""
  bads = [r["bad"] for r in reports if "bad" in r]
  if bads:
    b = min(bads, key=lambda b: b["work"])
    if b["non_finite"]:
      raise merge_lib.NonFiniteUpdate(b["message"], b["index"], b["name"])
    raise merge_lib.BadUpdate(b["message"], b["index"], b["name"], b["reason"])
  errors = [r["error"] for r in reports if "error" in r]
  if errors:
    raise ExchangeError(f"a merge worker failed: {errors[0]}")


class Workers:
  """This process's place among the coordinator's merge workers."""

  def __init__(self, group: distributed.ProcessGroup, *, timeout_s: float = 3600.0):
    self.group = group
    self.timeout_s = float(timeout_s)  # Most a worker waits for another's result.
    self.channel = distributed.Channel("merge") if group.num_processes > 1 else None
    self.items_merged = 0  # Work items (blocks) this process merged, over all jobs.

  @property
  def leader(self) -> bool:
    return self.group.primary

  def _gather(self, key: str) -> list[dict]:
    return [self.channel.get(f"{key}/{w}", self.timeout_s)
            for w in range(self.group.num_processes)]

  def run_range(self, key: str, plan: merge_lib.RoundPlan, out: Bucket, out_prefix: str, *,
                read_ahead: int) -> list[dict]:
    """Merges this process's range of `plan` (job `key`); every worker's report."""
    w, m = self.group.process_id, self.group.num_processes
    work = merge_lib.split_work(plan, m)[w]
    if plan.spec.outer_clip_norm:
      try:
        report = {"squares": merge_lib.norm_squares(plan, work)}
      except merge_lib.BadUpdate as e:
        report = _bad_report(e)
      except Exception as e:  # noqa: BLE001  (reported: the others must not wait for it)
        report = {"error": f"worker {w}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      self.channel.put(f"{key}/norm/{w}", report)
      reports = self._gather(f"{key}/norm")
      if any("squares" not in r for r in reports):
        return reports
      merge_lib.apply_outer_clip(plan, [x for r in reports for x in r["squares"]])
    delay = float(os.environ.get(_FAULT_DELAY, "0") or 0)
    if delay and w:
      logging.warning("merge worker %d: fault injection, sleeping %.1f s before merging", w,
                      delay)
      time.sleep(delay)
    logging.info("merge worker %d/%d: job %s, work items %d..%d of %d", w, m, key,
                 work.start, work.stop, len(plan.work))
    try:
      result = merge_lib.merge_work(plan, out, out_prefix, work, read_ahead=read_ahead,
                                    partial=True)
      report = {"records": exchange.compact_records(result.records), "site_squares": result.site_squares}
      self.items_merged += len(work)
    except merge_lib.BadUpdate as e:
      report = _bad_report(e)
    except Exception as e:  # noqa: BLE001  (reported to the leader, which fails the round)
      report = {"error": f"worker {w}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    self.channel.put(f"{key}/result/{w}", report)
    return self._gather(f"{key}/result")

  def merge(self, key: str, plan: merge_lib.RoundPlan, out: Bucket, out_prefix: str, *,
            read_ahead: int = merge_lib.DEFAULT_READ_AHEAD) -> dict[str, dict]:
    """Every process's part of one merge; the leader gets the round's records (workers
    get {}). Raises BadUpdate (in every process) for the refusal one process would raise."""
    if self.channel is None:
      return merge_lib.merge_round_plan(plan, out, out_prefix, read_ahead=read_ahead)
    reports = self.run_range(key, plan, out, out_prefix, read_ahead=read_ahead)
    _raise_first_bad(reports)
    if not self.leader:
      return {}
    results = [merge_lib.RangeResult(exchange.expand_records(r["records"]), r["site_squares"])
               for r in reports]
    return merge_lib.finish_round(plan, results)

  def report_failure(self, key: str, why: str) -> None:
    """Worker: a job it cannot take part in (its inputs unreadable here); the leader
    fails that merge instead of waiting for this worker's range."""
    report = {"error": f"worker {self.group.process_id}: {why}"}
    self.channel.put(f"{key}/norm/{self.group.process_id}", report)
    self.channel.put(f"{key}/result/{self.group.process_id}", report)

  # ------------------------------------------------------------------ job messages

  def send_job(self, key: str, job: dict) -> None:
    """Leader: the next job (a merge, or {"kind": "done"/"stop"})."""
    if self.channel is not None:
      self.channel.put(f"job/{key}", job)

  def next_job(self, key: str, alive: Callable[[], None] = lambda: None) -> dict:
    """Worker: waits (as long as the round takes) for the leader's job `key`."""
    while True:
      try:
        return self.channel.get(f"job/{key}", _POLL_S)
      except TimeoutError:
        alive()
