"""A whole federation on one machine: the coordinator and every site as separate
processes that share nothing but the buckets, or simulated in this process (what
`launch.federate` runs: `run_federation`).

Each process gets the same config arguments, logs to `WORKDIR/logs/<party>.log`, and is
watched: the console shows global rounds as the coordinator commits them, and if any
process fails the others are stopped and its log's last lines are raised.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from absl import logging
from tqdm import tqdm

import data_pipelines
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import plots
from tapestry_jax import report
from tapestry_jax import simulate
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError


class PartyFailed(RuntimeError):
  """A coordinator or site process exited with an error."""


def _tail(path: str, n: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def run_processes(config, workdir: str, config_args: list[str], *, env: dict | None = None,
                  party_args: dict[str, list[str]] | None = None,
                  party_env: dict[str, dict[str, str]] | None = None,
                  processes: dict[str, int] | None = None,
                  progress: bool = True, timeout_s: float | None = None) -> None:
  """Starts the coordinator and every site; returns when all have finished.

  `party_args` / `party_env` add arguments / environment variables to one party's
  processes only (its own key and credentials), by party name (the coordinator's is
  'coordinator'). `processes` runs a party as that many processes of one JAX job
  (joined on a free localhost port; process i > 0 logs to `<party>.<i>.log`)."""
  party_args, party_env = party_args or {}, party_env or {}
  config_args = list(config_args)
  if config.federation.trust.require_signatures:
    # Every party runs on this machine: each gets a key pair of its own in WORKDIR/keys
    # (kept across reruns, so a rerun resumes), and every process the same trust root.
    trust.ensure_local_keys(config, os.path.join(os.path.abspath(workdir), "keys"),
                            federation.party_names(config))
    config_args += [f"--config.federation.trust.public_keys.{p}={k}"
                    for p, k in config.federation.trust.public_keys.items()]
  workdir = os.path.abspath(workdir)
  logs = os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  env = dict(os.environ if env is None else env)
  common = [*config_args, f"--workdir={workdir}"]
  c = federation.COORDINATOR
  parties = {c: [sys.executable, "-m", "launch.coordinator", *common, *party_args.get(c, [])]}
  envs = {c: dict(env, **party_env.get(c, {}))}
  for name in federation.site_names(config):
    parties[name] = [sys.executable, "-m", "launch.site", *common, f"--site={name}",
                     *party_args.get(name, [])]
    envs[name] = dict(env, **party_env.get(name, {}))
  procs = {}
  for party, cmd in parties.items():
    n = int((processes or {}).get(party, 1))
    address = f"127.0.0.1:{_free_port()}"
    for i in range(n):
      name = party if i == 0 else f"{party}.{i}"
      flags = ([f"--coordinator_address={address}", f"--num_processes={n}",
                f"--process_id={i}"] if n > 1 else [])
      log = open(os.path.join(logs, f"{name}.log"), "a")
      procs[name] = (subprocess.Popen([*cmd, *flags], stdout=log, stderr=subprocess.STDOUT,
                                      env=envs[party], start_new_session=True), log)
  rounds_file = os.path.join(workdir, "coordinator", "rounds.jsonl")
  bar = tqdm(total=int(config.federation.rounds), desc="global rounds", unit="round",
             disable=not progress, dynamic_ncols=True)
  t0 = time.monotonic()
  try:
    while True:
      done = len(report.read_jsonl(rounds_file))
      if done > bar.n:
        bar.update(done - bar.n)
      codes = {p: proc.poll() for p, (proc, _) in procs.items()}
      failed = {p: c for p, c in codes.items() if c not in (None, 0)}
      if failed:
        party, code = next(iter(failed.items()))
        raise PartyFailed(f"{party} exited with status {code}; the end of "
                          f"{os.path.join(logs, party + '.log')}:\n"
                          f"{_tail(os.path.join(logs, party + '.log'))}")
      if all(c == 0 for c in codes.values()):
        return
      if timeout_s is not None and time.monotonic() - t0 > timeout_s:
        raise PartyFailed(f"the federation did not finish in {timeout_s:.0f} s "
                          f"(still running: {[p for p, c in codes.items() if c is None]})")
      time.sleep(0.5)
  finally:
    bar.close()
    for proc, log in procs.values():
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
          proc.wait(10)
        except subprocess.TimeoutExpired:
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
      log.close()


def config_args_from(argv: Sequence[str]) -> list[str]:
  """The --config and --config.* arguments of a command line, to hand unchanged to every
  party's process (so each builds the same config)."""
  out, it = [], iter(argv)
  for a in it:
    if a == "--config" or (a.startswith("--config.") and "=" not in a):
      out += [a, next(it, "")]
    elif a.startswith("--config=") or a.startswith("--config."):
      out.append(a)
  return out


def run_federation(config, workdir: str, *, mode: str = "processes",
                   config_args: Sequence[str] = (), credentials_dir: str | None = None,
                   samples: bool = False) -> tuple[dict[str, Any], str]:
  """Runs a whole federation on this machine and compares it with each site alone.

  mode 'processes': the coordinator and one process per site (`run_processes`), each
  started with `config_args` (the command line's, see `config_args_from`) and, with
  `credentials_dir`, only its own DIR/PARTY.aws-credentials; 'simulate': every site in
  this process. Then, if config.federation.compare_alone, every site is trained alone
  with the same local compute. With `samples`, the summary also holds one short sample
  per site from the final global model (`global_samples`). Returns the summary and the
  path it was written to, WORKDIR/summary.json."""
  if mode not in ("processes", "simulate"):
    raise ConfigError(f"mode {mode!r} is not 'processes' or 'simulate'")
  federation.check_federation_config(config)
  if mode == "processes":
    party_args = {}
    if credentials_dir:
      party_args = {p: [f"--credentials={os.path.join(credentials_dir, p)}.aws-credentials"]
                    for p in federation.party_names(config)}
    run_processes(config, workdir, list(config_args), party_args=party_args)
    sites, coord = report.deployment_records(workdir, federation.site_names(config))
    final_params = None  # Read back from the global bucket.
  else:
    sim = simulate.simulate(config, workdir)
    sites, coord, final_params = sim["records"], None, sim.get("params")
  alone = None
  if config.federation.compare_alone:
    logging.info("training every site alone with the same local compute")
    alone = simulate.train_alone(config, workdir)
  summary = report.summarize(config, sites, coord, alone=alone)
  if samples:
    summary["samples"] = {n: {"prompt": p, "continuation": c} for n, (p, c) in
                          global_samples(config, workdir, params=final_params).items()}
  path = report.write(summary, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:  # For plots: the model's size.
    f.write(config.to_json_best_effort(indent=2))
  plots.plot_run_or_warn(workdir)
  return summary, path


def global_samples(config, workdir: str, *, params: dict[str, Any] | None = None,
                   prompt_tokens: int = 24, max_new_tokens: int = 48, temperature: float = 0.7,
                   top_k: int = 20, seed: int = 0) -> dict[str, tuple[str, str]]:
  """One short sample per site from the federation's latest global model: site ->
  (prompt, continuation), the prompt being the start of a held-out document of the
  site's. The model is the global bucket's latest round (its coordinator's signature
  checked when the trust root has its key), or `params` (a simulation's final global
  params, by leaf name)."""
  from tapestry_jax import generate, loop, model_source  # pylint: disable=import-outside-toplevel

  names = federation.site_names(config)
  first = federation.site_config(config, names[0], reference=True)
  if params is None:
    url = federation.bucket_urls(config, workdir)[federation.GLOBAL]
    key = str(config.federation.trust.public_keys.get(federation.COORDINATOR, "") or "")
    g = model_source.load(url, config=first, public_key=key, name="global")
  else:
    mcfg = model_lib.ModelConfig.from_config(config.model)
    like = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
    g = model_source.Loaded("global", mcfg, trees.unflatten(params, like),
                            data_pipelines.make_tokenizer(first.data), first.data)
  out = {}
  for name in names:
    batch = next(iter(loop.eval_batches(federation.site_config(config, name, reference=True))))
    inputs, segments = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
    starts = np.argwhere((inputs == g.tokenizer.bos_id) & (segments > 0))
    r, c = starts[0] if len(starts) else (0, 0)  # A document's start (its BOS), if any.
    row = inputs[r, c:][segments[r, c:] == segments[r, c]]
    n = min(prompt_tokens + 1, len(row))
    while n > 2 and g.tokenizer.decode(row[:n]).endswith("\ufffd"):
      n -= 1  # Whole characters only (a byte-level prompt may end mid-character).
    new = generate.generate(g.model_cfg, g.params, [np.asarray(row[:n])],
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, seed=seed, stop_ids=(g.tokenizer.eos_id,))[0]
    out[name] = (g.tokenizer.decode(row[:n]), g.tokenizer.decode(new))
  return out

