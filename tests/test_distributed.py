"""Joining a party's processes under SLURM: which GPUs each task drives, and the
arguments `initialize` hands to jax.distributed (the end-to-end run is test_slurm)."""

import jax
import pytest

from tapestry_jax import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


def _env(**overrides):
  return {**SLURM, **{k: v for k, v in overrides.items() if v is not None}}


@pytest.mark.parametrize("overrides, expected", [
    # A process per host drives all of its GPUs (JAX's default: GPU 0 only).
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),
    # A process per GPU, all tasks seeing all GPUs: JAX's rule, GPU LOCALID.
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5"}, [5]),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, [5]),
    # Two tasks sharing a node's 8 GPUs: 4 each.
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, [4, 5, 6, 7]),
    # SLURM bound each task to its own GPUs (--gpus-per-task): all it sees.
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5",
      "CUDA_VISIBLE_DEVICES": "5"}, None),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "3", "SLURM_GPUS_PER_TASK": "2",
      "CUDA_VISIBLE_DEVICES": "6,7"}, None),
    # Uneven layouts: this node (SLURM_NODEID=1) runs 3 of '8,3' tasks.
    ({"SLURM_STEP_TASKS_PER_NODE": "8,3", "SLURM_LOCALID": "2",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}, [4, 5]),
    # The user decides.
    ({"JAX_LOCAL_DEVICE_IDS": "2,3"}, [2, 3]),
])
def test_slurm_gpus(overrides, expected):
  assert distributed.slurm_gpus(_env(**overrides)) == expected


def test_slurm_gpus_uneven_share_is_a_clear_error():
  env = _env(SLURM_STEP_TASKS_PER_NODE="3(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3")
  with pytest.raises(distributed.DistributedError, match="3 SLURM tasks .* 4 GPUs"):
    distributed.slurm_gpus(env)


def test_tasks_on_node_falls_back_to_the_job_layout():
  env = {k: v for k, v in _env().items() if k != "SLURM_STEP_TASKS_PER_NODE"}
  assert distributed._tasks_on_node({**env, "SLURM_TASKS_PER_NODE": "4(x3)"}) == 4
  assert distributed._tasks_on_node({**env, "SLURM_TASKS_PER_NODE": "2,6"}) == 6


@pytest.fixture
def fake_jax_initialize(monkeypatch):
  """Records jax.distributed.initialize's arguments instead of starting a job."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_GROUP", None)
  yield calls
  distributed._GROUP = None


@pytest.mark.parametrize("on_cpu, local_ids", [(False, [2, 3]), (True, None)])
def test_initialize_under_slurm_resolves_the_job(monkeypatch, fake_jax_initialize, on_cpu,
                                                 local_ids):
  for k, v in _env(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_STEP_TASKS_PER_NODE="2(x2)",
                   SLURM_LOCALID="1").items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.setattr(distributed, "_on_cpu", lambda: on_cpu)
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  assert distributed.initialize().how == "slurm"
  [kw] = fake_jax_initialize
  # JAX's own address rule (first node, port 61440 + job id % 4096); on GPUs the second
  # of two tasks drives the node's last 2 of 4 GPUs; on CPU there is nothing to choose.
  assert kw["coordinator_address"] == f"gpu003:{61440 + 4242 % 4096}"
  assert (kw["num_processes"], kw["process_id"]) == (2, 1)
  assert kw["local_device_ids"] == local_ids
  assert kw["cluster_detection_method"] == "deactivate"


def test_initialize_under_slurm_keeps_jax_coordinator_port(monkeypatch, fake_jax_initialize):
  for k, v in _env(JAX_COORDINATOR_PORT="12345", SLURM_STEP_TASKS_PER_NODE="2(x2)",
                   SLURM_LOCALID="1").items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  monkeypatch.setattr(distributed, "_on_cpu", lambda: False)
  distributed.initialize()
  [kw] = fake_jax_initialize
  assert kw["coordinator_address"] == "gpu003:12345"
  assert kw["local_device_ids"] == [1]


def test_explicit_flags_inside_slurm_are_not_overridden(monkeypatch, fake_jax_initialize):
  for k, v in _env(SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_LOCALID="1").items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(distributed, "_on_cpu", lambda: False)
  assert distributed.initialize("10.0.0.1:1234", 4, 3).how == "explicit"
  [kw] = fake_jax_initialize
  assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == (
      "10.0.0.1:1234", 4, 3)
  # All of this process's GPUs, not JAX's SLURM default of GPU SLURM_LOCALID.
  assert (kw["local_device_ids"], kw["cluster_detection_method"]) == (None, "deactivate")
