"""`synthetic` source: six invented languages rendering one shared latent world.

Data flow: synthetic.seed -> `make_world` (concepts, topics and "facts", shared by every
language) -> `latent_document` (per language, split and index: a topic and a sequence of
latent clauses) -> `render_document` (the language's lexicon, morphology, word order,
script and punctuation) -> text -> pipeline (tokenized like any text source).

Why this shape: federated sites hold non-IID data (different languages, scripts and
topic mixes) that still rewards collaboration, because what is worth learning beyond
the surface form is shared: which agents tend to do which actions to which entities,
the attribute each entity usually has, which entities/places/actions co-occur in a
topic, and discourse continuity (a clause's object often becomes the next subject).
A few named agents are spelled the same in every language, as anchors.
Nothing is copied from real text; everything is generated from the seed.

The languages (`LANGUAGE_NAMES`, selectable by name or index):
  0 latin       Latin letters, SVO, adjective before noun, no case, verb agrees with a
                plural subject, tense suffix, prepositions, capitalised, "."
  1 cyrillic    Cyrillic, SOV, adjective after noun, case suffixes, tense suffix,
                agreement, prepositional place phrase first, copula last, "."
  2 greek       Greek, VSO, articles, adjective after noun, case suffixes, tense
                auxiliary after the verb, no verb agreement, prepositions, "."
  3 devanagari  Devanagari consonants + vowel signs (3-byte UTF-8), SOV, case
                particles, tense auxiliary, postpositions, place first, "।"
  4 kana        hiragana syllables (3-byte UTF-8) with NO spaces between words, SOV,
                particles, tense suffix, postpositions, place first, "。"
  5 hangul      composed Hangul syllable blocks (3-byte UTF-8), OSV, particles, tense
                suffix, postpositions, "."

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

# Sizes of the latent world. Agents are entities that can be subjects of actions;
# entities 0..NUM_AGENTS-1 are agents, the rest are things. The first NUM_NAMED agents
# have proper names spelled identically in every language (Latin letters), like the
# names and brands real multilingual corpora share: anchors for cross-lingual transfer.
NUM_NAMED = 12
NUM_AGENTS = 40
NUM_ENTITIES = 100
NUM_ACTIONS = 30
NUM_ATTRIBUTES = 20
NUM_PLACES = 16
NUM_TOPICS = 8

# Generation probabilities (the "physics" of the world; shared by all languages).
_P_COPULA = 0.2  # Clause is "ENTITY is ATTRIBUTE" instead of "AGENT ACTS ENTITY".
_P_INTRINSIC = 0.85  # An attribute is the entity's own one (a learnable fact).
_P_FAVOURED_ACTION = 0.6  # The agent's habitual actions vs the topic's actions.
_P_FAVOURED_OBJECT = 0.7  # The agent's usual object for that action vs any.
_P_CONTINUE = 0.5  # The previous object (if an agent) becomes the subject.
_P_ADJECTIVE = 0.25
_P_PLACE = 0.3
_P_PLURAL = 0.25
_P_TENSE_SWITCH = 0.1
_SENTENCES_PER_LINE = 4  # A newline every 4 sentences gives documents line structure.

LANGUAGE_NAMES = ("latin", "cyrillic", "greek", "devanagari", "kana", "hangul")


class Script(NamedTuple):
  """How a language spells syllables."""
  syllables: tuple[str, ...]
  # Word-final codas; for Hangul these are jamo offsets added to the last block.
  codas: tuple[str, ...] | tuple[int, ...]


def _alphabet(consonants: str, vowels: Sequence[str], codas: str) -> Script:
  return Script(tuple(c + v for c in consonants for v in vowels), tuple(codas))


def _devanagari() -> Script:
  consonants = "कखगघचछजझटठडढतथदधनपफबभमयरलवशसह"
  vowel_signs = ["", "\u093e", "\u093f", "\u0940", "\u0941", "\u0942", "\u0947",
                 "\u0948", "\u094b", "\u094c"]  # inherent a, aa, i, ii, u, uu, e, ai, o, au
  return _alphabet(consonants, vowel_signs, "\u0902")  # anusvara as coda


def _kana() -> Script:
  kana = ("あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめも"
          "やゆよらりるれろわがぎぐげござじずぜぞだでどばびぶべぼぱぴぷぺぽ")
  return Script(tuple(kana), ("ん",))


def _hangul() -> Script:
  # Precomposed syllable = 0xAC00 + (initial * 21 + medial) * 28 + final.
  blocks = tuple(chr(0xAC00 + (l * 21 + v) * 28) for l in range(19) for v in range(21))
  return Script(blocks, (4, 8, 16, 1))  # finals n, l, m, g


SCRIPTS = {
    "latin": _alphabet("bdfghklmnprstvz", "aeiou", "nrsl"),
    "cyrillic": _alphabet("бвгджзклмнпрстфхцчш", "аеиоуыэюя", "нрйл"),
    "greek": _alphabet("βγδζθκλμνξπρστφχψ", "αεηιουω", "νρ"),
    "devanagari": _devanagari(),
    "kana": _kana(),
    "hangul": _hangul(),
}


@dataclasses.dataclass(frozen=True)
class Grammar:
  """A language's surface choices (its lexicon is generated from the world seed)."""
  name: str
  order: str  # Order of subject, verb, object: a permutation of "SVO".
  adj_first: bool  # Adjective before the noun.
  adj_agrees: bool  # Adjective takes the plural suffix too.
  case: str  # "none" | "suffix" (on the noun) | "particle" (after the noun phrase).
  article: bool  # Singular/plural article before noun phrases.
  tense: str  # "suffix" on the verb | "aux" word after the verb.
  verb_agrees: bool  # Verb takes a suffix for a plural subject.
  adposition: str  # "pre" | "post" for the place phrase.
  place_first: bool  # Place phrase opens the sentence (else closes it).
  copula_last: bool  # "S ATTR COP" (else "S COP ATTR").
  capitalize: bool
  end: str  # Sentence-final punctuation.
  word_sep: str  # Between words ("" for kana: no spaces, like Japanese).


GRAMMARS = (
    Grammar("latin", "SVO", adj_first=True, adj_agrees=False, case="none",
            article=False, tense="suffix", verb_agrees=True, adposition="pre",
            place_first=False, copula_last=False, capitalize=True, end=".",
            word_sep=" "),
    Grammar("cyrillic", "SOV", adj_first=False, adj_agrees=True, case="suffix",
            article=False, tense="suffix", verb_agrees=True, adposition="pre",
            place_first=True, copula_last=True, capitalize=True, end=".",
            word_sep=" "),
    Grammar("greek", "VSO", adj_first=False, adj_agrees=True, case="suffix",
            article=True, tense="aux", verb_agrees=False, adposition="pre",
            place_first=False, copula_last=False, capitalize=True, end=".",
            word_sep=" "),
    Grammar("devanagari", "SOV", adj_first=True, adj_agrees=False, case="particle",
            article=False, tense="aux", verb_agrees=False, adposition="post",
            place_first=True, copula_last=True, capitalize=False, end="।",
            word_sep=" "),
    Grammar("kana", "SOV", adj_first=True, adj_agrees=False, case="particle",
            article=False, tense="suffix", verb_agrees=False, adposition="post",
            place_first=True, copula_last=True, capitalize=False, end="。",
            word_sep=""),
    Grammar("hangul", "OSV", adj_first=True, adj_agrees=False, case="particle",
            article=False, tense="suffix", verb_agrees=False, adposition="post",
            place_first=False, copula_last=True, capitalize=False, end=".",
            word_sep=" "),
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
  topic_agent: list[list[float]]  # [topic] -> CDF over agents.
  topic_entity: list[list[float]]  # [topic] -> CDF over all entities.
  topic_action: list[list[float]]  # [topic] -> CDF over actions.
  topic_place: list[list[float]]  # [topic] -> CDF over places.
  agent_action: list[list[float]]  # [agent] -> CDF over its habitual actions.
  favoured_object: list[list[int]]  # [agent][action] -> usual object entity.
  attribute_of: list[int]  # [entity] -> its intrinsic attribute.
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
      topic_agent=sparse(NUM_TOPICS, NUM_AGENTS, 0.3),
      topic_entity=sparse(NUM_TOPICS, NUM_ENTITIES, 0.3),
      topic_action=sparse(NUM_TOPICS, NUM_ACTIONS, 0.3),
      topic_place=sparse(NUM_TOPICS, NUM_PLACES, 0.3),
      agent_action=sparse(NUM_AGENTS, NUM_ACTIONS, 0.2),
      favoured_object=favoured.tolist(),
      attribute_of=rng.integers(0, NUM_ATTRIBUTES, size=NUM_ENTITIES).tolist(),
      language_topics=sparse(len(LANGUAGE_NAMES), NUM_TOPICS, 1.0),
      shared_topics=_cdf(np.ones(NUM_TOPICS)),
  )


@dataclasses.dataclass(frozen=True)
class Lexicon:
  """A language's words for the world's concepts and its grammatical morphemes."""
  entities: tuple[str, ...]
  actions: tuple[str, ...]
  attributes: tuple[str, ...]
  places: tuple[str, ...]
  plural: str
  subj_case: str
  obj_case: str
  past: str
  present: str
  verb_plural: str
  article_sg: str
  article_pl: str
  adposition: str
  copula: str


def _spell(script: Script, rng: random.Random, n_syllables: int, coda: bool) -> str:
  word = "".join(rng.choice(script.syllables) for _ in range(n_syllables))
  if coda:
    final = rng.choice(script.codas)
    # Hangul codas change the last block; other scripts append a letter.
    word = (word[:-1] + chr(ord(word[-1]) + final) if isinstance(final, int)
            else word + final)
  return word


@functools.lru_cache(maxsize=8)
def shared_names(seed: int) -> tuple[str, ...]:
  """Proper names of the NUM_NAMED named agents, the same in every language."""
  rng = random.Random(f"names/{seed}")
  names: list[str] = []
  while len(names) < NUM_NAMED:
    name = _spell(SCRIPTS["latin"], rng, rng.randint(2, 3), rng.random() < 0.5)
    if name.capitalize() not in names:
      names.append(name.capitalize())
  return tuple(names)


@functools.lru_cache(maxsize=64)
def make_lexicon(seed: int, language: int) -> Lexicon:
  """The words of `language` in the world of `seed`: all distinct, spelled in its script.

  Entities 0..NUM_NAMED-1 are the shared proper names.
  """
  script = SCRIPTS[LANGUAGE_NAMES[language]]
  rng = random.Random(f"lexicon/{seed}/{language}")
  names = shared_names(seed)
  used: set[str] = {n.lower() for n in names}  # Latin words must not collide with names.

  def new_word(lo: int, hi: int, p_coda: float) -> str:
    while True:
      word = _spell(script, rng, rng.randint(lo, hi), rng.random() < p_coda)
      if word not in used:
        used.add(word)
        return word

  # Morphemes first and short (one syllable), like real function words and affixes.
  morphemes = {k: new_word(1, 1, 0.3) for k in (
      "plural", "subj_case", "obj_case", "past", "present", "verb_plural",
      "article_sg", "article_pl", "adposition", "copula")}
  return Lexicon(
      entities=names + tuple(new_word(2, 3, 0.3) for _ in range(NUM_ENTITIES - NUM_NAMED)),
      actions=tuple(new_word(2, 3, 0.3) for _ in range(NUM_ACTIONS)),
      attributes=tuple(new_word(2, 3, 0.3) for _ in range(NUM_ATTRIBUTES)),
      places=tuple(new_word(2, 3, 0.3) for _ in range(NUM_PLACES)),
      **morphemes)


class Clause(NamedTuple):
  """One latent sentence. Attribute/place fields are -1 when absent."""
  subj: int
  subj_plural: bool
  subj_attr: int
  verb: int  # -1 for a copula clause ("subj is attr").
  obj: int
  obj_plural: bool
  obj_attr: int
  attr: int  # Predicate attribute of a copula clause, else -1.
  place: int
  past: bool


def latent_document(world: World, key: str, topic_cdf: list[float],
                    min_sentences: int, max_sentences: int) -> list[Clause]:
  """The latent clauses of one document; `key` seeds it deterministically."""
  rng = random.Random(key)
  topic = _sample(rng, topic_cdf)
  past = rng.random() < 0.5
  prev_obj = -1
  clauses = []

  def plural(entity: int) -> bool:
    return entity >= NUM_NAMED and rng.random() < _P_PLURAL  # Names are singular.

  def attribute(entity: int) -> int:
    if rng.random() < _P_INTRINSIC:
      return world.attribute_of[entity]
    return rng.randrange(NUM_ATTRIBUTES)

  for _ in range(rng.randint(min_sentences, max_sentences)):
    if rng.random() < _P_TENSE_SWITCH:
      past = not past
    if rng.random() < _P_COPULA:
      subj = _sample(rng, world.topic_entity[topic])
      clauses.append(Clause(subj, plural(subj), -1, -1, -1, False, -1,
                            attribute(subj), -1, past))
      continue
    if 0 <= prev_obj < NUM_AGENTS and rng.random() < _P_CONTINUE:
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
        attr=-1,
        place=_sample(rng, world.topic_place[topic]) if rng.random() < _P_PLACE else -1,
        past=past))
    prev_obj = obj
  return clauses


def _noun_phrase(g: Grammar, lex: Lexicon, entity: int, plural: bool, attr: int,
                 case: str) -> list[str]:
  noun = lex.entities[entity] + (lex.plural if plural else "")
  if g.case == "suffix":
    noun += case
  words = [noun]
  if attr >= 0:
    adj = lex.attributes[attr] + (lex.plural if plural and g.adj_agrees else "")
    words = [adj, noun] if g.adj_first else [noun, adj]
  if g.article:
    words.insert(0, lex.article_pl if plural else lex.article_sg)
  if g.case == "particle":
    words.append(case)
  return words


def _verb_phrase(g: Grammar, lex: Lexicon, stem: str, past: bool,
                 plural_subject: bool) -> list[str]:
  tense = lex.past if past else lex.present
  verb = stem + (tense if g.tense == "suffix" else "")
  if g.verb_agrees and plural_subject:
    verb += lex.verb_plural
  return [verb, tense] if g.tense == "aux" else [verb]


def render_clause(language: int, lex: Lexicon, c: Clause) -> str:
  """One sentence of `language` expressing clause `c` (with final punctuation)."""
  g = GRAMMARS[language]
  subject = _noun_phrase(g, lex, c.subj, c.subj_plural, c.subj_attr, lex.subj_case)
  if c.verb < 0:  # Copula clause.
    verb = _verb_phrase(g, lex, lex.copula, c.past, c.subj_plural)
    attr = [lex.attributes[c.attr]]
    words = subject + (attr + verb if g.copula_last else verb + attr)
  else:
    parts = {
        "S": subject,
        "V": _verb_phrase(g, lex, lex.actions[c.verb], c.past, c.subj_plural),
        "O": _noun_phrase(g, lex, c.obj, c.obj_plural, c.obj_attr, lex.obj_case),
    }
    words = [w for role in g.order for w in parts[role]]
    if c.place >= 0:
      place = lex.places[c.place]
      phrase = [lex.adposition, place] if g.adposition == "pre" else [place, lex.adposition]
      words = phrase + words if g.place_first else words + phrase
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
