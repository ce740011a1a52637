"""Test set-up: 8 simulated CPU devices, set before anything imports jax.

Tests marked `slow` (sim == deploy variants of many minutes whose path another default
test also takes) are left out of the default run; `-m slow` runs only them, `--slow`
adds them. `.ci/run` runs both.

Tests build many small trainers that compile identical programs; a per-session
persistent compilation cache lets the second one skip XLA compilation.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="tapestry_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long variants, left out unless -m slow or --slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow") or "slow" in (config.getoption("markexpr") or ""):
    return
  slow = [item for item in items if item.get_closest_marker("slow")]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]
