"""A one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd in a
temporary directory, with their own ports, socket and state (nothing under /etc).

Needs Debian's slurmctld, slurmd, slurm-client and munge packages and root (slurmd
launches job steps as the submitting user). The node is named `localhost` and claims
`cpus` CPUs whatever the machine has (`SlurmdParameters=config_overrides`), so a
2-core machine can run a multi-task job.

    with SlurmCluster() as cluster:
      job = cluster.sbatch(["launch/slurm/run.sbatch", "launch.train", ...], env=env)
      state = cluster.wait(job)
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import portpicker

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


def missing() -> str | None:
  """Why a cluster cannot start here (a missing program, not root), or None."""
  absent = [p for p in DAEMONS + CLIENTS + ("mungekey",) if shutil.which(p) is None
            and not os.path.exists(f"/usr/sbin/{p}")]
  if absent:
    return (f"{', '.join(absent)} not installed (apt-get install -y --no-install-recommends "
            f"slurmctld slurmd slurm-client munge)")
  if os.geteuid() != 0:
    return "a local slurmd needs root"
  return None


def _program(name: str) -> str:
  return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
  """munged + slurmctld + slurmd for one node `localhost`, started on enter and
  stopped (jobs cancelled, daemons terminated, then killed) on exit."""

  def __init__(self, cpus: int = 8, start_timeout_s: float = 60.0):
    self.cpus = cpus
    self.start_timeout_s = start_timeout_s
    self.dir = pathlib.Path(tempfile.mkdtemp(prefix="tapestry_slurm_"))
    self.conf = self.dir / "slurm.conf"
    self.munge_socket = self.dir / "munge" / "munge.socket"
    self._procs: dict[str, subprocess.Popen] = {}

  @property
  def env(self) -> dict[str, str]:
    """The environment a client (sbatch, srun, scontrol) needs to find this cluster."""
    return {**os.environ, "SLURM_CONF": str(self.conf)}

  def __enter__(self) -> SlurmCluster:
    try:
      self._start()
    except BaseException:
      self.stop()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def _start(self) -> None:
    munge_dir = self.munge_socket.parent
    munge_dir.mkdir(mode=0o700)
    key = munge_dir / "munge.key"
    subprocess.run([_program("mungekey"), "--create", f"--keyfile={key}"], check=True,
                   capture_output=True)
    key.chmod(0o600)
    self._spawn("munged", [_program("munged"), "--foreground", "--force",
                           f"--socket={self.munge_socket}", f"--key-file={key}",
                           f"--pid-file={munge_dir / 'munged.pid'}",
                           f"--log-file={munge_dir / 'munged.log'}",
                           f"--seed-file={munge_dir / 'munged.seed'}"])
    self._wait_for(lambda: self.munge_socket.exists(), "munged's socket")
    self._write_conf()
    self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
    self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld")
    self._spawn("slurmd", [_program("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
    self._wait_for(lambda: self._ok(["sinfo", "-h", "-n", "localhost", "-o", "%T"], "idle"),
                   "slurmd (node localhost idle)")

  def _write_conf(self) -> None:
    d = self.dir
    for sub in ("state", "spool"):
      (d / sub).mkdir()
    ctld_port, slurmd_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    # JAX's SLURM detector puts process 0's coordinator on port 61440 + job id % 4096:
    # start at a job id whose port is free (concurrent test clusters would collide at 1).
    first_job_id = next(i for i in random.sample(range(1000, 100_000), 200)
                        if portpicker.is_port_free(61440 + i % 4096))
    self.conf.write_text(f"""\
ClusterName=tapestry_test
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
FirstJobId={first_job_id}
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

  def _spawn(self, name: str, argv: list[str]) -> None:
    log = open(self.dir / f"{name}.stdout", "wb")  # noqa: SIM115  (closed with the process)
    self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)

  def _ok(self, argv: list[str], expect: str) -> bool:
    r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and expect in r.stdout

  def _wait_for(self, ready, what: str) -> None:
    deadline = time.monotonic() + self.start_timeout_s
    while time.monotonic() < deadline:
      for name, proc in self._procs.items():
        if proc.poll() is not None:
          raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                             f"{self.logs(name)}")
      if ready():
        return
      time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {self.start_timeout_s:.0f} s:\n{self.logs()}")

  def logs(self, *names: str) -> str:
    """The tail of the daemons' log files (for failure messages)."""
    out = []
    for name in names or DAEMONS:
      for path in sorted(self.dir.rglob(f"{name}*.log")) + sorted(self.dir.glob(f"{name}.stdout")):
        out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace")
                                                    .splitlines()[-30:]))
    return "\n".join(out)

  def sbatch(self, argv: list[str], env: dict[str, str] | None = None, cwd=None) -> int:
    """Submits a batch job (`sbatch --parsable ARGV`) and returns its job id."""
    r = subprocess.run(["sbatch", "--parsable", *argv], env={**(env or os.environ),
                       "SLURM_CONF": str(self.conf)}, cwd=cwd, capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
      raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
    return int(r.stdout.strip().split(";")[0])

  def job_state(self, job_id: int) -> tuple[str, str]:
    """(state, exit code 'a:b') of a job, from slurmctld's memory."""
    r = subprocess.run(["scontrol", "show", "job", str(job_id)], env=self.env,
                       capture_output=True, text=True, timeout=30)
    fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?")

  def wait(self, job_id: int, timeout_s: float) -> tuple[str, str]:
    """Waits until the job ends; returns its final (state, exit code)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      state, code = self.job_state(job_id)
      if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
        return state, code
      time.sleep(1.0)
    subprocess.run(["scancel", str(job_id)], env=self.env, capture_output=True, timeout=30)
    raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s:\n{self.logs()}")

  def stop(self) -> None:
    """Cancels every job, then stops slurmd, slurmctld and munged (SIGKILL after a grace)."""
    if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
      subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True,
                     timeout=30)
    for name in reversed(DAEMONS):
      proc = self._procs.pop(name, None)
      if proc is None or proc.poll() is not None:
        continue
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
