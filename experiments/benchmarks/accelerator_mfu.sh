#!/usr/bin/env bash
# One visit's MFU table on one GPU (issue 16), each configuration in its own process
# with its own time limit, most important first, so a visit cut short still has them.
#
#   bash experiments/benchmarks/accelerator_mfu.sh [OUT_DIR]      # default /tmp/mfu
#
# Every run is experiments.benchmarks.train_throughput (which measures the matmul peak in
# the same process and prints MFU against it and against the spec sheet); the summary at
# the end is one line per run from their JSON. LIMIT_S (default 240) bounds each run.
set -u
out="${1:-/tmp/mfu}"
limit="${LIMIT_S:-240}"
mkdir -p "$out"

run() {  # run NAME [XLA_FLAGS=...] -- train_throughput flags
  local name="$1"; shift
  local flags_env=""
  if [[ "${1:-}" == XLA_FLAGS=* ]]; then flags_env="${1#XLA_FLAGS=}"; shift; fi
  XLA_FLAGS="$flags_env" timeout "$limit" python -m experiments.benchmarks.train_throughput \
    --steps=8 --json_out="$out/$name.json" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $?"
}

# The defaults, as a user gets them (auto attention: cuDNN with packed documents).
run 1b_default --preset=1b --batch=16
run 350m_default --preset=350m --batch=32
run 125m_default --preset=125m --batch=64
# What each lever is worth on 1b.
run 1b_xla_attention --preset=1b --batch=16 --attention=xla
run 1b_whole_logits --preset=1b --batch=16 --loss_chunk=0
run 1b_unscanned --preset=1b --batch=16 --scan_layers=false
run 1b_remat_none --preset=1b --batch=16 --remat=none
run 1b_batch32_micro2 --preset=1b --batch=32 --microbatches=2
# XLA GPU flags, one at a time.
run 1b_lhs XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --preset=1b --batch=16
run 1b_no_triton_gemm XLA_FLAGS=--xla_gpu_enable_triton_gemm=false --preset=1b --batch=16
# Memory: 7b on one card with remat (does it fit at 4 x 2048 tokens?).
run 7b_batch4_remat_full --preset=7b --batch=4 --remat=full --steps=2

python - "$out" <<'EOF'
import glob, json, os, sys
print(f"{'run':<22} {'tokens/s':>10} {'MFU spec':>9} {'vs matmul':>10} {'GiB peak':>9}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
  r = json.load(open(path))
  mem = r.get("device_peak_memory_gib") or r.get("compiled_memory_gib") or 0
  print(f"{os.path.basename(path)[:-5]:<22} {r['tokens_per_s']:>10.0f} "
        f"{r['mfu_vs_spec_peak'] or 0:>9.3f} {r['ratio_vs_measured_matmul_peak']:>10.3f} {mem:>9.1f}")
EOF
