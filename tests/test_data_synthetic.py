"""The synthetic multilingual corpus: deterministic, learnable, different, related."""

import collections
import math
import re

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines.sources import synthetic as syn

ALL = range(len(syn.LANGUAGE_NAMES))
SPACED = [lang for lang in ALL if syn.GRAMMARS[lang].word_sep == " "]
ENDS = "".join({g.end for g in syn.GRAMMARS})
DATE = r"\d{4}-\d\d-\d\d"


def _docs(language, split="train", n=200, seed=0, **kwargs):
  return [syn.generate_document(seed, language, split, i, **kwargs) for i in range(n)]


def _words(text):
  return [w.strip(ENDS) for w in text.split()]


def test_documents_are_deterministic_and_seeded():
  for lang in ALL:
    assert _docs(lang, n=5) == _docs(lang, n=5)
    assert _docs(lang, n=5) != _docs(lang, n=5, seed=1)
  # Train and eval documents come from different generator keys.
  assert set(_docs(0, "train", 300)).isdisjoint(_docs(0, "eval", 300))


def test_documents_are_of_moderate_length():
  """Short enough to pack many per row, long enough to hold several sentences (their
  generation speed: experiments/benchmarks/data_throughput.py)."""
  docs = [syn.generate_document(0, i % 6, "train", 10_000 + i) for i in range(600)]
  assert all(isinstance(d, str) and d for d in docs)
  assert 100 < np.mean([len(d.encode()) for d in docs]) < 3000


def test_scripts_are_disjoint_but_names_are_shared():
  names = syn.shared_names(0)
  assert len(set(names)) == syn.NUM_PEOPLE + syn.NUM_PLACES
  lexicons = [syn.make_lexicon(0, lang) for lang in ALL]
  words = [set(lex.entities[syn.NUM_PEOPLE:] + lex.actions + lex.attributes) for lex in lexicons]
  for lex, w in zip(lexicons, words):
    assert len(w) == syn.NUM_ENTITIES - syn.NUM_PEOPLE + syn.NUM_ACTIONS + syn.NUM_ATTRIBUTES
    assert lex.entities[:syn.NUM_PEOPLE] + lex.places == names
  chars = [set("".join(w)) for w in words]
  for a in ALL:
    for b in ALL:
      if a < b:
        assert not chars[a] & chars[b], (syn.LANGUAGE_NAMES[a], syn.LANGUAGE_NAMES[b])
  # No Latin word of the shared language is spelled like a name.
  assert not {n.lower() for n in names} & words[0]


def test_languages_are_one_language_in_different_scripts():
  """Parallel documents align word by word: shared names and dates are identical, and
  each word of the alphabetic scripts is a letter-for-letter transliteration, by one
  letter mapping per pair of languages (the same vocabulary and grammar)."""
  latin, cyrillic, greek = 0, 1, 2
  names = set(syn.shared_names(0))
  letter_maps = {cyrillic: {}, greek: {}}
  aligned = 0
  for i in range(40):
    docs = {lang: _words(syn.generate_document(0, lang, "train", i, parallel=True))
            for lang in SPACED}
    assert len({len(d) for d in docs.values()}) == 1
    for lang, other in docs.items():
      for w_latin, w in zip(docs[latin], other):
        if w_latin in names or re.fullmatch(DATE, w_latin):
          assert w == w_latin  # Names, cities and dates are spelled the same.
          continue
        assert w != w_latin or lang == latin
        if lang in letter_maps:
          assert len(w) == len(w_latin), (w_latin, w)
          for x, y in zip(w_latin.lower(), w.lower()):
            assert letter_maps[lang].setdefault(x, y) == y, (w_latin, w)
          aligned += 1
  assert aligned > 500
  for m in letter_maps.values():  # A bijection between alphabets.
    assert len(set(m.values())) == len(m) == len(syn.CONSONANTS) + len(syn.VOWELS)


@pytest.mark.parametrize("lang", ALL)
def test_word_order_is_the_shared_grammar(lang):
  lex = syn.make_lexicon(0, lang)
  checked = 0
  for subj in range(syn.NUM_PEOPLE, syn.NUM_AGENTS):
    obj, verb = syn.NUM_ENTITIES - 1 - subj, subj % syn.NUM_ACTIONS
    text = syn.render_clause(lang, lex, syn.Clause(subj, False, -1, verb, obj, False, -1,
                                                   -1, -1, True)).lower()
    where = {role: text.index(word.lower()) if text.count(word.lower()) == 1 else None
             for role, word in (("S", lex.entities[subj]), ("V", lex.actions[verb]),
                                ("O", lex.entities[obj]))}
    if None in where.values():
      continue  # One word happens to contain another; try the next triple.
    assert "".join(sorted(where, key=where.get)) == "SVO", text
    checked += 1
  assert checked >= 5


def test_facts_about_people_agree_across_languages():
  """A person's birthday and home city are facts of the world: every birth sentence in
  every language states the same ones (the text of non-parallel corpora)."""
  facts = collections.defaultdict(set)
  pattern = re.compile(rf"([A-Z][a-z]+) ?[^ 0-9A-Z]+ ?({DATE}) ?[^ A-Z]+ ?([A-Z][a-z]+)")
  for lang in ALL:
    found = [m.groups() for d in _docs(lang, n=150) for m in pattern.finditer(d)]
    assert len(found) > 100, syn.LANGUAGE_NAMES[lang]
    for name, date, city in found:
      facts[name].add((date, city))
  assert len(facts) > 50
  assert all(len(v) == 1 for v in facts.values()), [v for v in facts.values() if len(v) > 1]


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
  far below the 8 bits/byte of a uniform byte model, and other languages hardly at all
  (only their shared names, cities and dates)."""
  langs = (0, 1, 4)  # latin (1-byte), cyrillic (2-byte) and kana (3-byte scripts)
  models = {l: _ngram_model(_docs(l, "train", 150)) for l in langs}
  for a in langs:
    for b in langs:
      bpb = _bits_per_byte(models[a], _docs(b, "eval", 20))
      if a == b:
        assert bpb < 2.0, (syn.LANGUAGE_NAMES[a], bpb)
      else:
        assert bpb > 4.5, (syn.LANGUAGE_NAMES[a], syn.LANGUAGE_NAMES[b], bpb)


def test_script_bytes_are_a_large_part_of_the_text():
  """The languages stay different: a large share of every non-Latin language's bytes
  are its own script's (the rest: shared names, dates, digits, spaces, punctuation)."""
  for lang in ALL[1:]:
    text = "".join(_docs(lang, n=100))
    script_bytes = sum(len(ch.encode()) for ch in text if ord(ch) > 127)
    assert script_bytes > 0.3 * len(text.encode()), syn.LANGUAGE_NAMES[lang]


def _concept_cooccurrence(lang, n=300):
  """Covariance of concept presence across documents, from the text alone."""
  lex = syn.make_lexicon(0, lang)
  suffixes = ("", lex.plural, lex.past, lex.present)
  concepts = lex.entities[syn.NUM_PEOPLE:] + lex.actions + lex.attributes
  presence = np.array([[any(w + s in words for s in suffixes) for w in concepts]
                       for words in (set(_words(d.lower())) for d in _docs(lang, n=n))],
                      np.float32)
  freq = presence.mean(0)
  cov = presence.T @ presence / n - np.outer(freq, freq)
  return cov[np.triu_indices(len(concepts), 1)], presence


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
  sentences = re.compile(f"[{ENDS}]")
  for i in range(20):
    counts = {len(sentences.findall(syn.generate_document(0, lang, "train", i,
                                                         parallel=True)))
              for lang in ALL}
    assert len(counts) == 1
  # Names and dates appear identically, in the same order, in every language.
  docs = [syn.generate_document(0, lang, "train", 7, parallel=True) for lang in ALL]
  found = [re.findall(rf"[A-Z][a-z]+|{DATE}", d) for d in docs]
  assert found[1] and all(f == found[1] for f in found[1:])


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
