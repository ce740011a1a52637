"""The synthetic multilingual corpus: deterministic, learnable, different, related."""

import collections
import math
import re
import time

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines.sources import synthetic as syn

ALL = range(len(syn.LANGUAGE_NAMES))


def _docs(language, split="train", n=200, seed=0, **kwargs):
  return [syn.generate_document(seed, language, split, i, **kwargs) for i in range(n)]


def test_documents_are_deterministic_and_seeded():
  for lang in ALL:
    assert _docs(lang, n=5) == _docs(lang, n=5)
    assert _docs(lang, n=5) != _docs(lang, n=5, seed=1)
  # Train and eval documents come from different generator keys.
  assert set(_docs(0, "train", 300)).isdisjoint(_docs(0, "eval", 300))


def test_generation_is_cheap():
  start = time.perf_counter()
  docs = [syn.generate_document(0, i % 6, "train", 10_000 + i) for i in range(600)]
  per_doc = (time.perf_counter() - start) / len(docs)
  assert per_doc < 2e-3, f"{per_doc * 1e3:.2f} ms per document"
  assert 100 < np.mean([len(d.encode()) for d in docs]) < 3000


def test_languages_use_disjoint_scripts_and_words():
  names = set(syn.shared_names(0))
  lexicons = [syn.make_lexicon(0, lang) for lang in ALL]
  words = [set(lex.entities + lex.actions + lex.attributes + lex.places) for lex in lexicons]
  for lex, w in zip(lexicons, words):
    assert len(w) == syn.NUM_ENTITIES + syn.NUM_ACTIONS + syn.NUM_ATTRIBUTES + syn.NUM_PLACES
  chars = [set("".join(w - names)) for w in words]
  for a in ALL:
    for b in ALL:
      if a < b:
        assert words[a] & words[b] == names  # Only the shared proper names.
        assert not chars[a] & chars[b], (syn.LANGUAGE_NAMES[a], syn.LANGUAGE_NAMES[b])


def test_text_vocabularies_barely_overlap():
  def word_types(lang):
    return {w.strip(".।。") for d in _docs(lang, n=100) for w in d.split()}
  types = {lang: word_types(lang) for lang in ALL if lang != 4}  # kana: no spaces.
  for a in types:
    for b in types:
      if a < b:
        overlap = len(types[a] & types[b]) / min(len(types[a]), len(types[b]))
        assert overlap < 0.05, (a, b, overlap)


def _find_once(text, word):
  return text.index(word) if text.count(word) == 1 else None


@pytest.mark.parametrize("lang", ALL)
def test_word_order_follows_the_grammar(lang):
  grammar = syn.GRAMMARS[lang]
  lex = syn.make_lexicon(0, lang)
  checked = 0
  for subj in range(syn.NUM_NAMED, syn.NUM_AGENTS):
    obj, verb = syn.NUM_ENTITIES - 1 - subj, subj % syn.NUM_ACTIONS
    clause = syn.Clause(subj, False, -1, verb, obj, False, -1, -1, -1, True)
    text = syn.render_clause(lang, lex, clause).lower()
    where = {role: _find_once(text, word.lower()) for role, word in
             (("S", lex.entities[subj]), ("V", lex.actions[verb]), ("O", lex.entities[obj]))}
    if None in where.values():
      continue  # One word happens to contain another; try the next triple.
    assert "".join(sorted(where, key=where.get)) == grammar.order, text
    checked += 1
  assert checked >= 10


def _ngram_model(texts, order=3):
  ctx, full = collections.Counter(), collections.Counter()
  for t in texts:
    b = b"\x02" * order + t.encode()
    for i in range(order, len(b)):
      ctx[b[i - order:i]] += 1
      full[b[i - order:i + 1]] += 1
  return ctx, full


def _bits_per_byte(model, texts, order=3, alpha=0.01):
  ctx, full = model
  bits, n = 0.0, 0
  for t in texts:
    b = b"\x02" * order + t.encode()
    for i in range(order, len(b)):
      p = (full[b[i - order:i + 1]] + alpha) / (ctx[b[i - order:i]] + 256 * alpha)
      bits -= math.log2(p)
      n += 1
  return bits / n


def test_languages_are_learnable_and_mutually_unpredictable():
  """A byte trigram model, fit on train docs, compresses held-out docs of ITS language
  far below the 8 bits/byte of a uniform byte model, and other languages not at all."""
  langs = (0, 3, 4)  # latin (1-byte), devanagari and kana (3-byte scripts)
  models = {l: _ngram_model(_docs(l, "train", 150)) for l in langs}
  for a in langs:
    for b in langs:
      bpb = _bits_per_byte(models[a], _docs(b, "eval", 20))
      if a == b:
        assert bpb < 2.0, (syn.LANGUAGE_NAMES[a], bpb)
      else:
        assert bpb > 6.0, (syn.LANGUAGE_NAMES[a], syn.LANGUAGE_NAMES[b], bpb)


def _concept_cooccurrence(lang, n=300):
  """Covariance of concept presence across documents, from the text alone."""
  lex = syn.make_lexicon(0, lang)
  words = (lex.entities[syn.NUM_NAMED:] + lex.actions + lex.attributes + lex.places)
  presence = np.array([[w in d for w in words] for d in _docs(lang, n=n)], np.float32)
  freq = presence.mean(0)
  cov = presence.T @ presence / n - np.outer(freq, freq)
  return cov[np.triu_indices(len(words), 1)], presence


def test_languages_share_latent_structure():
  """Which concepts co-occur is a property of the shared world: the co-occurrence
  statistics of non-parallel corpora correlate across languages, but not once one
  language's word-to-concept mapping is scrambled."""
  cooc = {lang: _concept_cooccurrence(lang) for lang in (0, 2, 5)}
  for a, b in ((0, 2), (0, 5), (2, 5)):
    r = np.corrcoef(cooc[a][0], cooc[b][0])[0, 1]
    assert r > 0.1, (a, b, r)
  presence = cooc[2][1]
  scrambled = presence[:, np.random.default_rng(0).permutation(presence.shape[1])]
  freq = scrambled.mean(0)
  cov = scrambled.T @ scrambled / len(scrambled) - np.outer(freq, freq)
  r_scrambled = np.corrcoef(cooc[0][0], cov[np.triu_indices(len(freq), 1)])[0, 1]
  assert abs(r_scrambled) < 0.05, r_scrambled


def test_parallel_mode_renders_the_same_content():
  sentences = re.compile(r"[.।。]")
  for i in range(20):
    counts = {len(sentences.findall(syn.generate_document(0, lang, "train", i,
                                                         parallel=True)))
              for lang in ALL}
    assert len(counts) == 1
  # Named agents appear identically in every language of a parallel document.
  names = syn.shared_names(0)
  docs = [syn.generate_document(0, lang, "train", 7, parallel=True) for lang in ALL]
  found = [sorted(n for n in names if n in d) for d in docs]
  assert all(f == found[0] for f in found)


def test_source_selects_and_interleaves_languages():
  cfg = dp.default_config()
  cfg.synthetic.languages = "greek,0"
  cfg.synthetic.num_documents = 10
  cfg.eval_fraction = 0.2
  source = syn.SyntheticSource(cfg)
  train, eval_ = source.documents("train"), source.documents("eval")
  assert (len(train), len(eval_)) == (20, 4)
  assert train[0] == syn.generate_document(0, 2, "train", 0)
  assert train[1] == syn.generate_document(0, 0, "train", 0)
  assert train[2] == syn.generate_document(0, 2, "train", 1)
  assert eval_[3] == syn.generate_document(0, 0, "eval", 1)
  assert syn.parse_languages("all") == list(ALL)
  assert syn.parse_languages("kana, 5") == [4, 5]
