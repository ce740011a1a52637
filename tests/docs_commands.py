"""Every shell command in the README and the docs, and how each is exercised.

A command is a line (with its `\\` continuations) in a ```bash block of `DOCS`. Each must
match a rule in `RULES`: either it is RUN here with a tiny budget (extra flags appended,
`/tmp/` paths moved into one scratch directory), or it is COVERED by named tests that run the
same entry point with the same kind of arguments (two parties that must run together, a
cluster, a benchmark of many minutes). `tests/test_docs_commands.py` checks, in the
default suite, that every command has a rule and every named test exists; `.ci/run` runs
the RUN commands:

  python -m tests.docs_commands --run            # every RUN command, tiny budgets
  python -m tests.docs_commands --list           # each command and its rule
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/*.md", "data_pipelines/README.md", "launch/CLUSTERS.md")

# A tiny federation: a few rounds of a few steps, the alone references kept.
_TINY_FED = ("--config.federation.rounds=3 --config.federation.eval_every=1 "
             "--config.train.eval_batches=2 --config.federation.inner_steps=2")
_TINY_TRAIN = "--config.train.steps=6 --config.train.eval_every=3 --config.train.eval_batches=2"


@dataclasses.dataclass(frozen=True)
class Command:
  path: str  # relative to ROOT
  line: int
  text: str  # continuations joined, comments removed


@dataclasses.dataclass(frozen=True)
class Run:
  """Run the command here with `extra` appended (after the first `&&`-chain's install
  steps, which .ci/run has done already, are dropped)."""
  extra: str = ""
  timeout_s: float = 300.0
  # Commands run in phase order: 1 reads what phase-0 commands wrote (launch.plot,
  # launch.evaluate of a workdir), 2 what phase 1 wrote (an exported model).
  phase: int = 0
  subs: tuple[tuple[str, str], ...] = ()  # (documented, tiny-budget) text replacements


@dataclasses.dataclass(frozen=True)
class Covered:
  """Exercised by these tests ("tests/test_x.py::test_name", ...)."""
  tests: tuple[str, ...]


# (regex searched in the command text, rule). The first match wins. Flags appended later
# win over the documented ones (absl), which is how a RUN keeps its budget tiny.
_FQ = (f"{_TINY_FED} --workdir=/tmp/fq")
RULES: list[tuple[str, Run | Covered]] = [
    (r"pip install -e '\.\[test\]' && python -m pytest", Covered((".ci/run",))),
    (r"^pip install -e '\.\[(cuda12|tpu)\]'", Covered((
        "tests/test_install.py::test_accelerator_extras_are_jaxs_own",))),
    (r"^pip install", Covered((".ci/run",))),
    (r"python -m launch\.federate", Run(_TINY_FED)),
    (r"python -m launch\.(coordinator|site) .*--num_processes", Covered((
        "tests/test_federation.py::"
        "test_a_federation_of_multi_process_parties_is_its_simulation_bit_for_bit",))),
    (r"python -m launch\.site .*--private_key", Covered((
        "tests/test_s3.py::"
        "test_a_federation_of_processes_runs_over_s3_each_party_with_its_own_credentials",))),
    (r"python -m launch\.(coordinator|site)", Covered((
        "tests/test_federation.py::test_simulation_and_deployment_give_the_same_global_model",))),
    (r"python -m launch\.train .*--num_processes", Covered((
        "tests/test_multiprocess.py::"
        "test_one_and_two_processes_train_alike_and_checkpoints_move_between_them",))),
    (r"python -m launch\.train .*init_from='s3://", Covered((
        "tests/test_loop.py::test_init_from_a_federations_global_bucket_verifies_the_round",
        "tests/test_s3.py::"
        "test_a_federation_of_processes_runs_over_s3_each_party_with_its_own_credentials"))),
    (r"python -m launch\.train .*init_from=hf:", Run(_TINY_TRAIN, phase=2)),
    (r"python -m launch\.train", Run(_TINY_TRAIN)),
    # The communication sweep's runs are 2,000 steps per site: its configs are checked.
    (r"python -m launch\.sweep .*communication\.py", Covered((
        "tests/test_sweep.py::test_every_shipped_sweep_gives_valid_configs",
        "tests/test_references.py"))),
    # One run of the sweep (its own rounds and H), no alone references.
    (r"python -m launch\.sweep", Run("--runs=H100 --noalone")),
    (r"python -m launch\.keygen .*--change_key", Covered((
        "tests/test_key_rotation.py::"
        "test_launch_keygen_makes_the_root_key_and_publishes_a_key_change",))),
    (r"python -m launch\.keygen", Run()),
    (r"python -m launch\.plot", Run(phase=1)),
    (r"python -m launch\.evaluate .*--model=hf:", Run(phase=2)),
    (r"python -m launch\.evaluate", Run(phase=1, subs=(("@100", "@6"),))),
    (r"python -m launch\.export", Run(phase=1, subs=(("@200", "@6"),))),
    (r"python -m launch\.sample .*--model=hf:", Run(phase=2)),
    (r"python -m launch\.sample", Run(phase=1)),
    (r"python -m launch\.audit", Covered((
        "tests/test_audit.py::test_launch_audit_prints_provenance_and_exits_0",))),
    (r"python -m data_pipelines\.train_sentencepiece", Run()),
    (r"python -m experiments\.benchmarks\.federation_quality .*--base_paths",
     Run(f"{_FQ} --base_steps=2", timeout_s=600)),
    (r"python -m experiments\.benchmarks\.federation_quality .*\+fedadam",
     Run("--config.federation.rounds=6 --config.federation.eval_every=3 "
         "--config.train.eval_batches=2 --config.federation.outer.warmup_rounds=1 "
         "--workdir=/tmp/fq", timeout_s=600)),
    (r"python -m experiments\.benchmarks\.federation_quality .*--seeds=3",
     Run(f"{_FQ} --seeds=2", timeout_s=900)),
    (r"python -m experiments\.benchmarks\.federation_quality", Run(_FQ, timeout_s=600)),
    # Both arms (no overlap, then overlap), briefly.
    (r"python -m experiments\.benchmarks\.federation_overhead .*--overlap_steps",
     Run("--inner_steps=4 --rounds=4 --overlap_steps=2 --workdir=/tmp/fo", timeout_s=600)),
    # Through 20 Mbit/s buckets: about 4 minutes on a loaded 2-core machine.
    (r"python -m experiments\.benchmarks\.federation_overhead .*--max_mbps",
     Run("--inner_steps=2 --rounds=2 --workdir=/tmp/fo", timeout_s=600)),
    (r"python -m experiments\.benchmarks\.federation_overhead",
     Run("--inner_steps=2 --rounds=2 --workdir=/tmp/fo")),
    # Reads what the federation_overhead command before it wrote (--json_out).
    (r"python -m experiments\.benchmarks\.utilization_model .*--check", Run(phase=1)),
    (r"python -m experiments\.benchmarks\.utilization_model", Run()),
    (r"python -m experiments\.benchmarks\.merge_throughput",
     Run("--sites=2 --update_mib=2 --repeats=1 --workdir=/tmp/mt")),
    (r"python -m experiments\.benchmarks\.trust_overhead",
     Run("--preset=tiny --repeats=3 --s3_repeats=1")),
    (r"python -m experiments\.benchmarks\.sample_throughput",
     Run("--preset=tiny --batch=2 --prompt_len=8 --new_tokens=8 --repeats=1")),
    (r"python -m experiments\.benchmarks\.data_throughput", Run("--documents=60 --repeats=1")),
    (r"python -m experiments\.benchmarks\.train_throughput",
     Run("--preset=tiny --steps=2 --batch=2 --seq_len=64 --matmul_n=256")),
    (r"^(JAX_PLATFORMS=cpu )?sbatch", Covered(("tests/test_slurm.py", "tests/test_recipes.py"))),
    (r"^(launch/tpu_vm/|docker build|kubectl)", Covered(("tests/test_recipes.py",))),
]


_SHELL = ("bash", "sh", "shell")


def _fenced_lines(root: str):
  """(path relative to root, line number, the block's language, line) for every line
  inside a fenced code block of the docs."""
  for pattern in DOCS:
    for path in sorted(glob.glob(os.path.join(root, pattern))):
      rel, in_block, lang = os.path.relpath(path, root), False, ""
      with open(path) as f:
        for i, line in enumerate(f.read().splitlines(), 1):
          if line.startswith("```"):
            in_block, lang = not in_block, line[3:].strip()
          elif in_block:
            yield rel, i, lang, line


def commands(root: str = ROOT) -> list[Command]:
  """Every command in a ```bash block of the docs."""
  out = []
  pending, start = "", 0
  for rel, i, lang, line in _fenced_lines(root):
    if lang not in _SHELL:
      continue
    text = re.sub(r"(^|\s)#.*$", "", line).rstrip()  # shell comments
    if not pending:
      start = i
    if text.endswith("\\"):
      pending += text[:-1].strip() + " "
      continue
    text = (pending + text.strip()).strip()
    pending = ""
    if text and not text.startswith("...") and not re.match(r"^(done|for |wait)", text):
      out.append(Command(rel, start, text))
  return out


def untagged_commands(root: str = ROOT) -> list[str]:
  """`python -m` lines in fenced blocks that are not tagged bash (they would escape)."""
  return [f"{rel}:{i}" for rel, i, lang, line in _fenced_lines(root)
          if lang not in _SHELL and "python -m " in line]


def rule(cmd: Command) -> Run | Covered | None:
  for regex, r in RULES:
    if re.search(regex, cmd.text):
      return r
  return None


def runnable(cmd: Command, scratch: str, r: Run) -> str:
  """The shell line to run: install steps dropped, /tmp paths in `scratch`, `extra` added."""
  text = cmd.text
  if "pip install" in text:
    text = text.split("&&")[-1].strip()
  for documented, tiny in r.subs:
    text = text.replace(documented, tiny)
  text = f"{text} {r.extra}".strip()
  return text.replace("~/", scratch + "/home/").replace("/tmp/", scratch + "/")


def run_all(root: str = ROOT, only: str = "") -> int:
  failures = []
  todo = [(c, rule(c)) for c in commands(root)]
  todo = [(c, r) for c, r in todo if isinstance(r, Run) and only in c.text]
  todo.sort(key=lambda cr: cr[1].phase)
  # `python` in a command is this interpreter (its venv), as for a user who activated it.
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  with tempfile.TemporaryDirectory(prefix="docs_commands_") as scratch:
    for n, (cmd, r) in enumerate(todo, 1):
      # One scratch directory for all, as /tmp is for a user: a command may read what an
      # earlier one wrote (launch.plot a workdir).
      line = runnable(cmd, scratch, r)
      os.makedirs(os.path.join(scratch, "home"), exist_ok=True)
      t0 = time.monotonic()
      try:
        proc = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True,
                              timeout=r.timeout_s)
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
      except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {r.timeout_s:.0f} s"
      print(f"[{n}/{len(todo)}] {'ok' if ok else 'FAILED'} {time.monotonic() - t0:.0f}s "
            f"{cmd.path}:{cmd.line}: {shlex.split(line)[:3]}", flush=True)
      if not ok:
        failures.append(f"{cmd.path}:{cmd.line}: {line}\n{tail}")
  for f in failures:
    print("\n--- FAILED", f, file=sys.stderr)
  return 1 if failures else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", action="store_true", help="run every RUN command")
  parser.add_argument("--list", action="store_true", help="list commands and their rules")
  parser.add_argument("--only", default="", help="only commands containing this text")
  args = parser.parse_args()
  if args.list or not args.run:
    for c in commands():
      print(f"{c.path}:{c.line}: {rule(c)}\n    {c.text}")
    return 0
  return run_all(only=args.only)


if __name__ == "__main__":
  sys.exit(main())
