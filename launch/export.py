"""Export a model in Hugging Face Llama format (safetensors, config.json, tokenizer).

  python -m launch.export --model=/tmp/lm_tiny --out=/tmp/lm_tiny_hf
  python -m launch.export --model=/tmp/lm_tiny@200 --out=/tmp/lm_tiny_hf --dtype=bfloat16
  python -m launch.export --model=s3://global/fed@12 --out=/tmp/fed_hf \
      --config=experiments/configs/federation.py:tiny --public_key=ed25519:...

--model is anything `tapestry_jax.model_source` reads: a launch.train workdir (latest
step, or WORKDIR@STEP), a federation's global bucket URL (latest round, or URL@ROUND;
the federation's --config names the model and tokenizer), or hf:DIR. The output loads
with transformers.LlamaForCausalLM / AutoTokenizer.from_pretrained(OUT), and back with
--config.train.init_from=hf:OUT (docs/evaluate_sample_export.md).
"""

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags, quiet_library_logs

_MODEL = flags.DEFINE_string("model", None, "WORKDIR[@STEP], a global bucket URL[@ROUND], "
                             "or hf:DIR.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face model into.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config of the run that made --model, when --model does not carry "
    "one (a global bucket): e.g. experiments/configs/federation.py:tiny.", lock_config=True)
_PUBLIC_KEY = flags.DEFINE_string("public_key", "", "ed25519:... key of the coordinator, "
                                  "to verify a global round's signature.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Dtype of the stored weights; default: the model's own.")
flags.mark_flags_as_required(["model", "out"])


def main(argv):
  del argv
  from tapestry_jax import hf
  from tapestry_jax import model_source

  quiet_library_logs()
  with exit_on_bad_input():
    loaded = model_source.load(_MODEL.value, config=_CONFIG.value,
                               public_key=_PUBLIC_KEY.value)
    hf.save(_OUT.value, loaded.model_cfg, loaded.params, loaded.tokenizer,
            dtype=_DTYPE.value or "",
            max_position_embeddings=int(getattr(loaded.data_cfg, "seq_len", 0) or 2048))
  print(f"wrote {loaded.name} to {_OUT.value} (Hugging Face {hf.ARCHITECTURE})")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
