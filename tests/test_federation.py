"""The federated LM: config checks, and simulation == deployment.

The deployment test starts real processes (a coordinator and two sites on different
meshes) that share nothing but file:// buckets, and checks that the global model after
2 rounds equals the in-process simulation's.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import portpicker
import pytest

from experiments.configs import federation as fed_config
from tapestry_jax import buckets
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import orchestrate
from tapestry_jax import report
from tapestry_jax import quantize
from tapestry_jax import simulate
from tapestry_jax import site as site_lib
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two sites, two rounds of 3 inner steps, site b on a different mesh than site a.
OVERRIDES = {
    "federation.rounds": 2, "federation.inner_steps": 3, "federation.poll_s": 0.05,
    "federation.compare_alone": False, "federation.eval_every": 1,
    "train.global_batch_size": 8, "train.warmup_steps": 2,
    "train.eval_batches": 2, "data.seq_len": 64, "data.synthetic.num_documents": 200,
    "mesh.fsdp": -1,
}


# FedAdam (inner SGD, outer Adam on a warmup + cosine schedule): outer state with a
# step count and moments, and a site optimizer without state; updates sent in bfloat16;
# the sites do not clip, the coordinator clips the merged update (small enough to bite).
FEDADAM = {
    "federation.update_dtype": "bfloat16",
    "federation.inner.optimizer": "sgd", "federation.inner.lr": 0.5,
    "federation.inner.schedule": "constant", "federation.inner.grad_clip": 0.0,
    "federation.outer.clip_norm": 1e-3,
    "federation.outer.name": "adam", "federation.outer.lr": 1e-3, "federation.outer.b2": 0.95,
    "federation.outer.eps": 1e-8, "federation.outer.schedule": "cosine",
    "federation.outer.warmup_rounds": 1,
}

# DiLoCo's Nesterov outer step on int8 updates (per-tensor codes, `tapestry_jax.quantize`),
# every site clipped by the norm it declares (a bound small enough to bite).
INT8 = {
    "federation.update_dtype": "int8", "federation.error_feedback": True,
    "federation.outer.name": "nesterov",
    "federation.outer.lr": 0.7, "federation.outer.momentum": 0.9,
    "federation.robust.clip_norm": 1e-3,
}

# Shared Adam moments (outer.SharedMoments): the sites start every round from the global
# AdamW moments and step count and send their first moment too, in float8; every site
# clipped by the norm of its delta (small enough to bite), which scales its moment too.
MOMENTS = {
    "federation.update_dtype": "float8_e4m3fn",
    "federation.outer.name": "moments", "federation.outer.lr": 1.0,
    "federation.robust.clip_norm": 1e-2,
}

# Shared moments synced every 2 rounds (federation.moment_sync_every, DES-LOC): round 1
# is a param round (pseudo-gradients only; the sites keep their own moments), round 2
# a moment round (the moments advance over the 2 x 3 steps since round 0).
DESLOC = {**MOMENTS, "federation.moment_sync_every": 2}

# Shared moments with top-k pseudo-gradients (the 10% largest of every row, their values
# as block-scaled float4, their column indices; 1-D leaves dense float4 in blocks of 64)
# and error feedback; first moments sent dense in float8.
TOPK = {
    **MOMENTS, "federation.update_dtype": "float4_e2m1fn", "federation.quant_block": 64,
    "federation.topk_density": 0.1, "federation.moment_dtype": "float8_e4m3fn",
}


# MuLoCo: Muon inner steps (orthogonalized per layer, on sharded matrices for site
# cyrillic) under DiLoCo's Nesterov, its momentum scheduled over the rounds (Pier):
# warmed up from 0.5 in round 1, decayed to 0.3 in round 2.
MULOCO = {
    "federation.inner.optimizer": "muon", "federation.inner.muon_lr": 0.02,
    "federation.outer.name": "nesterov", "federation.outer.lr": 0.7,
    "federation.outer.momentum": 0.9, "federation.outer.momentum_warmup_rounds": 1,
    "federation.outer.momentum_start": 0.5, "federation.outer.momentum_decay_rounds": 1,
    "federation.outer.momentum_end": 0.3,
}


def _config(tmp_path=None, extra=None):
  c = fed_config.get_config("tiny+fedavg/latin,cyrillic")
  c.sites.cyrillic.mesh.data, c.sites.cyrillic.mesh.fsdp, c.sites.cyrillic.mesh.tensor = 2, 2, 2
  for k, v in {**OVERRIDES, **(extra or {})}.items():
    *path, last = k.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _override_args(extra=None):
  args = [f"--config={ROOT}/experiments/configs/federation.py:tiny+fedavg/latin,cyrillic"]
  args += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(extra or {})}.items()]
  args += ["--config.sites.cyrillic.mesh.data=2", "--config.sites.cyrillic.mesh.fsdp=2",
           "--config.sites.cyrillic.mesh.tensor=2"]
  return args


def test_config_errors_are_one_clear_line():
  c = _config(extra=MOMENTS)
  federation.check_federation_config(c)
  c = _config(extra={**MOMENTS, "federation.inner.optimizer": "sgd"})
  with pytest.raises(ConfigError, match="inner optimizer must be adamw"):
    federation.check_federation_config(c)
  c = _config(extra={**MOMENTS, "federation.outer.steps_per_round": 2})
  with pytest.raises(ConfigError, match="steps_per_round=2 must be federation.inner_steps=3"):
    federation.check_federation_config(c)
  c = _config()
  with pytest.raises(ConfigError, match="unknown site 'klingon'"):
    federation.check_federation_config(c, site="klingon")
  c.federation.quorum = 5
  with pytest.raises(ConfigError, match="quorum=5"):
    federation.check_federation_config(c)
  c = _config()
  c.federation.outer.name = "lamb"
  with pytest.raises(ConfigError, match="federation.outer.*lamb"):
    federation.check_federation_config(c)
  c = _config()
  c.federation.outer.schedule = "cosine"
  c.federation.outer.warmup_rounds = c.federation.rounds
  with pytest.raises(ConfigError, match="federation.outer.*decay_rounds=.*warmup_rounds"):
    federation.check_federation_config(c)
  c = _config()
  c.federation.update_dtype = "float16"
  with pytest.raises(ConfigError, match="update_dtype must be one of float32, bfloat16"):
    federation.check_federation_config(c)
  c = _config()
  c.train.optimizer = "lion"
  with pytest.raises(ConfigError, match="train.optimizer must be adamw|sgd"):
    federation.check_federation_config(c)
  c = _config()
  c.sites.cyrillic.mesh.tensor = 3
  with pytest.raises(ConfigError, match="site 'cyrillic'"):
    federation.check_federation_config(c)


def test_inner_overrides_apply_to_federated_sites_only():
  c = _config(extra=FEDADAM)
  site = federation.site_config(c, "latin")
  assert (site.train.optimizer, site.train.lr, site.train.schedule) == ("sgd", 0.5, "constant")
  ref = federation.site_config(c, "latin", reference=True)  # alone / data-parallel recipe
  assert (ref.train.optimizer, ref.train.lr) == ("adamw", c.train.lr)
  assert federation.site_config(_config(), "latin").train.optimizer == "adamw"  # unset
  fa = fed_config.get_config("debref+fedadam/en,ja")
  assert list(fa.sites.keys()) == ["en", "ja"]
  assert (fa.federation.inner_steps, fa.federation.rounds) == (1, 400)
  assert fa.federation.outer.lr == fa.train.lr and fa.federation.inner.optimizer == "sgd"
  # A train field the inner overrides leave unset keeps the recipe's value.
  assert federation.site_config(fa, "en").train.grad_clip == fa.train.grad_clip > 0
  assert federation.site_config(c, "latin").train.grad_clip == 0.0  # FEDADAM's override
  with pytest.raises(ValueError, match="modifier"):
    fed_config.get_config("debref+fedprox")


def test_bfloat16_updates_schema_and_cast():
  c = _config(extra=FEDADAM)
  params = federation.param_schema(c)
  sent = exchange.update_schema(c)
  assert sent.keys() == params.keys()
  assert all(sent[n] == (shape, "bfloat16") for n, (shape, _) in params.items())
  assert exchange.update_schema(_config()) == params  # float32 by default
  bf16_params = _config()
  bf16_params.model.param_dtype = "bfloat16"  # bfloat16 is floating too (ml_dtypes)
  assert {d for _, d in exchange.update_schema(bf16_params).values()} == {"float32"}
  x = np.array([1.0, 1.0 + 2 ** -9, 3.4e38], np.float32)  # a tie rounds to even; overflow
  got = np.asarray(exchange.encode_update({"w": x}, c)["w"])
  assert str(got.dtype) == "bfloat16"
  np.testing.assert_array_equal(got.astype(np.float32)[:2], [1.0, 1.0])
  assert np.isinf(got.astype(np.float32)[2])  # too large for bfloat16: the site refuses it


def test_int8_updates_schema_and_encoding():
  c = _config(extra=INT8)
  params = federation.param_schema(c)
  sent = exchange.update_schema(c)
  assert all(sent[n] == (shape, "int8", True) for n, (shape, _) in params.items())
  x = np.linspace(-1, 1, 101, dtype=np.float32)
  got = exchange.encode_update({"w": x, "step": np.int32(3)}, c)
  assert isinstance(got["w"], quantize.Quantized) and str(got["w"].codes.dtype) == "int8"
  assert got["step"] == 3  # non-floating leaves are sent as they are
  with pytest.raises(ValueError, match="NaN or Inf"):
    exchange.encode_update({"w": np.array([1.0, np.nan], np.float32)}, c)


@pytest.mark.parametrize("extra", [INT8, TOPK], ids=["int8", "topk_moments"])
def test_error_feedback_sends_every_update_over_the_rounds_and_is_checkpointed(tmp_path, extra):
  c = _config(extra=extra)
  # For lossy updates when asked for; always with top-k, under shared moments too.
  assert federation.error_feedback(c)
  w = site_lib.SiteWorker(c, "latin", str(tmp_path / "w"))
  total, sent_total = {}, {}
  for _ in range(3):
    w.adopt(w.state.params)
    w.train(2)
    delta = trees.flatten(jax.device_get(w.delta()))
    sent = jax.device_get(exchange.decode_update(w.encoded_update()))
    for n in delta:
      total[n] = total.get(n, 0) + delta[n].astype(np.float64)
      sent_total[n] = sent_total.get(n, 0) + np.asarray(sent[n], np.float64)
  residual = trees.flatten(jax.device_get(w.residual))
  lost = 0.0
  for n in total:  # sum of updates == sum of what was sent + what is still carried
    np.testing.assert_allclose(sent_total[n] + residual[n], total[n], rtol=0, atol=1e-6,
                               err_msg=n)
    lost = max(lost, float(np.abs(residual[n]).max()))
  assert lost > 0  # encoding did lose something, which is carried
  w.save({"base_round": 2, "published_round": 3})
  w.close()
  again = site_lib.SiteWorker(c, "latin", str(tmp_path / "w"))
  assert again.restore()["published_round"] == 3
  for n, v in trees.flatten(jax.device_get(again.residual)).items():
    np.testing.assert_array_equal(v, residual[n], err_msg=n)
  again.close()
  off = _config(extra={**INT8, "federation.error_feedback": False})
  assert not federation.error_feedback(off)
  assert not federation.error_feedback(_config(extra={"federation.error_feedback": True}))


def test_outer_config_resolves_the_cosine_length_to_the_rounds():
  c = _config()
  assert federation.outer_config(c)["decay_rounds"] == c.federation.rounds
  c.federation.outer.decay_rounds = 7
  assert federation.outer_config(c)["decay_rounds"] == 7


def test_site_config_applies_the_site_overrides():
  c = _config()
  s = federation.site_config(c, "cyrillic")
  assert s.data.synthetic.languages == "cyrillic"
  assert (s.mesh.data, s.mesh.fsdp, s.mesh.tensor) == (2, 2, 2)
  assert s.train.steps == 2 * 3
  assert federation.site_config(c, "latin").mesh.fsdp == -1
  assert c.data.synthetic.languages == "all"  # The shared section is not modified.


@pytest.mark.parametrize("extra", [
    pytest.param(None, id="fedavg"),
    pytest.param(FEDADAM, id="fedadam", marks=pytest.mark.slow),
    pytest.param(INT8, id="int8", marks=pytest.mark.slow),
    pytest.param(MOMENTS, id="moments"),
    pytest.param(TOPK, id="topk_moments", marks=pytest.mark.slow),
    pytest.param(MULOCO, id="muloco", marks=pytest.mark.slow),
    pytest.param(DESLOC, id="desloc", marks=pytest.mark.slow)])
def test_simulation_and_deployment_give_the_same_global_model(tmp_path, extra):
  config = _config(extra=extra)
  sim = simulate.simulate(config, str(tmp_path / "sim"))

  workdir = tmp_path / "deploy"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  orchestrate.run_processes(config, str(workdir), _override_args(extra), env=env,
                            progress=False, timeout_s=600)
  glob = buckets.Bucket("file://" + str(workdir / "buckets" / "global"))
  assert exchange.read_latest(glob) == 2
  manifest = exchange.read_manifest(glob, exchange.global_prefix(2))
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]
  # Signed by the coordinator's key from the trust root launch.federate's orchestration
  # made (WORKDIR/keys), and every input it names was signed by its site.
  root = trust.TrustRoot.from_config(config)
  root.verify(manifest, federation.COORDINATOR)
  for i in manifest["extra"]["inputs"]:
    site_bucket = buckets.Bucket("file://" + str(workdir / "buckets" / i["site"]))
    update = exchange.read_manifest(site_bucket, exchange.update_prefix(2))
    root.verify(update, i["site"])
    assert exchange.manifest_digest(update) == i["manifest_sha256"]
    if extra is INT8:  # Codes, their signed dequantization, and a norm the clip bounds.
      assert {r["dtype"] for r in update["arrays"].values()} == {"int8"}
      assert all(r["quant"]["scale"] > 0 for r in update["arrays"].values())
      assert update["extra"]["update_norm"] > INT8["federation.robust.clip_norm"]
    if extra is FEDADAM:  # Every site's update is far above the outer clip's bound.
      assert update["extra"]["update_norm"] > 100 * FEDADAM["federation.outer.clip_norm"]
    if extra is MOMENTS:  # The pseudo-gradient and the first moment of every parameter.
      assert len(update["arrays"]) == 2 * len(federation.param_schema(config))
      assert update["extra"]["update_norm"] > MOMENTS["federation.robust.clip_norm"]
      assert all(f"inner_mu/{n}" in update["arrays"] for n in sim["params"])
    if extra is DESLOC:  # First moments in the moment round only: fewer bytes in round 1.
      param_round = exchange.read_manifest(site_bucket, exchange.update_prefix(1))
      assert len(param_round["arrays"]) == len(federation.param_schema(config))
      assert len(update["arrays"]) == 2 * len(federation.param_schema(config))
      assert (manifest["extra"]["moment_round"], manifest["extra"]["merge"]["moment_sync_every"]
              ) == (True, 2)
      sent = {r: [x["bytes_up"] for x in sim["records"]
                  if x["site"] == i["site"] and x["global_round"] == r - 1] for r in (1, 2)}
      assert sent[1][0] < sent[2][0]
    if extra is TOPK:  # 2-D leaves: k values of every row, their indices and row scales.
      arrays = update["arrays"]
      assert arrays["unembed"]["quant"] == {"codec": "topk", "values": "float4_e2m1fn",
                                            "k": 38}
      assert arrays["codec_indices/unembed"]["shape"] == [128, 38]
      assert arrays["final_norm"]["quant"] == {"codec": "float4_e2m1fn", "block": 64}
      assert arrays["inner_mu/unembed"]["dtype"] == "float8_e4m3fn"
      # The simulation counts every array sent: the bytes the deployed site stored.
      stored = sum(int(np.prod(r["shape"])) * exchange.np_dtype(r["dtype"]).itemsize
                   for r in arrays.values())
      [simulated] = [r["bytes_up"] for r in sim["records"]
                     if r["site"] == i["site"] and r["global_round"] == 1]
      assert simulated == stored
  if extra is not None:  # The audit recomputes every round from the signed inputs.
    audit = subprocess.run(
        [sys.executable, "-m", "launch.audit", *_override_args(extra), f"--workdir={workdir}",
         "--round=-1", f"--public_keys_dir={workdir / 'keys'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stderr[-2000:]
    assert "audited 3 rounds: all bit-identical" in audit.stdout
  for name, want in sim["params"].items():
    got = exchange.read_block(glob, exchange.data_prefix(exchange.global_prefix(2), manifest),
                              f"params/{name}",
                              manifest["arrays"][f"params/{name}"],
                              tuple(slice(0, n) for n in want.shape))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
  if extra in (MOMENTS, TOPK, DESLOC):  # The global moments too: the sites continue from them.
    for name, st in sim["outer_state"].items():
      for leaf in ("mu", "nu"):
        got = exchange.read_block(glob, exchange.data_prefix(exchange.global_prefix(2), manifest),
                                  f"outer/{name}/{leaf}",
                                  manifest["arrays"][f"outer/{name}/{leaf}"],
                                  tuple(slice(0, n) for n in np.shape(getattr(st, leaf))))
        np.testing.assert_allclose(got, getattr(st, leaf), rtol=1e-6, atol=1e-12,
                                   err_msg=f"{name} {leaf}")
      assert int(st.count) == 2 * 3

  # Every site evaluated every global round on its own held-out data, same as simulated.
  sites, coord = report.deployment_records(str(workdir), ["latin", "cyrillic"])
  assert [r["round"] for r in coord] == [1, 2]
  deployed = {(r["site"], r["global_round"]): r["eval_loss"] for r in sites}
  simulated = {(r["site"], r["global_round"]): r["eval_loss"] for r in sim["records"]}
  assert deployed.keys() == simulated.keys()
  for k in deployed:
    assert deployed[k] == pytest.approx(simulated[k], rel=1e-5), k
  if extra is DESLOC:  # The deployed sites sent (and read) fewer bytes in the param round.
    for n in ("latin", "cyrillic"):
      up = {r["global_round"]: r for r in sites if r["site"] == n}
      assert up[0]["bytes_up"] < up[1]["bytes_up"], up
      assert up[1]["bytes_down"] < up[0]["bytes_down"], up
  summary = report.summarize(config, sites, coord)
  assert summary["complete"]
  assert all(v["bytes_sent"] > 0 and v["bytes_received"] > 0 for v in summary["final"].values())


def _two_device_args(extra):
  """CLI overrides for two sites on 2-device meshes (fsdp over both devices)."""
  return [*_override_args(extra), "--config.sites.cyrillic.mesh.data=0",
          "--config.sites.cyrillic.mesh.fsdp=0", "--config.sites.cyrillic.mesh.tensor=0"]


def _deploy(config, workdir, extra, processes, party_env):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  orchestrate.run_processes(config, str(workdir), _two_device_args(extra), env=env,
                            processes=processes, party_env=party_env, progress=False,
                            timeout_s=600)
  return env


def _global_digests(workdir) -> dict[int, dict[str, str]]:
  glob = buckets.Bucket("file://" + str(workdir / "buckets" / "global"))
  return {r: {n: rec["digest"] for n, rec in
              exchange.read_manifest(glob, exchange.global_prefix(r))["arrays"].items()}
          for r in exchange.committed_rounds(glob, "global")}


def test_a_federation_of_multi_process_parties_is_its_simulation_bit_for_bit(tmp_path):
  """Site latin runs as 2 processes x 1 device (its params sharded across them), site
  cyrillic as 1 process x 2 devices, the coordinator as 2 merge workers. Every update's
  chunks and every global round are bit-identical to the same federation with every
  party in one process; the audit recomputes every round; and the global model is the
  simulation's, bit for bit. Each site trains a step ahead of global round 1 while it
  publishes its update and reads that round in the background (federation.overlap_steps;
  every process of latin in a thread of its own)."""
  # The same batches on 1 or 2 processes.
  extra = {**MOMENTS, "data.shards": 2, "federation.overlap_steps": 1}

  def config_():  # A fresh one per run (a deployment fills in its own keys).
    c = _config(extra=extra)
    c.sites.cyrillic.mesh.data = c.sites.cyrillic.mesh.fsdp = c.sites.cyrillic.mesh.tensor = 0
    return c

  one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  workdir = tmp_path / "deploy"
  env = _deploy(config_(), workdir, extra, {"latin": 2, federation.COORDINATOR: 2},
                {"latin": one_device, federation.COORDINATOR: one_device})
  logs = (workdir / "logs" / "latin.1.log").read_text()
  assert "process 1 of 2" in logs, logs[-2000:]
  single = tmp_path / "single"
  _deploy(config_(), single, extra, None, None)
  config = config_()

  assert _global_digests(workdir) == _global_digests(single)
  assert sorted(_global_digests(workdir)) == [0, 1, 2]
  for site in ("latin", "cyrillic"):
    for r in (1, 2):
      two, one = (exchange.read_manifest(buckets.Bucket(f"file://{w / 'buckets' / site}"),
                                         exchange.update_prefix(r)) for w in (workdir, single))
      assert two["extra"]["update_norm"] == one["extra"]["update_norm"], (site, r)
      assert {n: rec["chunk_digests"] for n, rec in two["arrays"].items()} == \
          {n: rec["chunk_digests"] for n, rec in one["arrays"].items()}, (site, r)
  audit = subprocess.run(
      [sys.executable, "-m", "launch.audit", *_two_device_args(extra), f"--workdir={workdir}",
       "--round=-1", f"--public_keys_dir={workdir / 'keys'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert audit.returncode == 0, audit.stderr[-2000:]
  assert "audited 3 rounds: all bit-identical" in audit.stdout

  # The simulation, in a process with 2 CPU devices like the deployed parties' (XLA's CPU
  # code differs in the last bits with the device count of the process).
  out = tmp_path / "sim.npz"
  script = ("import sys, numpy as np, test_federation as t\n"
            "from tapestry_jax import simulate\n"
            "extra = {**t.MOMENTS, 'data.shards': 2, 'federation.overlap_steps': 1}\n"
            "c = t._config(extra=extra)\n"
            "c.sites.cyrillic.mesh.data = c.sites.cyrillic.mesh.fsdp = 0\n"
            "c.sites.cyrillic.mesh.tensor = 0\n"
            "sim = simulate.simulate(c, sys.argv[1])\n"
            "np.savez(sys.argv[2], **sim['params'])\n")
  sim_env = dict(env, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sim"), str(out)],
                        cwd=ROOT, env=sim_env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  glob = buckets.Bucket("file://" + str(workdir / "buckets" / "global"))
  manifest = exchange.read_manifest(glob, exchange.global_prefix(2))
  sim = np.load(out)
  assert sorted(sim.files) == sorted(federation.param_schema(config))
  for name in sim.files:
    got = exchange.read_block(glob, exchange.data_prefix(exchange.global_prefix(2), manifest),
                              f"params/{name}", manifest["arrays"][f"params/{name}"],
                              tuple(slice(0, n) for n in sim[name].shape))
    np.testing.assert_array_equal(got, sim[name], err_msg=name)


def test_config_args_from_keeps_the_config_arguments_for_the_parties():
  argv = ["--config=fed.py:tiny", "--workdir=/tmp/x", "--config.federation.rounds=3",
          "--config.train.seed", "7", "--config", "other.py", "--mode=simulate"]
  assert orchestrate.config_args_from(argv) == [
      "--config=fed.py:tiny", "--config.federation.rounds=3", "--config.train.seed", "7",
      "--config", "other.py"]


def test_run_federation_runs_the_parties_then_summarizes(tmp_path, monkeypatch):
  """The processes mode's wiring (no processes started): every party gets the config
  arguments and only its own credentials file; the sites alone join the summary."""
  config = _config()
  config.federation.compare_alone = True
  calls = {}

  def run_processes(config, workdir, config_args, *, party_args):
    calls.update(workdir=workdir, config_args=config_args, party_args=party_args)
  records = [{"site": s, "global_round": g, "eval_loss": 3.0 - g, "eval_bits_per_byte": 4.0,
              "bytes_up": 10, "bytes_down": 20} for s in ("cyrillic", "latin") for g in (1, 2)]
  coord = [{"round": g} for g in (1, 2)]
  alone = {s: {"eval_loss": 2.5, "eval_bits_per_byte": 3.5} for s in ("cyrillic", "latin")}
  monkeypatch.setattr(orchestrate, "run_processes", run_processes)
  monkeypatch.setattr(report, "deployment_records", lambda workdir, names: (records, coord))
  monkeypatch.setattr(simulate, "train_alone", lambda config, workdir: alone)

  summary, path = orchestrate.run_federation(
      config, str(tmp_path), config_args=("--config=fed.py:tiny",), credentials_dir="/creds")
  assert calls == {"workdir": str(tmp_path), "config_args": ["--config=fed.py:tiny"],
                   "party_args": {p: [f"--credentials=/creds/{p}.aws-credentials"]
                                  for p in ("coordinator", "latin", "cyrillic")}}
  assert summary == report.summarize(config, records, coord, alone=alone)
  assert path == str(tmp_path / "summary.json") and json.load(open(path))["complete"]
  assert summary["final"]["latin"]["alone"]["eval_loss"] == 2.5
  with pytest.raises(ConfigError, match="mode 'threads'"):
    orchestrate.run_federation(config, str(tmp_path), mode="threads")
  config.federation.rounds = 0
  with pytest.raises(ConfigError, match="federation.rounds=0"):
    orchestrate.run_federation(config, str(tmp_path))


def test_run_federation_simulated_writes_the_summary(tmp_path):
  config = _config()
  summary, path = orchestrate.run_federation(config, str(tmp_path), mode="simulate")
  assert summary["complete"] and sorted(summary["final"]) == ["cyrillic", "latin"]
  assert [r["round"] for r in summary["per_round"]] == [0, 1, 2]
  assert "alone" not in summary["final"]["latin"]  # compare_alone is off.
  assert json.load(open(path))["final"] == json.loads(json.dumps(summary["final"]))


def _pids(*needles: str) -> list[int]:
  """Processes whose command line holds every one of `needles`."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          cmd = f.read().decode(errors="replace")
      except OSError:
        continue
      if all(n in cmd for n in needles):
        pids.append(int(entry))
  return pids


@pytest.mark.slow
def test_a_multi_process_site_preempted_by_sigterm_resumes_bit_identically(tmp_path):
  """SIGTERM to one process of 2-process site latin after its round-1 update: both its
  processes stop at one step, save a checkpoint mid-phase and exit 0 with one line; the
  rerun finishes the phase and the federation, and every update and global round is
  bit-identical to an uninterrupted run's."""
  # Three rounds: a SIGTERM that misses round 2's phase (a slow checkpoint, a loaded
  # machine) stops the site at the first step of round 3's.
  extra = {**MOMENTS, "data.shards": 2, "federation.inner_steps": 12, "federation.rounds": 3}
  one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

  def config_():
    c = _config(extra=extra)
    c.sites.cyrillic.mesh.data = c.sites.cyrillic.mesh.fsdp = c.sites.cyrillic.mesh.tensor = 0
    return c

  ref = tmp_path / "ref"
  _deploy(config_(), ref, extra, {"latin": 2}, {"latin": one_device})

  workdir = tmp_path / "preempted"
  config = config_()
  failure = []

  def federate():
    try:
      _deploy(config, workdir, extra, {"latin": 2}, {"latin": one_device})
    except BaseException as e:  # noqa: BLE001  (reported by the test)
      failure.append(e)

  thread = threading.Thread(target=federate, daemon=True)
  thread.start()
  ckpts = workdir / "sites" / "latin" / "checkpoints"
  glob = buckets.Bucket("file://" + str(workdir / "buckets" / "global"))
  deadline = time.monotonic() + 300
  # Round 1 published and its checkpoint landed, global round 1 out: latin trains round 2.
  while not ((ckpts / "12").is_dir() and exchange.read_latest(glob) == 1):
    assert time.monotonic() < deadline and not failure, failure
    time.sleep(0.02)
  [pid] = _pids("launch.site", "--site=latin", "--process_id=1", str(workdir))
  os.kill(pid, signal.SIGTERM)
  logs = workdir / "logs"
  while not all("preempted at step" in (logs / f).read_text()
                for f in ("latin.log", "latin.1.log")):
    assert time.monotonic() < deadline and not failure, failure
    time.sleep(0.1)
  worker = site_lib.SiteWorker(config, "latin", str(workdir / "sites" / "latin"),
                               devices=jax.devices()[:2])
  meta = worker.restore()
  worker.close()
  assert meta["base_round"] in (1, 2) and not meta["published"], meta
  assert 0 < meta["steps_done"] <= 12, meta

  # The rerun of latin's two processes, as its operator would start them again.
  keys = [f"--config.federation.trust.public_keys.{p}={k}"
          for p, k in config.federation.trust.public_keys.items()]
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **one_device)
  rerun = [subprocess.Popen(
      [sys.executable, "-m", "launch.site", *_two_device_args(extra), *keys,
       f"--workdir={workdir}", "--site=latin", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in rerun]
  assert [p.returncode for p in rerun] == [0, 0], [o[-2000:] for o in outs]
  thread.join(300)
  assert not thread.is_alive() and not failure, failure

  assert _global_digests(workdir) == _global_digests(ref)
  assert sorted(_global_digests(workdir)) == [0, 1, 2, 3]
  for r in (1, 2, 3):
    got, want = (exchange.read_manifest(buckets.Bucket(f"file://{w / 'buckets' / 'latin'}"),
                                        exchange.update_prefix(r)) for w in (workdir, ref))
    assert {n: rec["chunk_digests"] for n, rec in got["arrays"].items()} == \
        {n: rec["chunk_digests"] for n, rec in want["arrays"].items()}, r
    assert got["extra"]["train_loss"] == want["extra"]["train_loss"], r
