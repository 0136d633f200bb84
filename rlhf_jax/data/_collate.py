"""Tokenized examples -> fixed-shape NumPy batches: padding, length buckets and packing.

All batch arrays are NumPy; token-level arrays are int32 `[B, T]` (`[B, K, T]` for rankings),
per-example scalars are float32 `[B]`. Every token batch carries:

- `input_ids`: token ids, `pad_id` on padding.
- `attention_mask`: 1 on real tokens, 0 on padding.
- `loss_mask`: 1 on the tokens a loss is taken over (completion / assistant tokens), else 0.
  With the project's log-prob alignment (`logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`)
  the mask applies to per-token log-probs unchanged.
- `positions`: 0, 1, ... over the real tokens of each sequence (restarting in every packed
  segment); 0 on padding.
- `segment_ids`: 0 on padding, 1, 2, ... for the sequences of a row (1 for an unpacked row).

Sequence lengths are rounded up to a configured list of buckets (`length_buckets`), so a jitted
step sees at most `len(length_buckets)` shapes per batch kind.

Packing (`pack_sft`, `pack_preference`) places several sequences in each of `num_rows` rows of
`row_length` tokens by first fit, in stream order. Per-row `segment_ids` keep attention inside a
sequence; `sequence_ids [R, T]` numbers the sequences of the whole batch (0 on padding, 1..S),
so per-sequence sums are recovered with one segment sum::

    sums = jax.ops.segment_sum((logps * loss_mask).ravel(), sequence_ids.ravel(),
                               num_segments=num_segments)

For packed preference batches, pair `i` has its chosen sequence numbered `chosen_index[i]` and
its rejected sequence `rejected_index[i]` (``sums[chosen_index]`` gives the chosen log-prob sums),
and `chosen_last_index[i]` / `rejected_last_index[i]` are flat indices into the `R * T` tokens of
the last real token of each sequence (where a reward model's score is read). `pair_mask [P]` is 0
for padding pairs, whose sums are 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.data._examples import (
    TokenizedKTO,
    TokenizedPreference,
    TokenizedPrompt,
    TokenizedRanking,
    TokenizedSFT,
)

DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TOKEN_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "positions",
    "segment_ids",
)


def bucket_length(length: int, *, length_buckets: Sequence[int] | None) -> int:
    """Smallest bucket `>= length`; `length` itself when `length_buckets` is None.

    Raises:
      ValueError: if `length` exceeds the largest bucket (the row must be truncated first).
    """
    if length_buckets is None:
        return max(int(length), 1)
    buckets = sorted(int(b) for b in length_buckets)
    if not buckets or buckets[0] <= 0:
        raise ValueError(f"length_buckets must be positive integers, got {tuple(length_buckets)}")
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(
        f"sequence length {length} exceeds the largest length bucket {buckets[-1]}; "
        "truncate it (max_prompt_length / max_completion_length) or add a larger bucket"
    )


def _as_ids(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int32).reshape(-1)


def _rows(
    ids: Sequence[np.ndarray], loss: Sequence[np.ndarray], *, length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-pads `ids`/`loss` to `[B, length]` and builds the five token keys."""
    b = len(ids)
    out_ids = np.full((b, length), pad_id, dtype=np.int32)
    out_att = np.zeros((b, length), dtype=np.int32)
    out_loss = np.zeros((b, length), dtype=np.int32)
    out_pos = np.zeros((b, length), dtype=np.int32)
    for i, (seq, lm) in enumerate(zip(ids, loss, strict=True)):
        n = len(seq)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than the batch length {length}")
        out_ids[i, :n] = seq
        out_att[i, :n] = 1
        out_loss[i, :n] = lm
        out_pos[i, :n] = np.arange(n, dtype=np.int32)
    return {
        "input_ids": out_ids,
        "attention_mask": out_att,
        "loss_mask": out_loss,
        "positions": out_pos,
        "segment_ids": out_att.copy(),
    }


def _batch_length(lengths: Sequence[int], length_buckets, length: int | None) -> int:
    longest = max(lengths) if len(lengths) else 1
    if length is not None:
        if longest > length:
            raise ValueError(f"a sequence has {longest} tokens, more than length={length}")
        return int(length)
    return bucket_length(longest, length_buckets=length_buckets)


def _join(prompt_ids: np.ndarray, completion_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([_as_ids(prompt_ids), _as_ids(completion_ids)])
    loss = np.concatenate(
        [np.zeros(len(prompt_ids), np.int32), np.ones(len(completion_ids), np.int32)]
    )
    return ids, loss


def collate_sft(
    examples: Sequence[TokenizedSFT],
    *,
    pad_id: int,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """SFT batch: the five token keys, each `[B, T]` int32, right-padded.

    `T` is `length` when given, else the smallest of `length_buckets` that fits the longest row.
    """
    ids = [_as_ids(e.input_ids) for e in examples]
    loss = [_as_ids(e.loss_mask) for e in examples]
    t = _batch_length([len(x) for x in ids], length_buckets, length)
    return _rows(ids, loss, length=t, pad_id=pad_id)


def collate_preference(
    examples: Sequence[TokenizedPreference],
    *,
    pad_id: int,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    length: int | None = None,
    prefix_sharing: bool = False,
) -> dict[str, np.ndarray]:
    """Pairwise preference batch.

    Returns `chosen_<k>` and `rejected_<k>` for the five token keys, all `[B, T]` with one shared
    `T` (so a trainer may concatenate chosen and rejected along the batch axis), `margin [B]` and
    `label [B]` float32 (probability that chosen is preferred). Loss masks cover the response
    tokens only.

    With `prefix_sharing`, one row per pair instead (see `collate_prefix_shared`).
    """
    if prefix_sharing:
        return collate_prefix_shared(examples, pad_id=pad_id, length_buckets=length_buckets,
                                     length=length)
    chosen = [_join(e.prompt_ids, e.chosen_ids) for e in examples]
    rejected = [_join(e.prompt_ids, e.rejected_ids) for e in examples]
    t = _batch_length([len(c[0]) for c in chosen + rejected], length_buckets, length)
    out: dict[str, np.ndarray] = {}
    for prefix, pairs in (("chosen_", chosen), ("rejected_", rejected)):
        rows = _rows([p[0] for p in pairs], [p[1] for p in pairs], length=t, pad_id=pad_id)
        out.update({prefix + k: v for k, v in rows.items()})
    out["margin"] = np.asarray([e.margin for e in examples], np.float32)
    out["label"] = np.asarray([e.label for e in examples], np.float32)
    return out


def collate_prefix_shared(
    examples: Sequence[TokenizedPreference],
    *,
    pad_id: int,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Prefix-shared pairwise batch: one row per pair, `prompt | chosen | rejected | padding`.

    The prompt is run once instead of twice, so a pair costs `p + c + r` tokens instead of
    `2p + c + r` (prefix sharing, as in Wang 2024, "Accelerating Direct Preference Optimization
    with Prefix Sharing"). Keys, all `[B, T]` int32 with `T` the smallest of `length_buckets`
    that fits `p + c + r` (or `length`):

    - the five token keys of the module docstring, with `positions` `0 .. p-1` on the prompt and
      `p, p+1, ...` again on each response (the positions each token has in its own row), and
      `loss_mask` 1 on both responses;
    - `branch_ids`: 0 on the prompt and on padding, 1 on the chosen and 2 on the rejected
      response. The model lets a token attend to the prompt and to its own branch only
      (`rlhf_jax.models`), so every logit and hidden state equals the one of the unshared row;
      `rlhf_jax.train.logprobs.aligned_token_logps` scores the rejected response's first token
      from the prompt's last logits, and a reward model reads each response's last token;

    plus `margin [B]` and `label [B]` float32 as in `collate_preference`.
    """
    out = _prefix_shared_rows(
        [(e.prompt_ids, (e.chosen_ids, e.rejected_ids)) for e in examples],
        pad_id=pad_id, length_buckets=length_buckets, length=length)
    out["margin"] = np.asarray([e.margin for e in examples], np.float32)
    out["label"] = np.asarray([e.label for e in examples], np.float32)
    return out


def _prefix_shared_rows(
    rows: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]],
    *,
    pad_id: int,
    length_buckets: Sequence[int] | None,
    length: int | None,
) -> dict[str, np.ndarray]:
    """`(prompt, responses)` per row -> the five token keys and `branch_ids`, `[B, T]` int32:
    `prompt | response 1 | response 2 | ... | padding`, response `k` on branch `k`, each
    response's positions continuing from the prompt's length, `loss_mask` 1 on the responses."""
    parts = [(_as_ids(prompt), [_as_ids(r) for r in responses]) for prompt, responses in rows]
    t = _batch_length([len(p) + sum(len(r) for r in rs) for p, rs in parts], length_buckets,
                      length)
    b = len(parts)
    ids = np.full((b, t), pad_id, np.int32)
    att = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    branch = np.zeros((b, t), np.int32)
    for i, (prompt, responses) in enumerate(parts):
        p = len(prompt)
        ids[i, :p] = prompt
        pos[i, :p] = np.arange(p)
        start = p
        for k, response in enumerate(responses, start=1):
            end = start + len(response)
            ids[i, start:end] = response
            pos[i, start:end] = p + np.arange(len(response))
            branch[i, start:end] = k
            start = end
        att[i, :start] = 1
        loss[i, p:start] = 1
    return {
        "input_ids": ids,
        "attention_mask": att,
        "loss_mask": loss,
        "positions": pos,
        "segment_ids": att.copy(),
        "branch_ids": branch,
    }


def collate_ranking(
    examples: Sequence[TokenizedRanking],
    *,
    pad_id: int,
    num_responses: int | None = None,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    length: int | None = None,
    prefix_sharing: bool = False,
) -> dict[str, np.ndarray]:
    """K-way ranking batch: the five token keys `[B, K, T]`, `ranks [B, K]` int32 (0 = best).

    `K` is `num_responses` (or the largest K in the batch). Examples with fewer responses are
    padded with empty responses that have `response_mask [B, K] == 0` and rank -1.

    With `prefix_sharing`, one row per example instead, `prompt | response 1 | ... | response
    K | padding`: the five token keys and `branch_ids` (response `k` on branch `k`) `[B, T]`, as
    in `collate_prefix_shared`, with `T` fitting `p + sum of the response lengths`.
    """
    k_max = max(len(e.response_ids) for e in examples)
    k = k_max if num_responses is None else int(num_responses)
    if k_max > k:
        raise ValueError(f"an example has {k_max} responses, more than num_responses={k}")
    if prefix_sharing:
        empty = np.zeros(0, np.int32)
        out = _prefix_shared_rows(
            [(e.prompt_ids, tuple(e.response_ids) + (empty,) * (k - len(e.response_ids)))
             for e in examples], pad_id=pad_id, length_buckets=length_buckets, length=length)
        out.update(_ranks(examples, k))
        return out
    seqs = [[_join(e.prompt_ids, r) for r in e.response_ids] for e in examples]
    t = _batch_length([len(s[0]) for row in seqs for s in row], length_buckets, length)
    b = len(examples)
    flat_ids, flat_loss = [], []
    for row in seqs:
        padded = row + [(np.zeros(0, np.int32), np.zeros(0, np.int32))] * (k - len(row))
        flat_ids += [p[0] for p in padded]
        flat_loss += [p[1] for p in padded]
    rows = _rows(flat_ids, flat_loss, length=t, pad_id=pad_id)
    out = {key: v.reshape(b, k, t) for key, v in rows.items()}
    out.update(_ranks(examples, k))
    return out


def _ranks(examples: Sequence[TokenizedRanking], k: int) -> dict[str, np.ndarray]:
    ranks = np.full((len(examples), k), -1, np.int32)
    response_mask = np.zeros((len(examples), k), np.int32)
    for i, e in enumerate(examples):
        ranks[i, : len(e.ranks)] = e.ranks
        response_mask[i, : len(e.ranks)] = 1
    return {"ranks": ranks, "response_mask": response_mask}


def collate_kto(
    examples: Sequence[TokenizedKTO],
    *,
    pad_id: int,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    length: int | None = None,
    kl_pairs: bool = True,
) -> dict[str, np.ndarray]:
    """KTO batch: the five token keys `[B, T]` and `label [B]` float32 (1 desirable, 0 not).

    With `kl_pairs`, also `kl_<k>` token keys pairing prompt `i` with the completion of example
    `(i + 1) % B`: TRL's mismatched pairs for the KL reference point estimate.
    """
    b = len(examples)
    main = [_join(e.prompt_ids, e.completion_ids) for e in examples]
    kl = [
        _join(examples[i].prompt_ids, examples[(i + 1) % b].completion_ids) for i in range(b)
    ]
    lengths = [len(m[0]) for m in main] + ([len(m[0]) for m in kl] if kl_pairs else [])
    t = _batch_length(lengths, length_buckets, length)
    out = _rows([m[0] for m in main], [m[1] for m in main], length=t, pad_id=pad_id)
    if kl_pairs:
        rows = _rows([m[0] for m in kl], [m[1] for m in kl], length=t, pad_id=pad_id)
        out.update({"kl_" + k: v for k, v in rows.items()})
    out["label"] = np.asarray([float(e.label) for e in examples], np.float32)
    return out


def collate_prompts(
    examples: Sequence[TokenizedPrompt],
    *,
    pad_id: int,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """RL prompt batch, left-padded for generation.

    Returns `prompt_ids [B, P]` int32 (`pad_id` on the left), `prompt_mask [B, P]`,
    `prompt_positions [B, P]` (`cumsum(prompt_mask) - 1` clipped at 0), `prompt_segment_ids
    [B, P]` (= `prompt_mask`), `prompt_index [B]` int64 (the example's index in its dataset) and
    one `[B]` array per numeric task field present in every example.
    """
    ids = [_as_ids(e.prompt_ids) for e in examples]
    p = _batch_length([len(x) for x in ids], length_buckets, length)
    b = len(ids)
    out_ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, seq in enumerate(ids):
        if len(seq):
            out_ids[i, p - len(seq) :] = seq
            mask[i, p - len(seq) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    out = {
        "prompt_ids": out_ids,
        "prompt_mask": mask,
        "prompt_positions": positions,
        "prompt_segment_ids": mask.copy(),
        "prompt_index": np.asarray([e.index for e in examples], np.int64),
    }
    if examples:
        shared = set(examples[0].fields)
        for e in examples[1:]:
            shared &= set(e.fields)
        for name in sorted(shared):
            values = [e.fields[name] for e in examples]
            if all(isinstance(v, bool | int | float | np.number) for v in values):
                out[name] = np.asarray(values)
    return out


# --------------------------------------------------------------------------------------------
# Packing


def first_fit(
    lengths: Sequence[int], *, num_rows: int, row_length: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Places sequences in stream order into the first row with room, stopping at the first miss.

    Args:
      lengths: sequence lengths `[S]`, in stream order.
      num_rows: rows `R` in the packed batch.
      row_length: tokens `T` per row.

    Returns:
      `(row [n], offset [n], n)`: the row and start offset of each of the first `n` sequences,
      where `n <= S` is the length of the longest prefix that fits.

    Raises:
      ValueError: if a single sequence is longer than `row_length`.
    """
    fill = np.zeros(num_rows, np.int64)
    rows, offsets = [], []
    for i, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(f"sequence {i} has {n} tokens, more than row_length={row_length}")
        room = np.nonzero(fill + n <= row_length)[0]
        if len(room) == 0:
            break
        r = int(room[0])
        rows.append(r)
        offsets.append(int(fill[r]))
        fill[r] += n
    return np.asarray(rows, np.int64), np.asarray(offsets, np.int64), len(rows)


def _place(
    seqs: Sequence[tuple[np.ndarray, np.ndarray]],
    rows: np.ndarray,
    offsets: np.ndarray,
    *,
    num_rows: int,
    row_length: int,
    pad_id: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    out_ids = np.full((num_rows, row_length), pad_id, np.int32)
    loss = np.zeros((num_rows, row_length), np.int32)
    pos = np.zeros((num_rows, row_length), np.int32)
    seg = np.zeros((num_rows, row_length), np.int32)
    seq_ids = np.zeros((num_rows, row_length), np.int32)
    per_row = np.zeros(num_rows, np.int32)
    last = np.zeros(len(seqs), np.int64)
    for s, ((ids, lm), r, o) in enumerate(zip(seqs, rows, offsets, strict=True)):
        n = len(ids)
        per_row[r] += 1
        out_ids[r, o : o + n] = ids
        loss[r, o : o + n] = lm
        pos[r, o : o + n] = np.arange(n, dtype=np.int32)
        seg[r, o : o + n] = per_row[r]
        seq_ids[r, o : o + n] = s + 1
        last[s] = r * row_length + o + max(n - 1, 0)
    out = {
        "input_ids": out_ids,
        "attention_mask": (seg > 0).astype(np.int32),
        "loss_mask": loss,
        "positions": pos,
        "segment_ids": seg,
        "sequence_ids": seq_ids,
    }
    return out, last


def pack_sft(
    examples: Sequence[TokenizedSFT], *, num_rows: int, row_length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Packs SFT examples into `[num_rows, row_length]` rows (first fit, stream order).

    Returns the five token keys plus `sequence_ids [R, T]` (example `i` of `examples` is
    sequence `i + 1`; 0 on padding).

    Raises:
      ValueError: if the examples do not all fit (use `first_fit` to choose how many to take).
    """
    seqs = [(_as_ids(e.input_ids), _as_ids(e.loss_mask)) for e in examples]
    rows, offsets, n = first_fit([len(s[0]) for s in seqs], num_rows=num_rows, row_length=row_length)
    if n < len(seqs):
        raise ValueError(
            f"only {n} of {len(seqs)} sequences fit into {num_rows} rows of {row_length} tokens"
        )
    out, _ = _place(seqs, rows, offsets, num_rows=num_rows, row_length=row_length, pad_id=pad_id)
    return out


def preference_pairs_that_fit(
    examples: Sequence[TokenizedPreference], *, num_rows: int, row_length: int, max_pairs: int
) -> int:
    """Number of leading pairs of `examples` that `pack_preference` can place (at most `max_pairs`)."""
    lengths = []
    for e in examples[:max_pairs]:
        c = len(e.prompt_ids) + len(e.chosen_ids)
        r = len(e.prompt_ids) + len(e.rejected_ids)
        lengths += [c, r]
    _, _, n = first_fit(lengths, num_rows=num_rows, row_length=row_length)
    return n // 2


def pack_preference(
    examples: Sequence[TokenizedPreference],
    *,
    num_rows: int,
    row_length: int,
    max_pairs: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Packs preference pairs for reward-model or DPO training.

    The chosen and rejected sequences of pair `i` are sequences `2i + 1` and `2i + 2`
    (`chosen_index`, `rejected_index`), placed by first fit in the order chosen_0, rejected_0,
    chosen_1, ... Rows carry the five token keys and `sequence_ids`, each `[R, T]`; pairs carry
    `chosen_index`, `rejected_index`, `chosen_last_index`, `rejected_last_index` (int32, flat
    indices into `R * T`), `pair_mask`, `margin`, `label` (float32), each `[max_pairs]`. Segment
    sums need `num_segments = 2 * max_pairs + 1`.

    Raises:
      ValueError: if more than `max_pairs` pairs are given or they do not fit.
    """
    if len(examples) > max_pairs:
        raise ValueError(f"{len(examples)} pairs given, more than max_pairs={max_pairs}")
    seqs = []
    for e in examples:
        seqs.append(_join(e.prompt_ids, e.chosen_ids))
        seqs.append(_join(e.prompt_ids, e.rejected_ids))
    rows, offsets, n = first_fit([len(s[0]) for s in seqs], num_rows=num_rows, row_length=row_length)
    if n < len(seqs):
        raise ValueError(
            f"only {n // 2} of {len(examples)} pairs fit into {num_rows} rows of {row_length} tokens"
        )
    out, last = _place(seqs, rows, offsets, num_rows=num_rows, row_length=row_length, pad_id=pad_id)
    p = len(examples)
    chosen_index = np.zeros(max_pairs, np.int32)
    rejected_index = np.zeros(max_pairs, np.int32)
    chosen_last = np.zeros(max_pairs, np.int32)
    rejected_last = np.zeros(max_pairs, np.int32)
    pair_mask = np.zeros(max_pairs, np.float32)
    margin = np.zeros(max_pairs, np.float32)
    label = np.zeros(max_pairs, np.float32)
    chosen_index[:p] = 2 * np.arange(p) + 1
    rejected_index[:p] = 2 * np.arange(p) + 2
    chosen_last[:p] = last[0::2]
    rejected_last[:p] = last[1::2]
    pair_mask[:p] = 1.0
    margin[:p] = [e.margin for e in examples]
    label[:p] = [e.label for e in examples]
    out.update(
        chosen_index=chosen_index,
        rejected_index=rejected_index,
        chosen_last_index=chosen_last,
        rejected_last_index=rejected_last,
        pair_mask=pair_mask,
        margin=margin,
        label=label,
    )
    return out
