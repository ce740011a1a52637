"""Joining the processes of one party (a site or a coordinator) into one JAX job.

A frontier site is many hosts, each running one JAX process (multi-controller). Every
process calls `initialize` once, before anything touches a device; afterwards
`jax.devices()` lists the devices of all processes, the site mesh spans them, and
collectives run over the cluster's own transport (gloo on CPU). This is JAX's own
distributed runtime: no RPC of ours.

Where the processes come from:
  - Cloud TPU, SLURM, Open MPI and Kubernetes set environment variables that
    `jax.distributed.initialize()` reads by itself (`auto`); under SLURM the GPUs a
    task drives are chosen here (`slurm_gpus`), so a process per host works too.
  - Local runs and tests pass `coordinator_address`, `num_processes` and `process_id`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import logging


class DistributedError(ValueError):
  """Process-group settings that cannot start a multi-process job."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits in its party's job, as `initialize` resolved it."""
  process_id: int
  num_processes: int
  how: str  # 'single', 'explicit' or the detected cluster ('slurm', 'gce_tpu', ...)

  @property
  def primary(self) -> bool:
    """Process 0: the one that logs metrics, shows progress and writes one-writer files."""
    return self.process_id == 0


_GROUP: ProcessGroup | None = None


def _detected_cluster() -> str | None:
  """The name of the cluster environment JAX would auto-detect here, or None."""
  try:  # JAX's own detectors; private, so a rename degrades to 'no cluster'.
    from jax._src.clusters import ClusterEnv
    for env in ClusterEnv._cluster_types:  # noqa: SLF001
      if getattr(env, "opt_in_only_method", False):
        continue
      if env.is_env_present():
        return getattr(env, "name", env.__name__)
  except Exception:  # noqa: BLE001
    return None
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> ProcessGroup:
  """Joins this process to its party's job (once per process; later calls return it).

  With no arguments: a detected cluster environment (SLURM, Cloud TPU, Kubernetes,
  Open MPI) starts a multi-process job; otherwise this is a single process. A process
  that stops answering for `heartbeat_timeout_s` fails the whole job (every process
  stops; the job is restarted as a whole). With
  `num_processes=1` it is always a single process. Otherwise all three arguments are
  needed (local runs, tests). On CPU the cross-process collectives use gloo.
  """
  global _GROUP
  if _GROUP is not None:
    return _GROUP
  explicit = (coordinator_address, num_processes, process_id)
  if num_processes == 1 or (all(v is None for v in explicit) and _detected_cluster() is None):
    if process_id not in (None, 0):
      raise DistributedError(f"process_id={process_id} with a single process")
    _GROUP = ProcessGroup(0, 1, "single")
    return _GROUP
  if any(v is None for v in explicit) and not all(v is None for v in explicit):
    missing = [n for n, v in zip(("coordinator_address", "num_processes", "process_id"),
                                 explicit) if v is None]
    raise DistributedError(f"multi-process run: also set {', '.join(missing)} (or none of "
                           f"them, inside SLURM, Cloud TPU or Kubernetes)")
  if num_processes is not None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f"process_id must be in [0, {num_processes}), got {process_id}")
  how = "explicit" if coordinator_address is not None else _detected_cluster()
  on_cpu = _on_cpu()
  if on_cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Explicit settings are the whole truth: JAX's detectors would still pick devices
  # (under SLURM, GPU SLURM_LOCALID only).
  detection, local_ids = ("deactivate" if how == "explicit" else None), None
  if how == "slurm":  # resolved here: JAX's default drives one GPU per task (see below)
    coordinator_address, num_processes, process_id, local_ids = _slurm_params(
        os.environ, gpus=not on_cpu, timeout_s=timeout_s)
    detection = "deactivate"
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_ids,
                               cluster_detection_method=detection,
                               initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise DistributedError(f"could not join the job ({how}, coordinator "
                           f"{coordinator_address or 'auto'}): {first}") from None
  _GROUP = ProcessGroup(jax.process_index(), jax.process_count(), how)
  logging.info("process %d of %d (%s), %d local of %d devices", _GROUP.process_id,
               _GROUP.num_processes, how, jax.local_device_count(), jax.device_count())
  return _GROUP


def _slurm_params(environ, *, gpus: bool, timeout_s: int):
  """(coordinator address, process count, process id, local device ids) of a SLURM task.

  JAX's own SLURM detector restricts local task i to GPU i (a process per GPU, every
  task seeing all of its node's GPUs), so a process per host would drive one GPU of
  eight. Here the address, count and id are JAX's, and the GPUs are `slurm_gpus`'s.
  On CPU there is nothing to choose (JAX's ids only pick CUDA/ROCm devices)."""
  from jax._src.clusters.slurm_cluster import SlurmCluster
  address = environ.get("JAX_COORDINATOR_ADDRESS") or SlurmCluster.get_coordinator_address(
      timeout_s, environ.get("JAX_COORDINATOR_PORT"))
  local_ids = slurm_gpus(environ) if gpus else None
  return (address, int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"]), local_ids)


def slurm_gpus(environ) -> list[int] | None:
  """The GPUs (ordinals among those it sees) a SLURM task drives; None for all it sees.

  - `JAX_LOCAL_DEVICE_IDS=0,1` decides, as in JAX.
  - The only task on its node (a process per host): every GPU it sees.
  - A task SLURM bound to its own GPUs (`--gpus-per-task`, or fewer visible GPUs
    than tasks on the node): those.
  - Tasks sharing the node's N visible GPUs (`CUDA_VISIBLE_DEVICES`): N / tasks
    each, in order of SLURM_LOCALID; without `CUDA_VISIBLE_DEVICES`, GPU SLURM_LOCALID
    (JAX's rule: a process per GPU).
  """
  if environ.get("JAX_LOCAL_DEVICE_IDS"):
    return [int(i) for i in environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
  tasks = _tasks_on_node(environ)
  local_id = int(environ["SLURM_LOCALID"])
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if tasks == 1 or environ.get("SLURM_GPUS_PER_TASK") or 0 < len(visible) < tasks:
    return None
  if not visible:
    return [local_id]
  if len(visible) % tasks:
    raise DistributedError(f"{tasks} SLURM tasks on this node cannot share {len(visible)} "
                           f"GPUs evenly: set JAX_LOCAL_DEVICE_IDS per task, or one task per "
                           f"host / per GPU")
  per_task = len(visible) // tasks
  return list(range(local_id * per_task, (local_id + 1) * per_task))


def _tasks_on_node(environ) -> int:
  """How many tasks of this job step run on this task's node, from SLURM's
  'TASKS(xNODES),...' list (e.g. '8(x2),4')."""
  counts = []
  for part in (environ.get("SLURM_STEP_TASKS_PER_NODE") or
               environ.get("SLURM_TASKS_PER_NODE", "1")).split(","):
    tasks, _, repeat = part.partition("(x")
    counts += [int(tasks)] * int(repeat.rstrip(")") or 1)
  node = int(environ.get("SLURM_NODEID", 0))
  return counts[node] if node < len(counts) else counts[-1]


def _on_cpu() -> bool:
  """Whether this process will run on CPU (read from the environment: must not start
  a backend before `jax.distributed.initialize`)."""
  platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  import importlib.util
  has_accelerator = any(importlib.util.find_spec(m) is not None
                        for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu",
                                  "jax_rocm60_plugin"))
  return not has_accelerator


def group() -> ProcessGroup:
  """This process's group (a single process when `initialize` was never called)."""
  if _GROUP is not None:
    return _GROUP
  return ProcessGroup(jax.process_index(), jax.process_count(), "single")


def shutdown() -> None:
  """Leaves the job (every process, at the end of a clean run)."""
  global _GROUP
  if _GROUP is not None and _GROUP.num_processes > 1:
    jax.distributed.shutdown()
  _GROUP = None


class Channel:
  """Small JSON messages between the processes of one job, through JAX's coordination
  service (its key-value store): a leader's job description, the workers' results.
  Keys are written once."""

  def __init__(self, prefix: str = "tapestry"):
    from jax._src import distributed as jax_distributed  # The runtime's own client.

    self._client = jax_distributed.global_state.client
    if self._client is None:
      raise DistributedError("no multi-process job: call distributed.initialize first")
    self._prefix = prefix

  def put(self, key: str, value) -> None:
    self._client.key_value_set(f"{self._prefix}/{key}", json.dumps(value))

  def get(self, key: str, timeout_s: float):
    """The value at `key`, waiting up to `timeout_s` for it; TimeoutError after."""
    try:
      data = self._client.blocking_key_value_get(f"{self._prefix}/{key}",
                                                 int(max(1.0, timeout_s) * 1000))
    except Exception as e:  # noqa: BLE001  (the runtime raises its own error types)
      if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
        raise TimeoutError(f"no {key!r} from the job's leader after {timeout_s:.0f} s") from None
      raise DistributedError(f"job channel: {str(e).splitlines()[0][:300]}") from None
    return json.loads(data)

  def broadcast(self, key: str, value=None, timeout_s: float = 3600.0):
    """Process 0's `value`, on every process (the others wait for it)."""
    if jax.process_index() == 0:
      self.put(key, value)
      return value
    return self.get(key, timeout_s)

  def gather(self, key: str, value, timeout_s: float = 3600.0) -> list:
    """Every process's `value`, in process order, on every process."""
    self.put(f"{key}/{jax.process_index()}", value)
    return [self.get(f"{key}/{i}", timeout_s) for i in range(jax.process_count())]
