"""The reference cache: keyed by what decides a reference, and nothing else."""

from experiments.configs import federation as fed_config
from tapestry_jax import references


def _counting(monkeypatch):
  calls = []

  def compute(config, kind, workdir):
    calls.append((kind, int(config.train.seed), int(config.federation.inner_steps)))
    return {n: {"eval_loss": float(len(calls)), "eval_bits_per_byte": 1.0}
            for n in config.sites.keys()}

  monkeypatch.setattr(references, "_compute", compute)
  return calls


def test_a_reference_is_computed_once_per_recipe(tmp_path, monkeypatch):
  calls = _counting(monkeypatch)
  c = fed_config.get_config("tiny/latin,greek")
  c.federation.inner_steps, c.federation.rounds = 4, 10
  cache = str(tmp_path / "cache")
  first = references.reference(c, "alone", str(tmp_path), cache)
  # Another outer algorithm, round length and evaluation schedule: the same reference.
  other = fed_config.get_config("tiny/latin,greek")
  other.federation.outer.name = "nesterov"
  other.federation.inner_steps, other.federation.rounds = 8, 5
  other.federation.eval_every = 1
  assert references.reference(other, "alone", str(tmp_path), cache) == first
  assert len(calls) == 1
  # What decides it: a seed, the kind, the inner steps in all.
  seeded = c.copy_and_resolve_references()
  seeded.train.seed = 7
  references.reference(seeded, "alone", str(tmp_path), cache)
  references.reference(c, "data_parallel", str(tmp_path), cache)
  longer = c.copy_and_resolve_references()
  longer.federation.rounds = 11
  references.reference(longer, "alone", str(tmp_path), cache)
  assert [k for k, *_ in calls] == ["alone", "alone", "data_parallel", "alone"]
  assert references.key(c, "alone") != references.key(longer, "alone")


def test_a_damaged_or_foreign_entry_is_recomputed_and_no_cache_stores_nothing(tmp_path,
                                                                              monkeypatch):
  calls = _counting(monkeypatch)
  c = fed_config.get_config("tiny/latin,greek")
  cache = tmp_path / "cache"
  references.reference(c, "alone", str(tmp_path), str(cache))
  (entry,) = cache.iterdir()
  entry.write_text("{not json")
  references.reference(c, "alone", str(tmp_path), str(cache))
  assert len(calls) == 2
  entry.write_text('{"recipe": {"kind": "alone"}, "results": {"latin": {}}}')
  assert references.reference(c, "alone", str(tmp_path), str(cache))["latin"]["eval_loss"] == 3.0
  references.reference(c, "alone", str(tmp_path), "")
  references.reference(c, "alone", str(tmp_path), "")
  assert len(calls) == 5


def test_the_key_follows_the_files_contents_not_their_paths(tmp_path, monkeypatch):
  _counting(monkeypatch)
  texts = {"a": "one two three\n\nfour five\n" * 50, "b": "six seven\n\neight nine\n" * 50}
  configs = []
  for where in ("x", "y"):
    c = fed_config.get_config("tiny/latin,greek")
    for site, text in zip(("latin", "greek"), texts.values()):
      path = tmp_path / where / f"{site}.txt"
      path.parent.mkdir(exist_ok=True)
      path.write_text(text)
      c.sites[site].source, c.sites[site].paths = "text_files", str(path)
    configs.append(c)
  assert references.key(configs[0], "alone") == references.key(configs[1], "alone")
  (tmp_path / "y" / "latin.txt").write_text(texts["a"] + "ten\n")
  assert references.key(configs[0], "alone") != references.key(configs[1], "alone")
