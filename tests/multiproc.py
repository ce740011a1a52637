"""Launches real `python -m launch.train` jobs of N processes on localhost (tests only)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time

import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny LM, small enough that a process spends its time starting, not training.
TINY = ("--config.data.seq_len=64", "--config.data.synthetic.num_documents=200",
        "--config.data.prefetch_threads=0", "--config.train.global_batch_size=8",
        "--config.train.warmup_steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.eval_batches=2",
        "--config.train.progress_bar=False", "--config.train.peak_flops=1e11")


# One persistent compilation cache for every job of a test session: a rerun of the same
# program (a resumed run, the second process count) skips XLA compilation.
_CACHE = tempfile.mkdtemp(prefix="tapestry_mp_cache_")


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


class Job:
  """N processes of one `launch.train` run, each with K fake CPU devices."""

  def __init__(self, workdir, processes: int, devices: int, *flags: str, timeout_s: int = 240):
    self.timeout_s = timeout_s
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    args = [sys.executable, "-m", "launch.train", "--config=experiments/configs/lm.py:tiny",
            f"--workdir={workdir}", *TINY, *flags]
    port = portpicker.pick_unused_port() if processes > 1 else None
    self.procs = []
    for i in range(processes):
      extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                f"--process_id={i}"] if processes > 1 else [])
      self.procs.append(subprocess.Popen(
          args + extra, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, start_new_session=True))

  def signal(self, i: int, sig: int = signal.SIGTERM) -> None:
    self.procs[i].send_signal(sig)

  def wait(self) -> list[Result]:
    """Every process's exit; stragglers past the timeout are killed (and reported)."""
    deadline = time.monotonic() + self.timeout_s
    results = []
    for p in self.procs:
      try:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        out, err = p.communicate()
        err += f"\n[killed after {self.timeout_s} s]"
      results.append(Result(p.returncode, out, err))
    return results

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill()
    for p in self.procs:
      p.wait()


def run(workdir, processes: int, devices: int, *flags: str, timeout_s: int = 240) -> list[Result]:
  """Runs one job to its end; AssertionError with the processes' stderr unless all exit 0."""
  with Job(workdir, processes, devices, *flags, timeout_s=timeout_s) as job:
    results = job.wait()
  if any(r.returncode != 0 for r in results):
    raise AssertionError("\n".join(f"process {i}: exit {r.returncode}\n{r.stderr[-3000:]}"
                                   for i, r in enumerate(results)))
  return results
