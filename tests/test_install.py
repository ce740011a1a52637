"""What pip is asked for: jax below 0.11 only where Python 3.11 needs it, and accelerator
extras that name jax's own."""
import importlib.metadata
import pathlib

from packaging.requirements import Requirement
from packaging.version import Version

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _jax_requirements():
  lines = (_ROOT / "requirements.txt").read_text().splitlines()
  reqs = [Requirement(l) for l in lines if l.strip() and not l.startswith("#")]
  return [r for r in reqs if r.name in ("jax", "jaxlib")]


def _allowed(python: str, version: str) -> dict[str, bool]:
  env = {"python_version": python, "python_full_version": python + ".0"}
  active = [r for r in _jax_requirements() if r.marker is None or r.marker.evaluate(env)]
  assert sorted(r.name for r in active) == ["jax", "jaxlib"], active
  return {r.name: Version(version) in r.specifier for r in active}


def test_python_311_stays_below_jax_011_and_312_may_take_it():
  assert _allowed("3.11", "0.10.2") == {"jax": True, "jaxlib": True}
  assert _allowed("3.11", "0.11.2") == {"jax": False, "jaxlib": False}
  assert _allowed("3.12", "0.11.2") == {"jax": True, "jaxlib": True}
  assert _allowed("3.13", "0.10.2") == {"jax": True, "jaxlib": True}


def test_accelerator_extras_are_jaxs_own():
  setup_py = (_ROOT / "setup.py").read_text()
  provided = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
  for extra in ("cuda12", "cuda13", "tpu"):
    assert f'"{extra}": ["jax[{extra}]"]' in setup_py
    assert extra in provided, f"the installed jax has no [{extra}] extra"
