"""Hugging Face Llama export and import (tapestry_jax/hf.py, train.init_from=hf:DIR).

Round trips need only safetensors and tokenizers; the parity tests load the export with
transformers (torch, CPU) and skip without them, unless TAPESTRY_REQUIRE_HF is set (as
.ci/run does), where a missing package fails them.
"""
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from data_pipelines import tokenizers as tokenizers_lib
from data_pipelines import train_sentencepiece
from data_pipelines.sources import synthetic
from experiments.configs import lm
from tapestry_jax import hf
from tapestry_jax import hf_tokenizer
from tapestry_jax import loop
from tapestry_jax import model as model_lib
from tapestry_jax import train as train_lib
from tapestry_jax import trees
from tapestry_jax.checkpoint import InitError
from tapestry_jax.validate import ConfigError

SMALL = model_lib.ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, head_dim=16, d_ff=96)
# Latin, Cyrillic, Greek, CJK and Hangul (3-byte UTF-8), an emoji (4 bytes), whitespace
# runs, digits, and text that looks like special tokens.
TEXTS = ["Hello, world!", "Привет, мир", "Καλημέρα κόσμε", "日本語のテキストと한국어",
         "emoji 😀 ok", "  two  spaces\n\ttab 12345 ", "<s> not a bos </s> <0x41> <pad>"]


def _hf_package(name: str):
  if os.environ.get("TAPESTRY_REQUIRE_HF"):  # Set by .ci/run: CI must run these.
    return importlib.import_module(name)
  return pytest.importorskip(name)


def _params(cfg: model_lib.ModelConfig, seed: int = 3):
  """Random params whose norm scales are not all ones (so a misplaced norm shows)."""
  params = model_lib.init_params(cfg, jax.random.key(seed))
  noise = lambda p, k: p + 0.2 * jax.random.normal(jax.random.key(k), p.shape, p.dtype)
  params["final_norm"] = noise(params["final_norm"], seed + 1)
  for i, name in enumerate(("attn_norm", "mlp_norm")):
    params["layers"][name] = noise(params["layers"][name], seed + 2 + i)
  return params


def _assert_same_params(a, b):
  assert trees.flatten(a).keys() == trees.flatten(b).keys()
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _logits(cfg, params, ids_BxL):
  B, L = ids_BxL.shape
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  return np.asarray(model_lib.forward(params, jnp.asarray(ids_BxL), positions,
                                      jnp.ones((B, L), jnp.int32), cfg))


def _ids(seed: int = 0, B: int = 3, L: int = 24):
  ids = np.random.default_rng(seed).integers(3, 259, size=(B, L)).astype(np.int32)
  ids[:, 0] = 1  # BOS, as every packed document starts
  return ids


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", [
    dict(tie_embeddings=False, z_loss=1e-4, rope_theta=500_000.0),
    dict(tie_embeddings=True, n_kv_heads=4, norm_eps=1e-5, scan_layers=False),
    dict(n_kv_heads=1, remat="full", compute_dtype="bfloat16")])
def test_save_load_round_trip_is_exact(tmp_path, arch):
  cfg = model_lib.ModelConfig(**{**SMALL.__dict__, **arch})
  params = _params(cfg)
  hf.save(str(tmp_path), cfg, params, tokenizers_lib.ByteTokenizer())
  cfg2, params2, tok = hf.load(str(tmp_path))
  assert cfg2 == cfg
  _assert_same_params(params2, params)
  assert isinstance(tok, tokenizers_lib.ByteTokenizer)
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (
      cfg.n_kv_heads, cfg.tie_embeddings)
  with safetensors.safe_open(str(tmp_path / hf.WEIGHTS), framework="numpy") as f:
    assert ("lm_head.weight" in f.keys()) != cfg.tie_embeddings


def test_sharded_bf16_export_and_a_foreign_directory(tmp_path, monkeypatch):
  """Shards + index as save_pretrained writes them; without tapestry.json the directory
  reads as any HF checkpoint: the architecture from config.json, the dtype from the
  weights, the tokenizer from tokenizer.json."""
  monkeypatch.setattr(hf, "MAX_SHARD_BYTES", 40_000)
  params = _params(SMALL)
  hf.save(str(tmp_path), SMALL, params, tokenizers_lib.ByteTokenizer(), dtype="bfloat16")
  with open(tmp_path / hf.WEIGHTS_INDEX) as f:
    shards = set(json.load(f)["weight_map"].values())
  assert len(shards) > 2 and not os.path.exists(tmp_path / hf.WEIGHTS)
  cfg, loaded, _ = hf.load(str(tmp_path))
  assert cfg.param_dtype == "bfloat16"
  _assert_same_params(loaded, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))

  os.remove(tmp_path / hf.TAPESTRY_JSON)
  cfg, loaded, tok = hf.load(str(tmp_path))
  assert (cfg.param_dtype, cfg.compute_dtype) == ("bfloat16", "bfloat16")
  assert cfg == model_lib.ModelConfig(**{**SMALL.__dict__, "param_dtype": "bfloat16",
                                         "compute_dtype": "bfloat16"})
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  ours = tokenizers_lib.ByteTokenizer()
  for text in TEXTS:
    np.testing.assert_array_equal(tok.encode(text), ours.encode(text))
    assert tok.decode(ours.encode(text)) == text
  np.testing.assert_array_equal(tok.token_bytes, ours.token_bytes)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 259)


def _edit_config(path, **changes):
  with open(path / "config.json") as f:
    config = json.load(f)
  config.update(changes)
  with open(path / "config.json", "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("breakage,message", [
    ("no_dir", "no such directory"),
    ("arch", "only LlamaForCausalLM is supported"),
    ("rope_scaling", "RoPE scaling"),
    ("bias", "attention_bias=true is not supported"),
    ("shape", "model.embed_tokens.weight has shape [384, 64], config.json implies [512, 64]"),
    ("missing", "tensor model.layers.1.mlp.down_proj.weight is missing"),
    ("extra", "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    ("corrupt", "model.safetensors is not a safetensors file"),
    ("disagree", "tapestry.json says d_ff=96 but config.json says 128"),
])
def test_unusable_directories_are_one_clear_line(tmp_path, breakage, message):
  d = tmp_path / "hf"
  hf.save(str(d), SMALL, _params(SMALL), tokenizers_lib.ByteTokenizer())
  weights = d / hf.WEIGHTS
  if breakage == "no_dir":
    d = tmp_path / "nothing"
  elif breakage == "arch":
    _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral")
  elif breakage == "rope_scaling":
    _edit_config(d, rope_scaling={"rope_type": "linear", "factor": 2.0})
  elif breakage == "bias":
    _edit_config(d, attention_bias=True)
  elif breakage == "shape":  # Checked against the tensors when tapestry.json is absent.
    os.remove(d / hf.TAPESTRY_JSON)
    _edit_config(d, vocab_size=512)
  elif breakage == "disagree":
    _edit_config(d, intermediate_size=128)
  elif breakage in ("missing", "extra"):
    tensors = safetensors.numpy.load_file(str(weights))
    if breakage == "missing":
      del tensors["model.layers.1.mlp.down_proj.weight"]
    else:
      tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros([64], np.float32)
    safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  elif breakage == "corrupt":
    weights.write_bytes(b"not safetensors at all")
  with pytest.raises(InitError, match=re.escape(message)) as e:
    hf.load(str(d))
  assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def transformers():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Everything here is on local disk.
  torch = _hf_package("torch")
  torch.set_num_threads(1)
  return _hf_package("transformers")


def _hf_logits(transformers, directory, ids_BxL, dtype):
  import torch
  model = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
  with torch.no_grad():
    return model(torch.tensor(ids_BxL, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_computes_our_logits(tmp_path, transformers, tie):
  import torch
  cfg = model_lib.ModelConfig(**{**SMALL.__dict__, "tie_embeddings": tie,
                                 "rope_theta": 10_000.0 if tie else 500.0})
  params = _params(cfg)
  hf.save(str(tmp_path), cfg, params, tokenizers_lib.ByteTokenizer())
  ids = _ids()
  ours = _logits(cfg, params, ids)
  theirs = _hf_logits(transformers, tmp_path, ids, torch.float32)
  assert np.abs(ours).max() > 1.0  # not trivially small
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_computes_our_logits_in_bfloat16(tmp_path, transformers):
  """A bfloat16 export run in bfloat16 by both sides: within bfloat16 rounding of each
  other, and both that close to the float32 model."""
  import torch
  params = _params(SMALL)
  hf.save(str(tmp_path), SMALL, params, tokenizers_lib.ByteTokenizer(), dtype="bfloat16")
  cfg, bf16_params, _ = hf.load(str(tmp_path))
  assert cfg.compute_dtype == "float32"  # tapestry.json keeps ours; run it in bf16:
  cfg = model_lib.ModelConfig(**{**cfg.__dict__, "compute_dtype": "bfloat16"})
  ids = _ids(1)
  ours = _logits(cfg, bf16_params, ids)
  theirs = _hf_logits(transformers, tmp_path, ids, torch.bfloat16)
  exact = _logits(SMALL, params, ids)
  scale = np.abs(exact).max()
  assert np.abs(theirs - ours).max() < 0.03 * scale
  assert np.abs(ours - exact).max() < 0.03 * scale
  assert np.abs(theirs - exact).max() < 0.03 * scale


def test_a_checkpoint_saved_by_transformers_imports_with_its_logits(tmp_path, transformers):
  """The import direction: a LlamaForCausalLM written by save_pretrained itself (sharded,
  its own config.json), read with hf.load_config / load_params."""
  import torch
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.1)
  model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / hf.WEIGHTS_INDEX)
  cfg = hf.load_config(str(tmp_path))
  assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.norm_eps) == (2, 16, 1000.0, 1e-5)
  ids = _ids(2)
  with torch.no_grad():
    theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  ours = _logits(cfg, hf.load_params(str(tmp_path), cfg), ids)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "corpus.txt"
  path.write_text("\n".join(synthetic.generate_document(0, i % 6, "train", i)
                            for i in range(120)), encoding="utf-8")
  return path


def test_autotokenizer_encodes_our_byte_ids(tmp_path, transformers):
  hf.save(str(tmp_path), SMALL, _params(SMALL), tokenizers_lib.ByteTokenizer())
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = tokenizers_lib.ByteTokenizer()
  for text in TEXTS:
    ids = ours.encode(text).tolist()
    assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
    assert auto(text)["input_ids"] == [ours.bos_id] + ids  # BOS first, as in training
    assert auto.decode(ids) == text
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_autotokenizer_encodes_our_sentencepiece_ids(tmp_path, transformers, corpus,
                                                     model_type):
  model = train_sentencepiece.train([str(corpus)], str(tmp_path / "sp"), 700,
                                    model_type=model_type)
  ours = tokenizers_lib.SentencePieceTokenizer(model)
  out = tmp_path / "hf"
  hf.save(str(out), SMALL, _params(SMALL), ours)
  assert isinstance(hf.load_tokenizer(str(out)), tokenizers_lib.SentencePieceTokenizer)
  auto = transformers.AutoTokenizer.from_pretrained(str(out))
  texts = TEXTS[:-1] + [synthetic.generate_document(0, i % 6, "eval", i) for i in range(12)]
  for text in texts:
    ids = ours.encode(text).tolist()
    assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
    assert auto.decode(ids) == text
  if model_type == "unigram":  # Read as a foreign directory: its tokenizer.json.
    os.remove(out / hf.TAPESTRY_JSON)
    foreign = hf.load_tokenizer(str(out))
    assert isinstance(foreign, hf_tokenizer.HFTokenizer)
    for text in texts:
      np.testing.assert_array_equal(foreign.encode(text), ours.encode(text))
    np.testing.assert_array_equal(foreign.token_bytes, ours.token_bytes)


# --------------------------------------------------------------------------- init_from


def _config(**train):
  c = lm.get_config("tiny")
  c.data.seq_len = 64
  c.data.synthetic.num_documents = 400
  c.train.update(dict(global_batch_size=8, steps=4, warmup_steps=2, log_every=1, eval_every=0,
                      eval_batches=2, checkpoint_every=4, progress_bar=False, peak_flops=1e11))
  c.train.update(train)
  return c


def test_init_from_hf_starts_a_run_from_the_exported_params(tmp_path):
  """Step 0 of a launch.train run holds exactly the exported params (so its eval loss
  is the exported model's), sharded over the run's mesh."""
  cfg = model_lib.ModelConfig.from_config(_config().model)
  params = _params(cfg)
  hf.save(str(tmp_path / "hf"), cfg, params, tokenizers_lib.ByteTokenizer())
  c = _config(init_from=f"hf:{tmp_path / 'hf'}")
  start = loop.train_and_evaluate(c, str(tmp_path / "run"), stop_at_step=0)
  _assert_same_params(start["state"].params, params)
  assert start["state"].params["layers"]["wq"].sharding.mesh.shape["fsdp"] == 8
  # A federation's global round 0 (train.initial_params), from a bfloat16 export: the
  # stored values, cast to the run's float32.
  hf.save(str(tmp_path / "bf16"), cfg, params, tokenizers_lib.ByteTokenizer(), dtype="bfloat16")
  host = train_lib.initial_params(cfg, 0, _config(init_from=f"hf:{tmp_path / 'bf16'}").train)
  _assert_same_params(host, jax.tree.map(
      lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params))


def test_init_from_hf_mismatch_is_one_clear_line(tmp_path):
  cfg = model_lib.ModelConfig.from_config(_config().model)
  hf.save(str(tmp_path / "hf"), cfg, _params(cfg), tokenizers_lib.ByteTokenizer())
  with pytest.raises(ConfigError, match="no such directory"):  # before anything compiles
    loop.site_setup(_config(init_from=f"hf:{tmp_path / 'nothing'}"))
  c = _config(init_from=f"hf:{tmp_path / 'hf'}")
  c.model.d_ff = 2 * c.model.d_ff
  _, trainer = loop.site_setup(c)
  with pytest.raises(InitError, match=r"layers/w_down has shape \(4, 384, 128\) in the "
                                      r"checkpoint, the run's model.\* needs \(4, 768, 128\)"):
    trainer.init_state(0)
  c = _config(init_from=f"hf:{tmp_path / 'hf'}")
  c.model.tie_embeddings = True
  _, trainer = loop.site_setup(c)
  with pytest.raises(InitError, match="tie_word_embeddings=false"):
    trainer.init_state(0)
