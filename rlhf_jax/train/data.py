"""A run's examples from its `DataSpec`: the training loader and the held-out batches
(`build_data`), from files or a synthetic task, in the trainer's record format.

`build_data` reads and validates records (`rlhf_jax.data.load_examples`), tokenizes them outside
jit, and batches them with a deterministic, resumable `rlhf_jax.data.DataLoader`; skipped
records are counted per reason for the run summary. Knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import data as rdata
from rlhf_jax.data import BatchConfig, DataLoader, KTOExample, synthetic
from rlhf_jax.train.config import DataSpec


class DataBundle(NamedTuple):
    """What `build_data` returns.

    Attributes:
      train: the training `rlhf_jax.data.DataLoader` (infinite, shuffled, resumable).
      eval_batches: `eval_batches()` -> a fresh iterator over the held-out batches (one pass),
        or None without a held-out set.
      tokenizer: the tokenizer used.
      pad_id: the pad token id of the batches.
      skipped: records skipped per reason (with `data.on_error="skip"`), train and held-out.
      reports: `{"train": LoadReport, "eval": LoadReport}` (eval only with a held-out set):
        rows read, loaded, skipped per reason and truncated prompts / responses per split.
    """

    train: Any
    eval_batches: Callable[[], Any] | None
    tokenizer: Any
    pad_id: int
    skipped: dict[str, int]
    reports: Mapping[str, Any] = {}


def synthetic_records(task_name: str, format: str, *, num: int, seed: int,
                      num_responses: int = 4) -> list[dict[str, Any]]:
    """Records of `format` from the synthetic task `task_name` (`rlhf_jax.data.synthetic`).

    `"kto"` records unpair synthetic preference pairs (chosen -> desirable, rejected ->
    undesirable), the way TRL converts paired data for KTO.
    """
    task = synthetic.get_task(task_name)
    if format == "sft":
        return synthetic.make_sft_dataset(task, num_examples=num, seed=seed)
    if format == "preference":
        return synthetic.make_preference_dataset(task, num_pairs=num, seed=seed)[0]
    if format == "ranking":
        return synthetic.make_ranking_dataset(task, num_prompts=num,
                                              num_responses=num_responses, seed=seed)[0]
    if format == "kto":
        pairs = synthetic.make_preference_dataset(task, num_pairs=(num + 1) // 2, seed=seed)[0]
        records = []
        for r in pairs:
            records.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            records.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        return records[:num]
    if format == "prompt":
        return synthetic.make_prompt_dataset(task, num_prompts=num, seed=seed)
    raise ValueError(f"synthetic data has no format {format!r}; allowed: sft, preference, "
                     "ranking, kto, prompt")


def unpair_preferences(examples: Sequence[Any]) -> list[Any]:
    """KTO examples from preference pairs: each pair gives a desirable (chosen) and an
    undesirable (rejected) completion of its prompt, as TRL's `unpair_preference_dataset`."""
    out = []
    for e in examples:
        out.append(KTOExample(e.prompt, e.chosen, True, e.origin))
        out.append(KTOExample(e.prompt, e.rejected, False, e.origin))
    return out


class TokenizedRecords(NamedTuple):
    """In-memory records validated and tokenized once (`tokenize_records`), for the runs of a
    sweep that train on the same records with the same tokenisation: `build_data(...,
    records=tokenized)` (and so `run_sft`, `run_rm`, `run_dpo`, `dpo_reference_logps`) uses
    the examples as they are instead of tokenizing the records again.

    Attributes:
      examples: the tokenized examples (`rlhf_jax.data.Tokenized*`), in record order, the
        skipped records left out.
      report: the `LoadReport` of reading and tokenizing them (skips, truncations).
      key: what decided the tokenisation (`tokenization_key`): the trainer's record format,
        the tokenizer and the `DataSpec` fields that tokenisation reads; a run whose key
        differs refuses the examples (`build_data` names the fields).
    """

    examples: list
    report: Any
    key: Mapping[str, Any]


TOKENIZATION_FIELDS = ("format", "max_prompt_length", "max_length", "overlong", "on_error",
                       "margin_field", "rating_scale", "rating_margins")
"""The `DataSpec` fields that decide how records become tokenized examples."""


def tokenization_key(spec: DataSpec, *, format: str, tokenizer: Any) -> dict[str, Any]:
    """What decides how `build_data` turns records into tokenized examples: the trainer's
    record `format`, the tokenizer (class, `name_or_path`, vocabulary size) and the
    `TOKENIZATION_FIELDS` of `spec`."""
    return {
        "trainer_format": format,
        "tokenizer": (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")),
                      len(tokenizer)),
        **{name: getattr(spec, name) for name in TOKENIZATION_FIELDS},
    }


def _tokenize(spec: DataSpec, source: Any, *, format: str, tokenizer: Any, split: str | None,
              synthetic_seed: int, num: int) -> tuple[list, Any]:
    """`(tokenized examples, LoadReport)` of one split (`build_data`): records, a file or the
    synthetic task, validated, unpaired for a KTO trainer (`format="kto"`) on paired data,
    and tokenized."""
    wanted = format
    format = spec.format or format
    rating_margins = None
    if spec.margin_field is not None:
        if format not in ("preference", "hh"):
            raise ValueError(f"data.margin_field={spec.margin_field!r} sets preference-pair "
                             f"margins; it does not apply to {format!r} records")
        rating_margins = rdata.RatingMargins.from_scale(
            spec.margin_field, scale=spec.rating_scale, table=spec.rating_margins)
    if isinstance(source, Sequence) and not isinstance(source, str):
        source_type = "records"
    elif source is None:
        if spec.synthetic is None:
            raise ValueError("set data.path (a file or directory) or data.synthetic (a task "
                             "name of rlhf_jax.data.synthetic)")
        source = synthetic_records(spec.synthetic, format, num=num, seed=synthetic_seed,
                                   num_responses=spec.num_responses)
        source_type = "records"
    else:
        source_type = spec.source_type
    raw, report = rdata.load_examples(source, format=format, on_error=spec.on_error,
                                      source_type=source_type, split=split,
                                      rating_margins=rating_margins)
    if wanted == "kto" and format in ("preference", "hh"):
        raw = unpair_preferences(raw)
    tok_config = rdata.TokenizeConfig(max_prompt_length=spec.max_prompt_length,
                                      max_length=spec.max_length, overlong=spec.overlong)
    tokenized, tok_report = rdata.tokenize_examples(raw, tokenizer, config=tok_config,
                                                    on_error=spec.on_error,
                                                    source=report.source)
    return tokenized, report.merge(tok_report)


def tokenize_records(
    spec: DataSpec,
    records: Sequence[Mapping[str, Any]],
    *,
    format: str,
    tokenizer: Any,
) -> TokenizedRecords:
    """In-memory records validated and tokenized as `build_data(spec, format=format,
    tokenizer=tokenizer, records=records)` would, once, for several runs.

    Args:
      spec: the runs' data spec (its `TOKENIZATION_FIELDS` decide the tokenisation; batch
        size, seed and shuffling may differ between the runs).
      records: the records, as for `build_data`.
      format: the trainer's record format (`"sft"`, `"preference"`, `"ranking"`, `"kto"`).
      tokenizer: the runs' tokenizer (`rlhf_jax.train.builders.load_tokenizer_for`).

    A run whose format, tokenizer or tokenisation fields differ refuses the result.
    """
    examples, report = _tokenize(spec, list(records), format=format, tokenizer=tokenizer,
                                 split=spec.split, synthetic_seed=0, num=0)
    return TokenizedRecords(examples, report,
                            tokenization_key(spec, format=format, tokenizer=tokenizer))


def _check_tokenized(records: TokenizedRecords, spec: DataSpec, *, format: str, tokenizer: Any,
                     role: str) -> None:
    """Raises naming the settings when `records` were tokenized otherwise than this run's."""
    key = tokenization_key(spec, format=format, tokenizer=tokenizer)
    differ = [k for k in key if records.key.get(k) != key[k]]
    if differ:
        raise ValueError(f"build_data: the {role} TokenizedRecords were tokenized with other "
                         "settings than this run's ("
                         + "; ".join(f"{k}={records.key.get(k)!r} vs {key[k]!r}" for k in differ)
                         + "); tokenize them with this run's data spec and tokenizer")


def build_data(
    spec: DataSpec,
    *,
    format: str,
    tokenizer: Any,
    seed: int,
    kl_pairs: bool = False,
    records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    eval_records: Sequence[Mapping[str, Any]] | TokenizedRecords | None = None,
    per_process: bool = True,
) -> DataBundle:
    """Training loader and held-out batches from a `DataSpec` (synthetic task, files or
    in-memory records).

    Args:
      spec: the data spec (`spec.format` overrides `format`).
      format: the trainer's record format (`"sft"`, `"preference"`, `"ranking"`, `"kto"`).
        A KTO trainer given preference data (`spec.format="preference"` or `"hh"`) unpairs
        it with `unpair_preferences`.
      tokenizer: a transformers tokenizer.
      seed: the run seed (shuffling; synthetic data uses `seed` for train, `seed + 1` held out).
      kl_pairs: add KTO's mismatched `kl_` pairs.
      records: the training records as Python dicts in the trainer's record format (e.g.
        `{"prompt", "chosen", "rejected"}`), used instead of `spec.path` and `spec.synthetic`;
        they are validated, tokenized, truncated and counted exactly like the lines of a file
        (a bad record is named by its index). The tokenizer is still `spec.synthetic`'s or
        the model's. Or `TokenizedRecords` (`tokenize_records`): records tokenized once for
        the runs of a sweep, used as they are (their tokenisation must be this run's).
      eval_records: held-out records in the same format, or `TokenizedRecords` (with
        `records`: the only held-out set; without them there is none).
      per_process: each process reads its own share of every batch (the default: the batches
        of the processes together are the global batch, `rlhf_jax.sharding.shard_batch`).
        False: every process reads the whole global batch, the same on every process (the
        online trainers' prompts, whose rollouts are scored on every host as on one).

    Batches are padded to `spec.max_length` (or the smallest of `spec.buckets` that fits) with
    `spec.batch_size / jax.process_count()` rows per host (`spec.batch_size` rows without
    `per_process`).
    """
    wanted = format
    format = spec.format or format
    # KTO on paired data: load the pairs, then unpair them (chosen desirable, rejected not).
    unpair = wanted == "kto" and format in ("preference", "hh")
    hosts = jax.process_count() if per_process else 1
    # Without per_process every process reads the stream whole: shard 0 of 1.
    shard = {} if per_process else {"shard_index": 0, "shard_count": 1}
    if spec.batch_size % hosts:
        raise ValueError(f"data.batch_size={spec.batch_size} must be divisible by the "
                         f"{hosts} hosts")
    eval_bs = spec.eval_batch_size or spec.batch_size
    pad_id = next((int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if v is not None), 0)

    if spec.prefix_sharing and (spec.packing or unpair
                                or format not in ("preference", "hh", "ranking")):
        raise ValueError("data.prefix_sharing needs preference pairs (DPO family, reward "
                         f"models) or rankings; got format {format!r} for {wanted!r} examples"
                         f"{' with packing' if spec.packing else ''}")

    def batch_config(batch_size, packing):
        if spec.prefix_sharing:
            branches = spec.num_responses if format == "ranking" else 2
            return BatchConfig(batch_size=batch_size // hosts, prefix_sharing=True,
                               num_responses=spec.num_responses if format == "ranking" else None,
                               length_buckets=prefix_shared_lengths(
                                   spec.max_length, spec.buckets, branches=branches))
        if spec.buckets and not packing:
            buckets = tuple(sorted(b for b in spec.buckets if b < spec.max_length))
            return BatchConfig(batch_size=batch_size // hosts,
                               length_buckets=buckets + (spec.max_length,),
                               num_responses=spec.num_responses if format == "ranking" else None,
                               kl_pairs=kl_pairs)
        return BatchConfig(batch_size=batch_size // hosts, length=spec.max_length,
                           packing=packing, kl_pairs=kl_pairs,
                           num_responses=spec.num_responses if format == "ranking" else None)

    skipped: dict[str, int] = {}

    reports: dict[str, Any] = {}

    def examples(source, *, split, synthetic_seed, num, role):
        if isinstance(source, TokenizedRecords):
            _check_tokenized(source, spec, format=wanted, tokenizer=tokenizer, role=role)
            tokenized, reports[role] = list(source.examples), source.report
        else:
            tokenized, reports[role] = _tokenize(spec, source, format=wanted,
                                                 tokenizer=tokenizer, split=split,
                                                 synthetic_seed=synthetic_seed, num=num)
        for reason, n in reports[role].skipped.items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        return tokenized

    def in_memory(recs):
        return recs if isinstance(recs, TokenizedRecords) else list(recs)

    if records is None and eval_records is not None:
        raise ValueError("eval_records needs records (in-memory training records)")
    train_source = spec.path if records is None else in_memory(records)
    train_examples = examples(train_source, split=spec.split, synthetic_seed=seed, num=spec.num_train,
                              role="train")
    train = DataLoader(train_examples, batch_config=batch_config(spec.batch_size, spec.packing),
                       pad_id=pad_id, seed=seed, shuffle=spec.shuffle, **shard)

    eval_source = spec.eval_path or (spec.path if spec.eval_split else None)
    synthetic_eval = spec.path is None and spec.num_eval > 0
    if records is not None:
        eval_source = None if eval_records is None else in_memory(eval_records)
        synthetic_eval = False
    eval_batches = None
    if eval_source is not None or synthetic_eval:
        eval_examples = examples(eval_source, split=spec.eval_split or "test",
                                 synthetic_seed=seed + 1, num=spec.num_eval, role="eval")
        if len(eval_examples) < eval_bs:
            raise ValueError(f"the held-out set has {len(eval_examples)} examples, fewer than "
                             f"data.eval_batch_size={eval_bs}")
        eval_loader = DataLoader(eval_examples, batch_config=batch_config(eval_bs, False),
                                 pad_id=pad_id, seed=seed, shuffle=False, num_epochs=1, **shard)
        start = eval_loader.get_state()

        def eval_batches():
            eval_loader.set_state(start)
            return eval_loader

    return DataBundle(train=train, eval_batches=eval_batches, tokenizer=tokenizer, pad_id=pad_id,
                      skipped=skipped, reports=reports)


def prefix_shared_lengths(max_length: int, buckets: Sequence[int] = (), *,
                          branches: int = 2) -> tuple[int, ...]:
    """Row lengths for prefix-shared rows (`DataSpec.prefix_sharing`) of `branches` responses:
    multiples of `max_length / 4` from `max_length / 2` to `2 * max_length`, then of
    `max_length / 2` up to `branches * max_length` (each rounded up to 8), plus the given
    `buckets`. A row holds `p + r_1 + ... + r_K <= K * max_length` tokens."""
    def round8(x):
        return -(-x // 8) * 8

    quarter, half = -(-max_length // 4), -(-max_length // 2)
    cap = round8(max(2, branches) * max_length)
    lengths = {round8(k * quarter) for k in range(2, 9)}
    lengths |= {round8(k * half) for k in range(5, 2 * max(2, branches) + 1)}
    return tuple(sorted({min(b, cap) for b in (*lengths, *buckets)} | {cap}))


def data_shares(loader: Any) -> dict[str, Any] | None:
    """How the processes' shares of a training loader were read, counted by example index.

    A collective: every process calls it (it gathers one `[num_examples]` count vector per
    process). Returns None for a loader without `read_indices` (an in-memory prompt set), else
    ``{"num_examples", "per_process": [{"process", "shard", "examples_read",
    "distinct_examples"}], "distinct_examples", "read_by_several_processes"}``: with disjoint
    shares `read_by_several_processes` is 0, and after one epoch `distinct_examples` is
    `num_examples` (the online trainers' prompts are read whole by every process: shard
    ``0/1`` each).
    """
    loader = getattr(loader, "loader", loader)  # a wrapper over the loader (DPO precomputed)
    if not hasattr(loader, "read_indices"):
        return None
    counts = np.bincount(loader.read_indices(), minlength=loader.num_examples).astype(np.int32)
    shard = np.asarray([loader.shard_index, loader.shard_count], np.int32)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts))
        shards = np.asarray(multihost_utils.process_allgather(shard))
    else:
        counts, shards = counts[None], shard[None]
    read = counts > 0
    return {
        "num_examples": int(loader.num_examples),
        "per_process": [
            {"process": i, "shard": f"{shards[i][0]}/{shards[i][1]}",
             "examples_read": int(counts[i].sum()),
             "distinct_examples": int(read[i].sum())}
            for i in range(len(counts))
        ],
        "distinct_examples": int(read.any(axis=0).sum()),
        "read_by_several_processes": int((read.sum(axis=0) > 1).sum()),
    }


__all__ = [
    "DataBundle",
    "TOKENIZATION_FIELDS",
    "TokenizedRecords",
    "build_data",
    "data_shares",
    "prefix_shared_lengths",
    "synthetic_records",
    "tokenization_key",
    "tokenize_records",
    "unpair_preferences",
]
