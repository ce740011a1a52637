"""How sites and coordinator exchange models: the one protocol module.

  store    committed rounds of named arrays in a bucket: zarr3 arrays with per-chunk
           BLAKE3 digests, manifests, the create-only COMMIT marker, LATEST
  blocks   block-level reads and writes of a round's arrays (the streaming merge's I/O)
  rounds   the federation's round protocol on top: array-name layout, encoding of
           updates, publishing an update, reading and verifying a global round

Other modules import this package and use the names below, nothing private.
"""

from tapestry_jax.exchange.blocks import (BlockWriter, common_blocks, iter_blocks, open_array,
                                          read_block)
from tapestry_jax.exchange.rounds import (
    COMPANION_PREFIXES, DOWN, DOWN_PARTS, MOMENT_PREFIX, OUTER, PARAMS, RollbackError,
    StaleRoundError, TRUST_LOG, change_key, publish_trust_update, read_trust_updates, refresh_trust,
    trust_update_key,
    as_update, companion_key, decode_update, diverged, down_key, download_parts,
    download_schema, encode_update, global_arrays, moment_key, newer_global_round, outer_key,
    param_key, params_of, publish_update, read_global, read_global_download,
    read_global_manifest, read_global_moments, read_global_round, stored_arrays, update_norm,
    update_schema, validate_update, check_moment_round)
from tapestry_jax.exchange.store import (
    COMMIT, DEFAULT_MAX_CHUNK_BYTES, FORMAT_VERSION, KINDS, LATEST, MANIFEST, CommitConflict,
    ExchangeError, check_schema, choose_chunk_shape, chunk_digest, combined_digest,
    compact_records, committed_rounds, data_prefix, expand_records, global_prefix, make_manifest, manifest_digest,
    merge_records, new_attempt, np_dtype, read_arrays, read_latest, read_manifest,
    round_prefix, uncommitted_attempts, update_prefix, write_arrays, write_latest,
    write_manifest)
