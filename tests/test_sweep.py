"""Sweep overrides: dotted paths, site subsets, and typos that fail loudly."""
import pytest

from experiments.configs import federation as fed_config
from experiments.sweeps import (communication, data_split, dropped_sites, inner_steps, moments,
                                num_sites, outer_optimizer)
from tapestry_jax import federation
from tapestry_jax import sweep
from tapestry_jax.validate import ConfigError


def test_overrides_apply_to_a_copy():
  base = fed_config.get_config("tiny+fedavg")
  before = base.to_dict()
  c = sweep.apply_overrides(base, {"name": "x", "federation.inner_steps": 7,
                                   "federation.outer.lr": 0.3, "sites": "latin,kana"})
  assert c.federation.inner_steps == 7 and c.federation.outer.lr == 0.3
  assert sorted(federation.site_names(c)) == ["kana", "latin"]
  # The base keeps every value the copy changed.
  assert (base.federation.inner_steps, base.federation.outer.lr) == (10, 1.0)
  assert len(federation.site_names(base)) == 4 and base.to_dict() == before


def test_typos_and_unknown_sites_are_config_errors():
  base = fed_config.get_config("tiny+fedavg")
  with pytest.raises(ConfigError, match="federation.inner_stepz"):
    sweep.apply_overrides(base, {"federation.inner_stepz": 3})
  with pytest.raises(ConfigError, match="unknown sites"):
    sweep.apply_overrides(base, {"sites": "latin,klingon"})


def test_variants_default_to_shared_moments_in_float8():
  c = fed_config.get_config("tiny")
  f = c.federation
  assert (f.outer.name, f.outer.lr, f.update_dtype) == ("moments", 1.0, "float8_e4m3fn")
  assert (f.inner_steps, f.rounds, c.train.steps) == (4, 75, 300)  # tiny's 300 steps
  assert fed_config.get_config("tiny+moments").to_dict() == c.to_dict()
  avg = fed_config.get_config("tiny+fedavg/latin,kana").federation
  assert (avg.outer.name, avg.inner_steps, avg.rounds, avg.update_dtype) == (
      "sgd", 10, 30, "float32")
  with pytest.raises(ValueError, match="at most one of"):
    fed_config.get_config("tiny+fedavg+moments")


@pytest.mark.parametrize("module, base", [
    (data_split, "tiny+fedavg"), (dropped_sites, "tiny+fedavg"), (inner_steps, "tiny+fedavg"),
    (num_sites, "tiny+fedavg"),
    (outer_optimizer, "tiny+fedavg"), (moments, "tiny"), (communication, "debref2k")])
def test_every_shipped_sweep_gives_valid_configs(module, base):
  base = fed_config.get_config(base)
  runs = module.get_sweep()
  assert len({r["name"] for r in runs}) == len(runs) > 1
  for run in runs:
    federation.check_federation_config(sweep.apply_overrides(base, run))


def test_select_runs_keeps_the_named_runs_in_order_and_refuses_unknown_names():
  runs = [{"name": "H10"}, {"name": "H25"}, {"name": "H50"}]
  assert sweep.select_runs(runs, ["H50", "H10"]) == [{"name": "H10"}, {"name": "H50"}]
  with pytest.raises(ConfigError, match=r"unknown run\(s\) \['H7'\]"):
    sweep.select_runs(runs, ["H7"])
