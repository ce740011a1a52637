"""The SLURM recipe (launch/slurm/run.sbatch) through a real sbatch/srun on a one-node
cluster on localhost: two tasks of launch.train form one 2-process JAX job from
SLURM's variables alone.

Skips when SLURM or munge are not installed (apt-get install -y --no-install-recommends
slurmctld slurmd slurm-client munge) or not root, unless TAPESTRY_REQUIRE_SLURM=1.
"""

import json
import os
import pathlib
import sys

import pytest

import slurm_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
  why = slurm_cluster.missing()
  if why:
    if os.environ.get("TAPESTRY_REQUIRE_SLURM") == "1":
      pytest.fail(f"TAPESTRY_REQUIRE_SLURM=1 but no local SLURM: {why}")
    pytest.skip(f"no local SLURM: {why}")
  with slurm_cluster.SlurmCluster(cpus=8) as c:
    yield c


def _job_env(devices: int) -> dict[str, str]:
  """What the submitting shell would export: the venv's python, 4 fake CPU devices."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def test_sbatch_two_tasks_train_as_one_job(cluster, tmp_path):
  out, workdir = tmp_path / "job.out", tmp_path / "lm"
  job = cluster.sbatch(
      ["--nodes=1", "--ntasks-per-node=2", f"--output={out}", "launch/slurm/run.sbatch",
       "launch.train", "--config=experiments/configs/lm.py:tiny", f"--workdir={workdir}",
       "--config.train.steps=4", "--config.train.eval_every=4", "--config.train.log_every=2"],
      env=_job_env(devices=4), cwd=REPO)
  state, code = cluster.wait(job, timeout_s=600)
  log = out.read_text(errors="replace") if out.exists() else "(no output file)"
  assert (state, code) == ("COMPLETED", "0:0"), f"job {job}: {state} {code}\n{log[-4000:]}"
  # Both tasks joined one job through SLURM's variables: 2 processes x 4 devices.
  assert "process 0 of 2 (slurm), 4 local of 8 devices" in log, log[-4000:]
  assert "process 1 of 2 (slurm), 4 local of 8 devices" in log, log[-4000:]
  assert log.count("done: step 4") == 2, log[-4000:]
  # One run: process 0 alone writes the metrics.
  assert [p.name for p in workdir.rglob("metrics.jsonl")] == ["metrics.jsonl"]
  steps = [json.loads(line).get("step") for line in (workdir / "metrics.jsonl").open()]
  assert 4 in steps, steps
