"""Single-site LM pretraining.

Variants (the part after the colon) pick a model preset from `tapestry_jax.model.PRESETS`
and a matching training budget:
  tiny   ~1M params, byte tokenizer, synthetic data; seconds on a laptop CPU (tests).
  small  ~20M params; the CPU throughput benchmark.
  125m, 350m, 1b, 7b  accelerator presets (32k SentencePiece vocabulary expected).

Run:
  python -m launch.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_tiny
  # real text, one language of the shared corpus:
  python -m launch.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_fr \
      --config.data.source=text_files --config.data.paths=data_pipelines/corpora/debref/fr.txt.xz
"""

import ml_collections

from data_pipelines import config as data_config
from tapestry_jax import model as model_lib


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  if preset not in model_lib.PRESETS:
    raise ValueError(f"unknown lm config variant {preset!r}; known: {sorted(model_lib.PRESETS)}")
  c = ml_collections.ConfigDict()
  c.preset = preset  # Informational: which variant produced this config.

  # --- model (tapestry_jax.model.ModelConfig) ------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  arch = dict(model_lib.ModelConfig().__dict__, **model_lib.PRESETS[preset])
  m.vocab_size = arch["vocab_size"]  # Embedding rows; >= the tokenizer's vocabulary.
  m.d_model = arch["d_model"]  # Residual stream width.
  m.n_layers = arch["n_layers"]  # Transformer blocks.
  m.n_heads = arch["n_heads"]  # Query heads.
  m.n_kv_heads = arch["n_kv_heads"]  # Key/value heads (grouped-query attention; divides n_heads).
  m.head_dim = arch["head_dim"]  # Per-head width (even, for rotary embeddings).
  m.d_ff = arch["d_ff"]  # SwiGLU hidden width.
  m.rope_theta = arch["rope_theta"]  # Rotary embedding base.
  m.norm_eps = arch["norm_eps"]  # RMSNorm epsilon.
  m.tie_embeddings = arch["tie_embeddings"]  # Share input embedding and output layer.
  m.z_loss = 0.0  # Coefficient of the logsumexp^2 auxiliary loss (PaLM uses 1e-4); 0 = off.
  m.param_dtype = "float32"  # Storage dtype of parameters and optimizer state.
  m.compute_dtype = "float32"  # Matmul dtype; "bfloat16" on accelerators.
  m.remat = "none"  # Rematerialisation: none | full | dots | dots_no_batch.
  m.scan_layers = True  # Scan over layers (compile time flat in depth) vs unrolled.
  # auto (reference on CPU, cuDNN flash on Hopper+ GPUs, Pallas splash on TPU) | reference |
  # xla | cudnn | splash: tapestry_jax/attention.py.
  m.attention = "auto"
  m.max_segments = 32  # cudnn: runs of segment ids per row it is built for (docs + padding).
  m.loss_chunk = 512  # Positions per chunk of the loss; no B x L x vocab logits (0 = one chunk).

  # --- data (data_pipelines.config) ----------------------------------------------------
  c.data = data_config.default_config()
  # cuDNN's packed attention (GPUs) holds model.max_segments runs per row: the documents
  # and the padding after them.
  c.data.max_documents_per_row = m.max_segments - 1

  # --- training ---------------------------------------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  t.steps = 200  # Optimizer steps in the whole run (the schedule's length).
  t.global_batch_size = 16  # Sequences per step, across all devices and processes.
  t.microbatches = 1  # Gradient accumulation: the global batch is split into this many.
  # adamw | sgd (no momentum, no weight decay; b1/b2/eps unused) | muon (Muon on the hidden
  # matrices, one per layer, on the same schedule peaking at muon_lr; AdamW with `lr`
  # on the embeddings, output layer and norm scales: tapestry_jax/train.py _muon).
  t.optimizer = "adamw"
  t.lr = 3e-3  # Peak learning rate.
  t.schedule = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup).
  t.warmup_steps = 20  # Linear warmup from 0 to `lr`.
  t.decay_fraction = 0.2  # wsd only: fraction of `steps` spent decaying at the end.
  t.min_lr_ratio = 0.1  # Final learning rate as a fraction of `lr`.
  t.weight_decay = 0.1  # AdamW decoupled weight decay (matrices only).
  t.b1 = 0.9  # AdamW beta1.
  t.b2 = 0.95  # AdamW beta2.
  t.eps = 1e-8  # AdamW epsilon.
  # muon only: peak lr of the hidden matrices (Keller Jordan's 0.02, with Muon's width
  # scaling sqrt(max(1, fan_out / fan_in))); they decay as under AdamW (lr x weight_decay).
  t.muon_lr = 0.02
  t.muon_momentum = 0.95  # muon only: Nesterov momentum of the matrices' updates, in [0, 1).
  t.grad_clip = 1.0  # Global-norm clipping threshold; 0 = off.
  t.seed = 0  # Parameter-init and training PRNG seed.
  # Start from existing params instead of a random init (tapestry_jax/init_from.py): a
  # launch.train workdir (or its checkpoints/), latest step; or a federation's global
  # bucket URL (file://, gs://, s3://), round init_round (-1 = LATEST), its coordinator's
  # signature verified with init_public_key ("ed25519:..."; empty = not verified, with a
  # warning); or hf:DIR, a Hugging Face Llama directory (an open base model on disk, or a
  # launch.export output). The optimizer state, step and data position start fresh. In a
  # federation: the base model every party starts from (global round 0, and the references).
  t.init_from = ""
  t.init_round = -1
  t.init_public_key = ""
  t.log_every = 10  # Steps between metric lines (metrics.jsonl, TensorBoard).
  t.eval_every = 100  # Steps between evaluations; 0 = only at the end.
  t.eval_batches = 8  # Batches of held-out data per evaluation; 0 = the whole eval split.
  t.checkpoint_every = 100  # Steps between checkpoints (and one at the end).
  # Where checkpoints go: "" = WORKDIR/checkpoints; or a directory or bucket URL of the
  # site's own (gs:// needs gcsfs; see tapestry_jax/checkpoint.py checkpoint_path).
  t.checkpoint_dir = ""
  t.keep_checkpoints = 2  # Checkpoints kept on disk (oldest deleted first).
  t.async_checkpoints = True  # Write checkpoints in the background.
  t.progress_bar = True  # Console progress bar.
  t.peak_flops = 0.0  # FLOP/s of the whole mesh for MFU; 0 = look up (or measure on CPU).

  # --- mesh: data x fsdp x tensor, one axis may be -1 (= all remaining devices) -----------
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = 1  # Pure data parallelism (replicated parameters).
  mesh.fsdp = -1  # Data parallelism with parameters and optimizer state sharded.
  mesh.tensor = 1  # Tensor (model) parallelism over heads / mlp / vocab.

  if preset == "small":
    t.global_batch_size = 32
    t.steps = 2000
    t.lr = 2e-3
    t.warmup_steps = 100
    t.eval_every = 500
    t.checkpoint_every = 500
  elif preset != "tiny":  # Accelerator presets.
    m.compute_dtype = "bfloat16"
    m.remat = "dots_no_batch"
    c.data.tokenizer = "sentencepiece"
    c.data.seq_len = 2048
    t.global_batch_size = 256
    t.steps = 20_000
    t.lr = 3e-4 if preset in ("1b", "7b") else 6e-4
    t.warmup_steps = 1000
    t.eval_every = 1000
    t.checkpoint_every = 1000
    t.log_every = 50
  return c
