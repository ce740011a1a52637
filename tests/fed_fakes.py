"""Shared by the coordinator, fault and audit tests: a tiny three-site federation whose
parties' keys live in one per-process directory, fake site updates, and readers of
committed global rounds. (Not a test module: pytest collects only test_*.py.)"""

import functools
import os
import tempfile
import threading

import numpy as np

from experiments.configs import federation as fed_config
from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import trust

SITES = ("cyrillic", "greek", "latin")  # Sorted: the merge's fixed order.
# One key pair per party, per test process (a test's subprocesses share its keys).
KEYS = os.environ.get("TAPESTRY_TEST_KEYS") or tempfile.mkdtemp(prefix="tapestry-test-keys-")


def config(**fed):
  """Three tiny sites; short polls so that every wait is sub-second; the trust root holds
  the keys in KEYS. `fed` overrides config.federation fields."""
  c = fed_config.get_config("tiny+fedavg/latin,cyrillic,greek")
  f = c.federation
  f.rounds, f.poll_s, f.deadline_s, f.round_timeout_s = 2, 0.01, 0.0, 20.0
  for k, v in fed.items():
    f[k] = v
  trust.ensure_local_keys(c, KEYS, federation.party_names(c))
  return c


def signer(party: str) -> trust.Signer:
  return trust.Signer.from_file(party, os.path.join(KEYS, f"{party}.key"))


def coordinator(cfg, workdir) -> coord_lib.Coordinator:
  return coord_lib.Coordinator(cfg, str(workdir), private_key=os.path.join(KEYS, "coordinator.key"))


@functools.lru_cache(maxsize=None)
def _schema():
  return federation.param_schema(config())


def delta(seed: int) -> dict[str, np.ndarray]:
  """A fake pseudo-gradient: small random float32 arrays of the model's schema."""
  rng = np.random.default_rng(seed)
  return {n: (1e-2 * rng.standard_normal(shape)).astype(dtype)
          for n, (shape, dtype) in _schema().items()}


def bucket(cfg, workdir, party: str) -> buckets.Bucket:
  return buckets.Bucket(federation.bucket_urls(cfg, str(workdir))[party])


def read_arrays(b: buckets.Bucket, prefix: str, manifest) -> dict[str, np.ndarray]:
  """Every array of committed round `prefix` (its manifest given), whole, verified."""
  data = exchange.data_prefix(prefix, manifest)
  return {n: exchange.read_block(b, data, n, rec, tuple(slice(0, s) for s in rec["shape"]))
          for n, rec in manifest["arrays"].items()}


def read_round(cfg, workdir, round_: int) -> tuple[dict, dict[str, np.ndarray]]:
  """(manifest, every array) of committed global round `round_`."""
  glob = bucket(cfg, workdir, federation.GLOBAL)
  manifest = exchange.read_manifest(glob, exchange.global_prefix(round_))
  assert manifest is not None, f"global round {round_} is not committed"
  return manifest, read_arrays(glob, exchange.global_prefix(round_), manifest)


def publish(cfg, workdir, site: str, round_: int, delta, *, tokens=None) -> dict:
  """Commits `delta` as `site`'s honest update for `round_` (trained from round_ - 1),
  signed with its key, declaring its norm."""
  b = bucket(cfg, workdir, site)
  prefix = exchange.update_prefix(round_)
  attempt = exchange.new_attempt()
  records = exchange.write_arrays(b, exchange.data_prefix(prefix, attempt), delta)
  norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))
  manifest = exchange.make_manifest(
      federation=cfg.federation.id, kind="update", round=round_, author=site, attempt=attempt,
      base_round=round_ - 1, tokens=federation.weight_cap(cfg) if tokens is None else tokens,
      arrays=records, extra={"update_norm": norm})
  manifest = signer(site).sign(manifest)
  exchange.write_manifest(b, prefix, manifest)
  return manifest


def start_party(out: dict, name: str, fn) -> threading.Thread:
  """Runs `fn` (a coordinator's or site's loop) in a daemon thread named `name`; its
  result, or what it raised, goes into `out[name]` for the test to check."""
  def run():
    try:
      out[name] = fn()
    except BaseException as e:  # noqa: BLE001  (checked by the caller)
      out[name] = e
  t = threading.Thread(target=run, name=name, daemon=True)
  t.start()
  return t
