"""Datasets, batching and synthetic tasks for RLHF.

Pipeline: raw records (JSONL / parquet / HF `datasets` / TFDS array_record / Python dicts) are
validated into examples (`parse_record`, `load_examples`), tokenized outside jit
(`tokenize_examples`), and collated into fixed-shape NumPy batches (`collate_*`, `pack_*`),
served by a deterministic, sharded, checkpointable grain-backed `DataLoader`. `PromptLoader`
serves in-memory prompt sets (already tokenized) to the online trainers, resumably.

Batch keys (see docs/ARCHITECTURE.md "Batches"): SFT ``input_ids, attention_mask, loss_mask,
positions, segment_ids`` `[B, T]`; preference: the same prefixed ``chosen_`` / ``rejected_`` plus
``margin, label`` `[B]`; ranking: token keys `[B, K, T]` plus ``ranks, response_mask`` `[B, K]`;
KTO: SFT keys plus ``label`` (and ``kl_`` keys); RL prompts: ``prompt_ids, prompt_mask,
prompt_positions, prompt_segment_ids`` `[B, P]` left-padded plus ``prompt_index`` and numeric task
fields. Packed SFT / preference batches add ``sequence_ids`` and, for pairs, ``chosen_index,
rejected_index, chosen_last_index, rejected_last_index, pair_mask`` (see `pack_preference`).
Prefix-shared batches (`BatchConfig.prefix_sharing`) hold one row per pair or ranking, the
prompt once: the SFT token keys plus ``branch_ids`` `[B, T]`, and ``margin, label`` (pairs, see
`collate_prefix_shared`) or ``ranks, response_mask`` (rankings, see `collate_ranking`).

Bad rows raise a `RecordError` naming file, line/row and problem, or with ``on_error="skip"``
are counted per reason in a `LoadReport` that is logged to the ``rlhf_jax.data`` logger. The
report also counts the prompts, responses and conversations that tokenisation truncated
(`LoadReport.truncated`), and pairs or rankings whose responses became identical are skipped
under ``"identical_after_tokenization"``.
Synthetic tasks, their tokenizer and simulated raters live in `rlhf_jax.data.synthetic`.
"""

from rlhf_jax.data._collate import (
    DEFAULT_LENGTH_BUCKETS,
    TOKEN_KEYS,
    bucket_length,
    collate_kto,
    collate_preference,
    collate_prefix_shared,
    collate_prompts,
    collate_ranking,
    collate_sft,
    first_fit,
    pack_preference,
    pack_sft,
    preference_pairs_that_fit,
)
from rlhf_jax.data._examples import (
    KTOExample,
    PreferenceExample,
    PromptExample,
    RankingExample,
    SFTExample,
    TokenizedKTO,
    TokenizedPreference,
    TokenizedPrompt,
    TokenizedRanking,
    TokenizedSFT,
)
from rlhf_jax.data._hh import HHParseError, HHSplit, split_hh_transcripts
from rlhf_jax.data._loader import BatchConfig, DataLoader, make_collate_fn, make_loader
from rlhf_jax.data._margins import RATING_SCALES, RatingMargins, normalize_rating
from rlhf_jax.data._prompt_loader import PromptLoader
from rlhf_jax.data._records import (
    FORMATS,
    REASONS,
    TRUNCATIONS,
    LoadReport,
    RecordError,
    parse_record,
)
from rlhf_jax.data._shuffle import shuffle_permutation
from rlhf_jax.data._sources import (
    SOURCE_TYPES,
    detect_source_type,
    load_examples,
    read_hf_disk,
    read_hf_files,
    read_jsonl,
    read_parquet,
    read_rows,
    read_tfds,
)
from rlhf_jax.data._tfds_builder import build_tfds_dataset
from rlhf_jax.data._tokenize import (
    DEFAULT_CHAT_TEMPLATE,
    TokenizeConfig,
    tokenize_example,
    tokenize_examples,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_LENGTH_BUCKETS",
    "SOURCE_TYPES",
    "FORMATS",
    "RATING_SCALES",
    "REASONS",
    "TOKEN_KEYS",
    "TRUNCATIONS",
    "BatchConfig",
    "DataLoader",
    "HHParseError",
    "HHSplit",
    "KTOExample",
    "LoadReport",
    "PreferenceExample",
    "PromptExample",
    "PromptLoader",
    "RankingExample",
    "RatingMargins",
    "RecordError",
    "SFTExample",
    "TokenizeConfig",
    "TokenizedKTO",
    "TokenizedPreference",
    "TokenizedPrompt",
    "TokenizedRanking",
    "TokenizedSFT",
    "bucket_length",
    "build_tfds_dataset",
    "collate_kto",
    "collate_preference",
    "collate_prefix_shared",
    "collate_prompts",
    "collate_ranking",
    "collate_sft",
    "detect_source_type",
    "first_fit",
    "load_examples",
    "make_collate_fn",
    "make_loader",
    "normalize_rating",
    "pack_preference",
    "pack_sft",
    "parse_record",
    "preference_pairs_that_fit",
    "read_hf_disk",
    "read_hf_files",
    "read_jsonl",
    "read_parquet",
    "read_rows",
    "read_tfds",
    "shuffle_permutation",
    "split_hh_transcripts",
    "tokenize_example",
    "tokenize_examples",
]
