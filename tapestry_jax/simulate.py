"""The whole federation in one process: the fast path for ablations.

The same `SiteWorker`s as the deployed sites (same trainer, data, adopt/train/delta)
and the same outer step (`outer.outer_step`: `outer.merge_block` on whole arrays instead
of chunks, which is bit-identical, with the coordinator's `federation.merge_spec`),
looped over sites; no buckets. Also the two references a federated
run is judged against: each site trained alone with the same local compute, and
synchronous data parallelism over the union of the sites' data with the same total
tokens and global batch.

Records have the same fields as the deployed site's `rounds.jsonl`, so one report
(`tapestry_jax.report`) reads both.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

import data_pipelines

from tapestry_jax import contribution
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import loop
from tapestry_jax import site as site_lib
from tapestry_jax import trees
from tapestry_jax import update_codecs
from tapestry_jax.coordinator import QuorumError, initial_round


def _workers(config, workdir: str, devices=None, *,
             reference: bool = False) -> dict[str, site_lib.SiteWorker]:
  """One worker per site (sorted names); sites with the same model/train/mesh share one
  compiled trainer, so a simulation compiles once, not once per site. `reference`: the
  sites train with the `train` recipe, without `federation.inner` (the references)."""
  trainers: dict[str, Any] = {}
  workers = {}
  for name in sorted(federation.site_names(config)):
    scfg = federation.site_config(config, name, reference=reference)
    key = json.dumps({k: scfg[k].to_dict() for k in ("model", "train", "mesh")}, sort_keys=True)
    if key not in trainers:
      trainers[key] = loop.site_setup(scfg, devices)[1]
    workers[name] = site_lib.SiteWorker(config, name, os.path.join(workdir, "sites", name),
                                        devices=devices, trainer=trainers[key],
                                        reference=reference)
  return workers


def simulate(config, workdir: str, *, devices=None, drop: Any = None) -> dict[str, Any]:
  """Runs `federation.rounds` rounds in-process; returns params, outer state and records.

  `drop(round, site) -> bool` drops that site's update from that round (a site that
  missed a round adopts the next global model, as a deployed late site does).
  With `federation.overlap_steps` (tau) a site that sent an update first trains tau steps
  from it, then adopts the next global round, carrying that progress onto it if its update
  went into it, as a deployed site does."""
  federation.check_federation_config(config, devices)
  f = config.federation
  workers = _workers(config, workdir, devices)
  spec = federation.merge_spec(config)  # The coordinator's merge settings.
  params, state = initial_round(config)
  records = []
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "simulation.jsonl"), "a")  # Records as they come.
  like = next(iter(workers.values())).trainer.param_shardings  # The params' structure.
  download = None  # (federation.download_dtype on) the last round's {name: outer.Download}.
  names = []  # The sites whose updates went into the current global round.
  # federation.contribution: the coordinator's check, on the same validation set.
  scorer = contribution.Scorer(config) if contribution.policy(config).on else None
  checks = []  # Each round's `contribution.Checked.record()`, with its round.
  for g in range(int(f.rounds) + 1):
    merged, deltas, tokens, names, norms = names, [], [], [], []
    for name, w in workers.items():
      ahead = {"losses": [], "compute_s": 0.0}
      if w.sent is not None:  # federation.overlap_steps: train on before adopting.
        ahead = w.train(w.overlap_steps)
      carry = w.sent is not None and name in merged
      # As a deployed site (site.read_global): holding round g - 1, it applies round g's
      # download; else it reads the whole round (under outer moments, the global Adam
      # moments too). Bytes are the raw array bytes a deployment would read (no bucket).
      if download is not None and w.holds(g - 1):
        w.adopt(*w.next_global(download), round_=g, carry=carry)
        read = jax.tree.leaves(download)
      else:
        # Shared moments synced every K rounds: a param round's moments are not adopted.
        moments = federation.moment_round(config, g)
        w.adopt(trees.unflatten(params, like), state if moments else None, round_=g,
                carry=carry)
        read = [*params.values(), *(jax.tree.leaves(state) if moments else [])]
      rec = {"site": name, "global_round": g, "bytes_down": sum(a.nbytes for a in read)}
      if ahead["losses"]:
        rec.update(overlap_steps=len(ahead["losses"]), carried=carry)
      if federation.evaluate_round(config, g):
        rec.update(w.evaluate(w.base))
      if g < int(f.rounds):
        stats = w.train(int(f.inner_steps) - len(ahead["losses"]), losses=ahead["losses"])
        del stats["losses"], stats["preempted"]  # A simulation is never preempted.
        stats["compute_s"] += ahead["compute_s"]
        rec.update(stats)
        if drop is not None and drop(g + 1, name):
          rec["dropped"] = True
        else:
          # What a deployed site sends (federation.update_dtype, encoded the same way).
          sent = w.encoded_update(round_=g + 1)
          norms.append(exchange.update_norm(sent))  # As the deployed site declares it.
          deltas.append({n: update_codecs.to_host(v) for n, v in sent.items()})
          # Every array stored: codes, their scales and top-k indices.
          rec["bytes_up"] = sum(a.nbytes for a in exchange.stored_arrays(deltas[-1]).values())
          tokens.append(rec["tokens"])
          names.append(name)
        if w.overlap_steps and g + 1 < int(f.rounds):
          w.keep_sent()  # Sent (or, dropped, sent too late): what the next steps start from.
      records.append(rec)
      log.write(json.dumps(rec) + "\n")
      log.flush()
    if g == int(f.rounds):
      break
    t0 = time.perf_counter()
    download = None
    weights = spec.weights(tokens) if deltas else None
    if deltas and scorer is not None:  # As the coordinator: refused updates leave the round.
      checked = scorer.check_arrays(params, names, deltas)
      keep = [k for k, n in enumerate(names) if n not in checked.refused]
      deltas, norms, tokens, names = ([x[k] for k in keep]
                                      for x in (deltas, norms, tokens, names))
      if checked.refused and len(names) < federation.quorum(config):
        raise QuorumError(f"round {g + 1}: refused updates of {checked.refused}; {len(names)} "
                          f"updates remain, quorum {federation.quorum(config)}")
      weights = checked.weights(names, tokens, spec.weight_cap)
      checks.append({"round": g + 1, **checked.record()})
    if deltas:
      # Clipped by the norms the sites declare: the coordinator then merges the same bits.
      new_params, new_state, *down = spec.for_round(g + 1).outer_step(
          params, state, [exchange.as_update(d) for d in deltas], weights,
          norms=norms)
      params = {n: np.asarray(v) for n, v in new_params.items()}
      state = jax.device_get(new_state)
      download = jax.device_get(down[0]) if down else None
    logging.info("simulate: round %d merged from %s in %.2f s", g + 1, names,
                 time.perf_counter() - t0)
  log.close()
  for w in workers.values():
    w.close()
  out = {"params": params, "outer_state": state, "records": records}
  if scorer is not None:
    out["contribution"] = checks
  return out


def train_alone(config, workdir: str, *, devices=None) -> dict[str, dict]:
  """Each site alone: the same init, data, steps and `train` recipe (without the
  federated sites' `federation.inner` changes), no exchange. Returns site -> held-out
  metrics of its own final model on its own data."""
  f = config.federation
  steps = int(f.rounds) * int(f.inner_steps)
  results = {}
  for name, w in _workers(config, os.path.join(workdir, "alone"), devices,
                          reference=True).items():
    stats = w.train(steps)
    results[name] = {**w.evaluate(), "tokens": stats["tokens"], "compute_s": stats["compute_s"]}
  return results


def train_data_parallel(config, workdir: str, *, devices=None) -> dict[str, dict]:
  """Synchronous data parallelism over the union of all sites' data: global batch =
  sites x per-site batch, the same number of steps, so the same total tokens.
  Returns site -> held-out metrics of the one model on that site's data."""
  names = sorted(federation.site_names(config))
  dp = federation.site_config(config, names[0], reference=True)
  scfgs = [federation.site_config(config, n, reference=True) for n in names]
  if len({c.data.source for c in scfgs}) != 1:
    raise ValueError("the data-parallel reference needs every site on the same data source")
  dp.data.paths = ",".join(c.data.paths for c in scfgs if c.data.paths)
  dp.data.synthetic.languages = ",".join(c.data.synthetic.languages for c in scfgs)
  dp.train.global_batch_size = len(names) * int(config.train.global_batch_size)
  _, trainer = loop.site_setup(dp, devices)
  it = iter(data_pipelines.make_dataset(dp.data, split="train",
                                        batch_size=dp.train.global_batch_size // jax.process_count(),
                                        seed=dp.data.seed))
  state = trainer.init_state(int(dp.train.seed))
  with jax.set_mesh(trainer.mesh):
    for _ in range(int(dp.train.steps)):
      state, _ = trainer.train_step(state, trainer.shard_batch(next(it)))
  workers = _workers(config, os.path.join(workdir, "dp"), devices, reference=True)
  return {n: w.evaluate(state.params) for n, w in workers.items()}


def train_base(config, workdir: str, paths: str, steps: int, *, devices=None) -> str:
  """A base model for every arm to start from (`train.init_from`): a stand-in for an
  open model pretrained on public text, i.e. NOT on the sites' data. `steps` steps of
  the `train` recipe on the text files `paths` (comma-separated), global batch = sites x
  per-site batch. Returns its workdir (WORKDIR/base; an existing one is resumed, so a
  rerun reuses it)."""
  names = sorted(federation.site_names(config))
  c = federation.site_config(config, names[0], reference=True)
  c.data.source, c.data.paths = "text_files", paths
  c.train.global_batch_size = len(names) * int(config.train.global_batch_size)
  c.train.steps = c.train.checkpoint_every = int(steps)
  c.train.eval_every, c.train.init_from, c.train.progress_bar = 0, "", False
  out = os.path.join(workdir, "base")
  result = loop.train_and_evaluate(c, out, devices=devices)
  logging.info("base model: %d steps on %s, held-out bits/byte %.3f", int(steps), paths,
               result.get("eval", {}).get("eval_bits_per_byte", float("nan")))
  return out
