"""`synthetic` source: one invented language written in six scripts, about one shared world.

Data flow: synthetic.seed -> `make_world` (people, things, actions, cities and the facts
that link them) and `make_vocabulary` (one word per meaning), both shared by every
language -> `latent_document` (per language, split and index: a topic, a protagonist and
a sequence of latent clauses) -> `render_document` (the shared grammar, written in the
language's script) -> text -> pipeline (tokenized like any text source).

Why this shape: federated sites hold non-IID data (different scripts, hence different
bytes, and different topic mixes), and federating them should still help, so what there
is to learn is mostly shared. The languages share one grammar and one vocabulary of
meanings: a word is a string of abstract syllables, and a language only chooses how to
write each syllable (a transliteration, as Serbian is written in Latin and in Cyrillic
letters). What real multilingual corpora spell the same in every script is spelled the
same here too: people's names and cities (Latin letters) and dates (digits). Beyond the
spelling, a model can learn the world: each person's birthday and home city, each
agent's habits (actions and their usual objects, mostly other people), each thing's
usual attribute, which people, things, actions and cities a topic brings together, and
discourse continuity (a protagonist who recurs, an object that becomes the next
subject). The facts are many and the script-specific vocabulary is small, so one
site's data teaches the facts slowly while every site's data teaches the same facts.
Nothing is copied from real text; everything is generated from the seed.

The languages (`LANGUAGE_NAMES`, selectable by name or index) differ in script, byte
width, capitalisation, word spacing and punctuation (and in their topic mix):
  0 latin       Latin letters (1 byte), capitalised sentences, "."
  1 cyrillic    Cyrillic letters (2 bytes), capitalised sentences, "."
  2 greek       Greek letters (2 bytes), capitalised sentences, "."
  3 devanagari  consonants with vowel signs (3 bytes each), "।"
  4 kana        hiragana syllables (3 bytes), NO spaces between words, "。"
  5 hangul      composed Hangul syllable blocks (3 bytes), "."

Everything is deterministic in (synthetic.seed, language, split, document index);
a document takes well under a millisecond to generate, so documents are made on
demand by index (random access) instead of being stored.
"""

import bisect
import dataclasses
import functools
import random
from typing import NamedTuple, Sequence

import grain
import ml_collections
import numpy as np

from data_pipelines import files
from data_pipelines import registry
from data_pipelines.errors import DataError

# Sizes of the latent world. Entities 0..NUM_AGENTS-1 are agents (can act); of those,
# 0..NUM_PEOPLE-1 are people with proper names (spelled the same in every language),
# the rest are agents named by common nouns ("the smith"); the others are things.
NUM_PEOPLE = 160
NUM_AGENTS = 176
NUM_ENTITIES = 208
NUM_ACTIONS = 16
NUM_ATTRIBUTES = 12
NUM_PLACES = 16  # Cities, with proper names spelled the same in every language.
NUM_TOPICS = 8
FIRST_YEAR, NUM_YEARS = 1900, 120  # People are born in FIRST_YEAR + [0, NUM_YEARS).

# Generation probabilities (the "physics" of the world; shared by all languages).
_P_BIRTH = 0.25  # Clause is "PERSON was born on DATE in CITY" (two facts).
_P_COPULA = 0.15  # Clause is "ENTITY is ATTRIBUTE".
_P_INTRINSIC = 0.9  # An attribute is the entity's own one (a learnable fact).
_P_PROTAGONIST = 0.5  # The subject is the document's protagonist.
_P_CONTINUE = 0.4  # Else the previous object (if an agent) becomes the subject.
_P_FAVOURED_ACTION = 0.7  # The agent's habitual actions vs the topic's actions.
_P_FAVOURED_OBJECT = 0.7  # The agent's usual object for that action vs the topic's.
_P_HOME = 0.8  # A person's place phrase is their home city.
_P_ADJECTIVE = 0.25
_P_PLACE = 0.3
_P_PLURAL = 0.25
_P_TENSE_SWITCH = 0.1
_SENTENCES_PER_LINE = 4  # A newline every 4 sentences gives documents line structure.

LANGUAGE_NAMES = ("latin", "cyrillic", "greek", "devanagari", "kana", "hangul")

# The abstract syllable inventory: CONSONANTS x VOWELS, plus a word-final coda "n".
# Each script writes the same syllable its own way (kana's rows fix the choice).
CONSONANTS = "kstnhmrgzdbp"
VOWELS = "aiueo"
NUM_SYLLABLES = len(CONSONANTS) * len(VOWELS)


class Script(NamedTuple):
  """How a language writes abstract syllables: syllables[c * len(VOWELS) + v]."""
  syllables: tuple[str, ...]
  coda: str  # Appended to a word's last syllable ("" for Hangul: the block takes a final).


def _alphabet(consonants: Sequence[str], vowels: Sequence[str], coda: str) -> Script:
  assert len(consonants) == len(CONSONANTS) and len(vowels) == len(VOWELS)
  return Script(tuple(c + v for c in consonants for v in vowels), coda)


def _kana() -> Script:
  rows = ("かきくけこ", "さしすせそ", "たちつてと", "なにぬねの", "はひふへほ", "まみむめも",
          "らりるれろ", "がぎぐげご", "ざじずぜぞ", "だぢづでど", "ばびぶべぼ", "ぱぴぷぺぽ")
  return Script(tuple("".join(rows)), "ん")


def _hangul() -> Script:
  # Precomposed syllable = 0xAC00 + (initial * 21 + medial) * 28 + final.
  initials = (15, 9, 16, 2, 18, 6, 5, 0, 12, 3, 7, 17)  # ㅋ ㅅ ㅌ ㄴ ㅎ ㅁ ㄹ ㄱ ㅈ ㄷ ㅂ ㅍ
  medials = (0, 20, 13, 5, 8)  # ㅏ ㅣ ㅜ ㅔ ㅗ
  return Script(tuple(chr(0xAC00 + (i * 21 + m) * 28) for i in initials for m in medials), "")


_HANGUL_FINAL_N = 4  # Added to a block: final ㄴ, the coda.

SCRIPTS = {
    "latin": _alphabet(CONSONANTS, VOWELS, "n"),
    "cyrillic": _alphabet("кстнхмргздбп", "аиуео", "н"),
    "greek": _alphabet("κστνχμργζδβπ", "αιυεο", "ν"),
    "devanagari": _alphabet("कसतनहमरगजदबप", ["", "\u093f", "\u0941", "\u0947", "\u094b"],
                            "\u0902"),  # inherent a, i, u, e, o; anusvara as coda
    "kana": _kana(),
    "hangul": _hangul(),
}


@dataclasses.dataclass(frozen=True)
class Grammar:
  """A language's surface choices beyond its script (the grammar itself is shared)."""
  name: str
  capitalize: bool
  end: str  # Sentence-final punctuation.
  word_sep: str  # Between words ("" for kana: no spaces, like Japanese).


GRAMMARS = (
    Grammar("latin", capitalize=True, end=".", word_sep=" "),
    Grammar("cyrillic", capitalize=True, end=".", word_sep=" "),
    Grammar("greek", capitalize=True, end=".", word_sep=" "),
    Grammar("devanagari", capitalize=False, end="।", word_sep=" "),
    Grammar("kana", capitalize=False, end="。", word_sep=""),
    Grammar("hangul", capitalize=False, end=".", word_sep=" "),
)
assert tuple(g.name for g in GRAMMARS) == LANGUAGE_NAMES


def _cdf(probs: np.ndarray) -> list[float]:
  """Normalised cumulative distribution as a list (bisect on lists is fastest here)."""
  cdf = np.cumsum(probs / probs.sum())
  cdf[-1] = 1.0
  return cdf.tolist()


def _sample(rng: random.Random, cdf: list[float]) -> int:
  return min(bisect.bisect_right(cdf, rng.random()), len(cdf) - 1)


@dataclasses.dataclass(frozen=True)
class World:
  """The latent world every language talks about (shared across sites)."""
  topic_person: list[list[float]]  # [topic] -> CDF over people (protagonists).
  topic_agent: list[list[float]]  # [topic] -> CDF over agents.
  topic_entity: list[list[float]]  # [topic] -> CDF over all entities.
  topic_action: list[list[float]]  # [topic] -> CDF over actions.
  topic_place: list[list[float]]  # [topic] -> CDF over places.
  agent_action: list[list[float]]  # [agent] -> CDF over its habitual actions.
  favoured_object: list[list[int]]  # [agent][action] -> usual object entity.
  attribute_of: list[int]  # [entity] -> its intrinsic attribute.
  birthday: list[int]  # [person] -> the date they were born, as YYYYMMDD.
  home: list[int]  # [person] -> their home city.
  language_topics: list[list[float]]  # [language] -> CDF over topics (non-IID mix).
  shared_topics: list[float]  # CDF over topics for parallel documents.


@functools.lru_cache(maxsize=8)
def make_world(seed: int) -> World:
  """The latent world of `seed` (cached; cheap to build)."""
  rng = np.random.default_rng([seed, 0x5EED])

  def sparse(n_rows: int, n: int, alpha: float) -> list[list[float]]:
    # Small Dirichlet concentration = each row prefers a few items strongly.
    return [_cdf(rng.dirichlet(np.full(n, alpha))) for _ in range(n_rows)]

  favoured = rng.integers(0, NUM_ENTITIES - 1, size=(NUM_AGENTS, NUM_ACTIONS))
  # Shift past the agent itself so nobody's usual object is themselves.
  favoured = favoured + (favoured >= np.arange(NUM_AGENTS)[:, None])
  return World(
      topic_person=sparse(NUM_TOPICS, NUM_PEOPLE, 0.3),
      topic_agent=sparse(NUM_TOPICS, NUM_AGENTS, 0.3),
      topic_entity=sparse(NUM_TOPICS, NUM_ENTITIES, 0.3),
      topic_action=sparse(NUM_TOPICS, NUM_ACTIONS, 0.3),
      topic_place=sparse(NUM_TOPICS, NUM_PLACES, 0.3),
      agent_action=sparse(NUM_AGENTS, NUM_ACTIONS, 0.2),
      favoured_object=favoured.tolist(),
      attribute_of=rng.integers(0, NUM_ATTRIBUTES, size=NUM_ENTITIES).tolist(),
      birthday=(10_000 * rng.integers(FIRST_YEAR, FIRST_YEAR + NUM_YEARS, size=NUM_PEOPLE)
                + 100 * rng.integers(1, 13, size=NUM_PEOPLE)
                + rng.integers(1, 29, size=NUM_PEOPLE)).tolist(),
      home=rng.integers(0, NUM_PLACES, size=NUM_PEOPLE).tolist(),
      language_topics=sparse(len(LANGUAGE_NAMES), NUM_TOPICS, 1.0),
      shared_topics=_cdf(np.ones(NUM_TOPICS)),
  )


class Word(NamedTuple):
  """A word of the shared language: abstract syllables and whether it ends in the coda."""
  syllables: tuple[int, ...]
  coda: bool


# The shared language's grammatical words and affixes.
MORPHEMES = ("plural", "past", "present", "adposition", "copula", "born")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """The shared language's words for the world's concepts (one per meaning, all distinct)
  and the proper names every script spells the same."""
  names: tuple[str, ...]  # [person] -> proper name (Latin letters).
  cities: tuple[str, ...]  # [place] -> proper name (Latin letters).
  nouns: tuple[Word, ...]  # [entity - NUM_PEOPLE] -> common noun.
  actions: tuple[Word, ...]
  attributes: tuple[Word, ...]
  morphemes: dict[str, Word]


def _proper_names(rng: random.Random, n: int, taken: set[str]) -> tuple[str, ...]:
  # Consonants the shared syllables never use, so names stand out in Latin text too.
  onsets, vowels, endings = "lvfwjyc", "aeiouy", ("", "", "l", "x", "th", "sh")
  out = []
  while len(out) < n:
    name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
    name = (name + rng.choice(endings)).capitalize()
    if name not in taken:
      taken.add(name)
      out.append(name)
  return tuple(out)


@functools.lru_cache(maxsize=8)
def make_vocabulary(seed: int) -> Vocabulary:
  """The shared vocabulary of `seed`: the same meanings and syllables in every language."""
  rng = random.Random(f"vocabulary/{seed}")
  used: set[Word] = set()

  def new_word(lo: int, hi: int, p_coda: float) -> Word:
    while True:
      word = Word(tuple(rng.randrange(NUM_SYLLABLES) for _ in range(rng.randint(lo, hi))),
                  rng.random() < p_coda)
      if word not in used:
        used.add(word)
        return word

  # Morphemes first and short (one syllable), like real function words and affixes.
  morphemes = {k: new_word(1, 1, 0.3) for k in MORPHEMES}
  taken: set[str] = set()
  return Vocabulary(
      names=_proper_names(rng, NUM_PEOPLE, taken),
      cities=_proper_names(rng, NUM_PLACES, taken),
      nouns=tuple(new_word(1, 2, 0.3) for _ in range(NUM_ENTITIES - NUM_PEOPLE)),
      actions=tuple(new_word(1, 2, 0.3) for _ in range(NUM_ACTIONS)),
      attributes=tuple(new_word(1, 2, 0.3) for _ in range(NUM_ATTRIBUTES)),
      morphemes=morphemes)


def spell(script: Script, word: Word) -> str:
  """`word` written in `script`."""
  text = "".join(script.syllables[s] for s in word.syllables)
  if word.coda:
    text = (text[:-1] + chr(ord(text[-1]) + _HANGUL_FINAL_N) if not script.coda
            else text + script.coda)
  return text


@dataclasses.dataclass(frozen=True)
class Lexicon:
  """A language's written words: the shared vocabulary spelled in its script."""
  entities: tuple[str, ...]  # People's names, then common nouns.
  actions: tuple[str, ...]
  attributes: tuple[str, ...]
  places: tuple[str, ...]  # City names (the same in every language).
  plural: str
  past: str
  present: str
  adposition: str
  copula: str
  born: str


@functools.lru_cache(maxsize=64)
def make_lexicon(seed: int, language: int) -> Lexicon:
  """The words of `language` in the world of `seed`."""
  script = SCRIPTS[LANGUAGE_NAMES[language]]
  v = make_vocabulary(seed)
  return Lexicon(
      entities=v.names + tuple(spell(script, w) for w in v.nouns),
      actions=tuple(spell(script, w) for w in v.actions),
      attributes=tuple(spell(script, w) for w in v.attributes),
      places=v.cities,
      **{k: spell(script, w) for k, w in v.morphemes.items()})


def shared_names(seed: int) -> tuple[str, ...]:
  """Proper names of the people and the cities, spelled the same in every language."""
  v = make_vocabulary(seed)
  return v.names + v.cities


class Clause(NamedTuple):
  """One latent sentence. Attribute, place and date fields are -1 when absent.

  verb >= 0: "subj verb obj [in place]"; verb == COPULA: "subj is attr";
  verb == BIRTH: "subj was born on date in place".
  """
  subj: int
  subj_plural: bool
  subj_attr: int
  verb: int
  obj: int
  obj_plural: bool
  obj_attr: int
  attr: int
  place: int
  past: bool
  date: int = -1  # YYYYMMDD of a birth clause.


COPULA, BIRTH = -1, -2


def latent_document(world: World, key: str, topic_cdf: list[float],
                    min_sentences: int, max_sentences: int) -> list[Clause]:
  """The latent clauses of one document; `key` seeds it deterministically."""
  rng = random.Random(key)
  topic = _sample(rng, topic_cdf)
  protagonist = _sample(rng, world.topic_person[topic])
  past = rng.random() < 0.5
  prev_obj = -1
  clauses = []

  def plural(entity: int) -> bool:
    return entity >= NUM_PEOPLE and rng.random() < _P_PLURAL  # Names are singular.

  def attribute(entity: int) -> int:
    if rng.random() < _P_INTRINSIC:
      return world.attribute_of[entity]
    return rng.randrange(NUM_ATTRIBUTES)

  def place(subj: int) -> int:
    if subj < NUM_PEOPLE and rng.random() < _P_HOME:
      return world.home[subj]
    return _sample(rng, world.topic_place[topic])

  for _ in range(rng.randint(min_sentences, max_sentences)):
    if rng.random() < _P_TENSE_SWITCH:
      past = not past
    kind = rng.random()
    if kind < _P_BIRTH:
      subj = protagonist if rng.random() < 0.5 else _sample(rng, world.topic_person[topic])
      clauses.append(Clause(subj, False, -1, BIRTH, -1, False, -1, -1, world.home[subj],
                            True, world.birthday[subj]))
      continue
    if kind < _P_BIRTH + _P_COPULA:
      subj = _sample(rng, world.topic_entity[topic])
      clauses.append(Clause(subj, plural(subj), -1, COPULA, -1, False, -1,
                            attribute(subj), -1, past))
      continue
    if rng.random() < _P_PROTAGONIST:
      subj = protagonist
    elif 0 <= prev_obj < NUM_AGENTS and rng.random() < _P_CONTINUE:
      subj = prev_obj
    else:
      subj = _sample(rng, world.topic_agent[topic])
    if rng.random() < _P_FAVOURED_ACTION:
      verb = _sample(rng, world.agent_action[subj])
    else:
      verb = _sample(rng, world.topic_action[topic])
    if rng.random() < _P_FAVOURED_OBJECT:
      obj = world.favoured_object[subj][verb]
    else:
      obj = _sample(rng, world.topic_entity[topic])
    clauses.append(Clause(
        subj=subj, subj_plural=plural(subj),
        subj_attr=attribute(subj) if rng.random() < _P_ADJECTIVE else -1,
        verb=verb, obj=obj, obj_plural=plural(obj),
        obj_attr=attribute(obj) if rng.random() < _P_ADJECTIVE else -1,
        attr=-1, place=place(subj) if rng.random() < _P_PLACE else -1, past=past))
    prev_obj = obj
  return clauses


def _noun_phrase(lex: Lexicon, entity: int, plural: bool, attr: int) -> list[str]:
  noun = lex.entities[entity] + (lex.plural if plural else "")
  return [lex.attributes[attr], noun] if attr >= 0 else [noun]


def render_clause(language: int, lex: Lexicon, c: Clause) -> str:
  """One sentence of `language` expressing clause `c` (with final punctuation).

  The grammar is shared: subject, verb with a tense suffix, then the object, attribute
  or date, then "in PLACE"; adjectives precede nouns, a suffix marks plurals."""
  g = GRAMMARS[language]
  subject = _noun_phrase(lex, c.subj, c.subj_plural, c.subj_attr)
  tense = lex.past if c.past else lex.present
  if c.verb == BIRTH:
    date = f"{c.date // 10_000}-{c.date // 100 % 100:02d}-{c.date % 100:02d}"  # ISO 8601
    words = subject + [lex.born + tense, date]
  elif c.verb == COPULA:
    words = subject + [lex.copula + tense, lex.attributes[c.attr]]
  else:
    words = subject + [lex.actions[c.verb] + tense] + _noun_phrase(
        lex, c.obj, c.obj_plural, c.obj_attr)
  if c.place >= 0:
    words += [lex.adposition, lex.places[c.place]]
  text = g.word_sep.join(words)
  if g.capitalize:
    text = text[0].upper() + text[1:]
  return text + g.end


def render_document(language: int, lex: Lexicon, clauses: Sequence[Clause]) -> str:
  """A document's text: its sentences, with a line break every few sentences."""
  sentence_sep = "" if GRAMMARS[language].word_sep == "" else " "
  lines = []
  for start in range(0, len(clauses), _SENTENCES_PER_LINE):
    chunk = clauses[start:start + _SENTENCES_PER_LINE]
    lines.append(sentence_sep.join(render_clause(language, lex, c) for c in chunk))
  return "\n".join(lines)


def document_key(seed: int, language: int, split: str, index: int,
                 parallel: bool) -> str:
  """RNG key of a document; train and eval keys never coincide (disjoint splits)."""
  if parallel:  # Same latent content for every language.
    return f"doc/{seed}/{split}/{index}"
  return f"doc/{seed}/{language}/{split}/{index}"


def generate_document(seed: int, language: int, split: str, index: int, *,
                      min_sentences: int = 3, max_sentences: int = 12,
                      parallel: bool = False) -> str:
  """Text of document `index` of `split` in `language` (deterministic)."""
  world = make_world(seed)
  topics = world.shared_topics if parallel else world.language_topics[language]
  clauses = latent_document(world, document_key(seed, language, split, index, parallel),
                            topics, min_sentences, max_sentences)
  return render_document(language, make_lexicon(seed, language), clauses)


def parse_languages(spec: str) -> list[int]:
  """Language indices from "all" or comma-separated names/indices.

  Raises:
    DataError: for an unknown or repeated language.
  """
  if spec.strip() == "all":
    return list(range(len(LANGUAGE_NAMES)))
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if item in LANGUAGE_NAMES:
      index = LANGUAGE_NAMES.index(item)
    elif item.isdigit() and int(item) < len(LANGUAGE_NAMES):
      index = int(item)
    else:
      raise DataError(f"data.synthetic.languages: unknown language {item!r}; known: "
                      f"all, {', '.join(LANGUAGE_NAMES)} or 0-{len(LANGUAGE_NAMES) - 1}")
    if index in out:
      raise DataError(f"data.synthetic.languages lists {LANGUAGE_NAMES[index]!r} twice")
    out.append(index)
  return out


class _Render:
  """Maps a global document index to text; languages interleave round-robin."""

  def __init__(self, cfg: ml_collections.ConfigDict, languages: list[int], split: str):
    self._languages = languages
    self._split = split
    self._seed = cfg.seed
    self._kwargs = dict(min_sentences=cfg.min_sentences,
                        max_sentences=cfg.max_sentences, parallel=cfg.parallel)

  def __call__(self, index: int) -> str:
    per_language, slot = divmod(int(index), len(self._languages))
    return generate_document(self._seed, self._languages[slot], self._split,
                             per_language, **self._kwargs)


@registry.register("synthetic")
class SyntheticSource(registry.Source):
  """The embedded synthetic multilingual corpus (see the module docstring)."""

  @classmethod
  def check_config(cls, data_cfg: ml_collections.ConfigDict) -> None:
    s = data_cfg.synthetic
    parse_languages(s.languages)
    if not isinstance(s.num_documents, int) or s.num_documents < 1:
      raise DataError("data.synthetic.num_documents must be a positive integer, got "
                      f"{s.num_documents!r}")
    if not 1 <= s.min_sentences <= s.max_sentences:
      raise DataError("data.synthetic needs 1 <= min_sentences <= max_sentences, got "
                      f"{s.min_sentences} and {s.max_sentences}")

  def __init__(self, data_cfg: ml_collections.ConfigDict):
    super().__init__(data_cfg)
    self.check_config(data_cfg)
    self.languages = parse_languages(data_cfg.synthetic.languages)

  def num_documents(self, split: str) -> int:
    """Documents per language in `split` (eval: eval_fraction of the train count)."""
    registry.check_split(split)
    n = self.data_cfg.synthetic.num_documents
    return n if split == "train" else files.eval_record_count(
        n, self.data_cfg.eval_fraction)

  def documents(self, split: str) -> grain.MapDataset:
    n = self.num_documents(split) * len(self.languages)
    render = _Render(self.data_cfg.synthetic, self.languages, split)
    return grain.MapDataset.range(n).map(render)
