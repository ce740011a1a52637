"""Held-out loss, perplexity and bits per byte of models (docs/evaluate_sample_export.md).

  python -m launch.evaluate --model=/tmp/lm_fr --data='data_pipelines/corpora/debref/*.txt.xz'
  python -m launch.evaluate --model=/tmp/lm_tiny --model=/tmp/lm_tiny@100 --source=synthetic
  python -m launch.evaluate --model=file:///tmp/fed/buckets/global \
      --config=experiments/configs/federation.py:debref \
      --data=data_pipelines/corpora/debref/fr.txt.xz

--model: a launch.train workdir (WORKDIR@STEP for a checkpoint step), a federation's
WORKDIR/sites/NAME, a global bucket URL (URL@ROUND; needs --config, verified with
--public_key) or hf:DIR. A row per file (or source split), a column group per model.
"""

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags, quiet_library_logs

_MODEL = flags.DEFINE_multi_string("model", None, "Model to evaluate (repeat to compare).")
_DATA = flags.DEFINE_multi_string("data", [], "Text file or glob (plain or .xz); repeatable.")
_SOURCE = flags.DEFINE_string("source", "", "A registered data source (e.g. synthetic), read "
                              "with each model's own data config.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["train", "eval"], "The --source split.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config with `model` and `data` for models that do not record theirs "
    "(a global round; a federation's sites/NAME), e.g. experiments/configs/federation.py:debref.",
    lock_config=True)
_PUBLIC_KEY = flags.DEFINE_string("public_key", "", "The coordinator's public key "
                                  "(ed25519:...) that a global round must be signed with.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "At most this many tokens per file (0: all).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Tokens per sequence (0: each model's own).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per eval step.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")
flags.mark_flags_as_required(["model"])


def main(argv):
  del argv
  from tapestry_jax import evaluate

  quiet_library_logs()
  with exit_on_bad_input():
    data = evaluate.data_list(_DATA.value, _SOURCE.value, _SPLIT.value)
    models = evaluate.compare(_MODEL.value, data, config=_CONFIG.value,
                              public_key=_PUBLIC_KEY.value, seq_len=_SEQ_LEN.value,
                              batch_size=_BATCH_SIZE.value, max_tokens=_MAX_TOKENS.value)
    print(evaluate.table(models))
    if _JSON_OUT.value:
      evaluate.write_json(_JSON_OUT.value, data, models)
      print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
