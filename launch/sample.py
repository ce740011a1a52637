"""Text from any model: prompts in, continuations out (docs/evaluate_sample_export.md).

  python -m launch.sample --model=/tmp/lm_tiny --prompt="Lomi " --max_new_tokens=64
  python -m launch.sample --model=file:///tmp/fed/buckets/global \
      --config=experiments/configs/federation.py:debref --prompt="The " --prompt="Le " \
      --temperature=0.8 --top_k=40

--model: as for launch.evaluate (a launch.train workdir[@STEP], a federation's
WORKDIR/sites/NAME, a global bucket URL[@ROUND] with --config and --public_key, hf:DIR).
Temperature 0 is greedy and deterministic; otherwise --seed makes a sample repeatable.
"""

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags, quiet_library_logs

_MODEL = flags.DEFINE_string("model", None, "The model (see above).")
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Prompt text (repeat for several; "
                                    "generated together as one batch).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config with `model` and `data` for models that do not record theirs "
    "(a global round; a federation's sites/NAME).", lock_config=True)
_PUBLIC_KEY = flags.DEFINE_string("public_key", "", "The coordinator's public key "
                                  "(ed25519:...) that a global round must be signed with.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "At most this many new tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy (deterministic).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this much "
                            "probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["model"])


def main(argv):
  del argv
  from tapestry_jax import generate, model_source

  quiet_library_logs()
  with exit_on_bad_input():
    m = model_source.load(_MODEL.value, config=_CONFIG.value, public_key=_PUBLIC_KEY.value)
    texts = generate.complete(m.model_cfg, m.params, m.tokenizer, _PROMPT.value,
                              max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                              top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  for prompt, text in zip(_PROMPT.value, texts):
    print(f"{prompt}{text}")
    print("---")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
