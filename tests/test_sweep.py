"""Sweep overrides: dotted paths, site subsets, and typos that fail loudly."""
import pytest

from experiments.configs import federation as fed_config
from experiments.sweeps import (data_split, dropped_sites, inner_steps, moments, num_sites,
                                outer_optimizer)
from tapestry_jax import federation
from tapestry_jax import sweep
from tapestry_jax.validate import ConfigError


def test_overrides_apply_to_a_copy():
  base = fed_config.get_config("tiny")
  c = sweep.apply_overrides(base, {"name": "x", "federation.inner_steps": 10,
                                   "federation.outer.lr": 0.3, "sites": "latin,kana"})
  assert c.federation.inner_steps == 10 and c.federation.outer.lr == 0.3
  assert sorted(federation.site_names(c)) == ["kana", "latin"]
  assert base.federation.inner_steps == 10 and len(federation.site_names(base)) == 4


def test_typos_and_unknown_sites_are_config_errors():
  base = fed_config.get_config("tiny")
  with pytest.raises(ConfigError, match="federation.inner_stepz"):
    sweep.apply_overrides(base, {"federation.inner_stepz": 3})
  with pytest.raises(ConfigError, match="unknown sites"):
    sweep.apply_overrides(base, {"sites": "latin,klingon"})


@pytest.mark.parametrize("module, base", [
    (data_split, "tiny"), (dropped_sites, "tiny"), (inner_steps, "tiny"), (num_sites, "tiny"),
    (outer_optimizer, "tiny"), (moments, "tiny+moments")])
def test_every_shipped_sweep_gives_valid_configs(module, base):
  base = fed_config.get_config(base)
  runs = module.get_sweep()
  assert len({r["name"] for r in runs}) == len(runs) > 1
  for run in runs:
    federation.check_federation_config(sweep.apply_overrides(base, run))
