"""The cluster recipes under launch/ (slurm/, tpu_vm/, gke/): shell scripts parse (and
pass shellcheck where it is installed), the manifests have what a JobSet or Job needs
and run modules and configs that exist, and launch scripts stay thin. The SLURM
recipe itself runs in test_slurm; Cloud TPU and GKE cannot run here."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").rglob("*.sh")) + sorted((REPO / "launch").rglob("*.sbatch"))
MANIFESTS = sorted((REPO / "launch" / "gke").glob("*.yaml"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  if shutil.which("shellcheck"):
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _command_flags(container) -> list[str]:
  argv = container["command"] + container.get("args", [])
  if argv[:2] == ["bash", "-c"]:
    argv = shlex.split(argv[2])[1:]  # after 'exec'
  assert argv[:2] == ["python", "-m"], argv
  module = argv[2]
  assert (REPO / (module.replace(".", "/") + ".py")).exists(), module
  flags = dict(a.lstrip("-").split("=", 1) for a in argv[3:])
  assert (REPO / flags["config"].split(":")[0]).exists(), flags["config"]
  return flags


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_gke_manifests_have_what_their_kind_needs(manifest):
  yaml = pytest.importorskip("yaml")
  [doc] = list(yaml.safe_load_all(manifest.read_text()))
  name = doc["metadata"]["name"]
  if doc["kind"] == "Job":
    assert doc["apiVersion"] == "batch/v1"
    pod = doc["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    [container] = pod["containers"]
    _command_flags(container)
    return
  assert (doc["apiVersion"], doc["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  [rjob] = doc["spec"]["replicatedJobs"]
  job = rjob["template"]["spec"]
  assert rjob["name"] and rjob["replicas"] >= 1
  assert job["parallelism"] == job["completions"] >= 1  # every host runs, all at once
  assert job["backoffLimit"] == 0  # one lost process fails the JobSet, which restarts all
  pod = job["template"]["spec"]
  assert pod["restartPolicy"] == "Never"
  [container] = pod["containers"]
  flags = _command_flags(container)
  limits = container["resources"]["limits"]
  assert "google.com/tpu" in limits or "nvidia.com/gpu" in limits
  claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
  assert {m["name"] for m in container["volumeMounts"]} <= set(claims)
  if "coordinator_address" in flags:
    # Explicit process flags must match the JobSet: pod 0's DNS name, one process a pod.
    assert job.get("completionMode") == "Indexed"
    assert doc["spec"].get("network", {}).get("enableDNSHostnames", True)
    host, port = flags["coordinator_address"].rsplit(":", 1)
    assert host == f"{name}-{rjob['name']}-0-0.{name}"
    assert {"containerPort": int(port)} in container["ports"]
    assert int(flags["num_processes"]) == job["parallelism"] * rjob["replicas"]
    assert flags["process_id"] == "$JOB_COMPLETION_INDEX"


def test_tpu_vm_run_sends_the_flags_unchanged(tmp_path):
  """run.sh with a stand-in gcloud: the command every worker gets, split by a shell,
  is the module and flags as typed (spaces and globs included)."""
  gcloud = tmp_path / "gcloud"
  gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$GCLOUD_ARGS"\n')
  gcloud.chmod(0o755)
  record = tmp_path / "args"
  flags = ["--config=experiments/configs/federation.py:tiny", "--workdir=/mnt/shared/fed",
           "--site=latin", "--config.sites.latin.paths=/data/fr dir/*.txt"]
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "GCLOUD_ARGS": str(record),
         "PROJECT": "my-project"}
  subprocess.run(["bash", str(REPO / "launch/tpu_vm/run.sh"), "run", "my-tpu", "us-east5-a",
                  "launch.site", *flags], env=env, check=True)
  args = record.read_text().splitlines()
  assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert {"--zone=us-east5-a", "--worker=all", "--project=my-project"} <= set(args)
  [command] = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
  cd, rest = command.split(" && ", 1)
  assert cd == "cd ~/tapestry"
  argv = shlex.split(rest.split(" 2>&1 | tee ")[0])
  assert argv == [".venv/bin/python", "-m", "launch.site", *flags]


def test_tpu_vm_run_rejects_a_missing_module(tmp_path):
  r = subprocess.run(["bash", str(REPO / "launch/tpu_vm/run.sh"), "run", "my-tpu", "zone"],
                     capture_output=True, text=True)
  assert r.returncode == 2 and "usage:" in r.stderr
