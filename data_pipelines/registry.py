"""Registry of data sources: name -> Source class.

Data flow: `data.source` (a name) -> `get_source(name)` -> `SourceClass(data_cfg)` ->
`.documents(split)`, a random-access `grain.MapDataset` of documents that the pipeline
shards, shuffles, tokenizes and packs (see pipeline.py).

Adding a source is one new file under `data_pipelines/sources/` that decorates its class
with `@register("name")`, plus one import line in `data_pipelines/sources/__init__.py`.
"""

import abc
from typing import Callable, ClassVar, TypeVar

import grain
import ml_collections

from data_pipelines.errors import DataError

SPLITS = ("train", "eval")


class Source(abc.ABC):
  """A named provider of documents.

  Subclasses set `pretokenized = True` if their documents are int32 token-id arrays
  (already tokenized with the configured tokenizer, without BOS/EOS); otherwise
  documents are `str` and the pipeline tokenizes them.
  """

  pretokenized: ClassVar[bool] = False
  # Set by @register: the name this class is registered under (for messages).
  source_name: ClassVar[str] = ""

  def __init__(self, data_cfg: ml_collections.ConfigDict):
    self.data_cfg = data_cfg

  @classmethod
  def check_config(cls, data_cfg: ml_collections.ConfigDict) -> None:
    """Cheap checks (no heavy reads) run by `config.validate` before any compilation.

    Raises:
      DataError: with one line naming the bad field or file.
    """
    del data_cfg

  @abc.abstractmethod
  def documents(self, split: str) -> grain.MapDataset:
    """All documents of `split` ("train" or "eval") in a fixed, deterministic order.

    Train and eval documents must be disjoint. Elements are `str` or, for pretokenized
    sources, 1-D int32 numpy arrays.
    """


_REGISTRY: dict[str, type[Source]] = {}
_SourceT = TypeVar("_SourceT", bound=type[Source])


def register(name: str) -> Callable[[_SourceT], _SourceT]:
  """Class decorator that registers a Source subclass under `name`."""

  def decorator(cls: _SourceT) -> _SourceT:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"data source {name!r} is registered twice "
                       f"({_REGISTRY[name].__module__} and {cls.__module__})")
    if not (isinstance(cls, type) and issubclass(cls, Source)):
      raise TypeError(f"@register({name!r}) needs a Source subclass, got {cls!r}")
    _REGISTRY[name] = cls
    cls.source_name = name
    return cls

  return decorator


def _load_builtin_sources() -> None:
  # Imported lazily: the source modules import this module to call `register`.
  import data_pipelines.sources  # pylint: disable=g-import-not-at-top,unused-import


def source_names() -> list[str]:
  """Sorted names of every registered source."""
  _load_builtin_sources()
  return sorted(_REGISTRY)


def get_source(name: str) -> type[Source]:
  """The Source class registered as `name`.

  Raises:
    DataError: listing the known names if `name` is unknown.
  """
  _load_builtin_sources()
  if name not in _REGISTRY:
    raise DataError(f"unknown data.source {name!r}; known sources: "
                    f"{', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def check_split(split: str) -> None:
  """Raises DataError unless `split` is "train" or "eval"."""
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
