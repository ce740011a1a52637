"""Every command in the README and docs/ has a way it is exercised (tests/docs_commands.py);
the RUN ones are run by .ci/run (`python -m tests.docs_commands --run`)."""

import os
import re

from tests import docs_commands as dc


def test_every_documented_command_has_a_rule():
  cmds = dc.commands()
  assert len(cmds) > 20  # The docs have that many: the extraction works.
  missing = [f"{c.path}:{c.line}: {c.text}" for c in cmds if dc.rule(c) is None]
  assert not missing, "commands with no rule in tests/docs_commands.py:\n" + "\n".join(missing)
  assert not dc.untagged_commands(), "tag these code blocks ```bash"


def test_every_covering_test_exists():
  for c in dc.commands():
    r = dc.rule(c)
    if not isinstance(r, dc.Covered):
      continue
    for t in r.tests:
      path, _, name = t.partition("::")
      full = os.path.join(dc.ROOT, path)
      assert os.path.isfile(full), f"{c.path}:{c.line}: {path} does not exist"
      if name:
        with open(full) as f:
          assert re.search(rf"^def {re.escape(name)}\(", f.read(), re.M), (
              f"{c.path}:{c.line}: no test {t}")


def test_the_ci_runs_the_documented_commands():
  with open(os.path.join(dc.ROOT, ".ci", "run")) as f:
    assert "python -m tests.docs_commands --run" in f.read()


def test_extraction_joins_continuations_and_drops_comments(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "README.md").write_text(
      "x\n```bash\n# a comment\npython -m launch.train --a=1 \\\n    --b=2   # why\n```\n"
      "```\npython -m launch.nope\n```\n")
  cmds = dc.commands(str(tmp_path))
  assert [(c.line, c.text) for c in cmds] == [(4, "python -m launch.train --a=1 --b=2")]
  assert dc.untagged_commands(str(tmp_path)) == ["README.md:8"]
  assert dc.runnable(cmds[0], "/s", dc.Run("--w=/tmp/x")) == (
      "python -m launch.train --a=1 --b=2 --w=/s/x")
