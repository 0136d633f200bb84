"""Preference pairs in one forward pass: the rows a pairwise batch runs on, whatever its layout,
and the per-pair sums read back from them. Used by the DPO family (`dpo.py`) and the reward
models (`rm.py`).

Three layouts of a pairwise batch (docs/ARCHITECTURE.md, "Batches"):

- padded: `chosen_<k>` and `rejected_<k>` `[P, T]`, concatenated along the batch axis into one
  `[2P, T]` forward (rows `:P` chosen, `P:` rejected);
- packed (`rlhf_jax.data.pack_preference`): `[R, T]` rows holding several sequences, with
  `sequence_ids` and the per-pair `chosen_index` / `rejected_index` / `pair_mask`;
- prefix-shared (`rlhf_jax.data.collate_prefix_shared`): one `[P, T]` row per pair, `prompt |
  chosen | rejected`, with `branch_ids` 1 on the chosen and 2 on the rejected response.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from rlhf_jax.losses import masked_sum

_TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")


def is_packed_pairs(batch: Mapping[str, jax.Array]) -> bool:
    """True for a packed preference batch (`rlhf_jax.data.pack_preference` layout)."""
    return "chosen_index" in batch


def is_prefix_shared_pairs(batch: Mapping[str, jax.Array]) -> bool:
    """True for a prefix-shared preference batch (one row per pair: prompt, chosen, rejected;
    `rlhf_jax.data.collate_preference(prefix_sharing=True)`); a prefix-shared ranking batch
    (with `ranks`) is not one."""
    return "branch_ids" in batch and "ranks" not in batch


def pair_forward_batch(batch: Mapping[str, jax.Array], prefixes=("chosen_", "rejected_")
                       ) -> dict[str, jax.Array]:
    """The rows one forward pass runs on for a pairwise batch.

    Padded layout: `chosen_<k>` and `rejected_<k>` `[B, T]` concatenated along the batch axis
    into `<k>` `[2B, T]` (rows `:B` chosen, `B:` rejected), so chosen and rejected share one
    forward pass. Packed layout: the rows as they are (`[R, T]`, plus `sequence_ids`).
    Prefix-shared layout: the `[P, T]` rows as they are (plus `branch_ids`).
    """
    if is_prefix_shared_pairs(batch):
        return {k: batch[k] for k in (*_TOKEN_KEYS, "branch_ids")}
    if is_packed_pairs(batch):
        return {k: batch[k] for k in (*_TOKEN_KEYS, "sequence_ids") if k in batch}
    return {k: jnp.concatenate([batch[p + k] for p in prefixes], axis=0)
            for k in _TOKEN_KEYS if prefixes[0] + k in batch}


def pair_sequence_sums(
    values: jax.Array, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
    *, average: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(chosen [P], rejected [P], chosen_lengths [P], rejected_lengths [P])`.

    Sums (or, with `average`, means) of per-token `values [N, T]` (aligned log-probs) over the
    `loss_mask` tokens of each chosen / rejected sequence, for either layout of
    `pair_forward_batch` (`rows` is its output). Lengths are the loss-token counts.
    """
    mask = rows["loss_mask"].astype(jnp.float32)
    if is_prefix_shared_pairs(batch):
        branch = rows["branch_ids"]
        c_mask, r_mask = mask * (branch == 1), mask * (branch == 2)
        c_sum, r_sum = masked_sum(values, c_mask, axis=-1), masked_sum(values, r_mask, axis=-1)
        c_len, r_len = jnp.sum(c_mask, axis=-1), jnp.sum(r_mask, axis=-1)
    elif is_packed_pairs(batch):
        num = 2 * batch["chosen_index"].shape[0] + 1
        ids = rows["sequence_ids"].reshape(-1)
        masked = jnp.where(mask > 0, values, 0.0).reshape(-1)
        sums = jax.ops.segment_sum(masked, ids, num_segments=num)
        counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=num)
        c_sum, r_sum = sums[batch["chosen_index"]], sums[batch["rejected_index"]]
        c_len, r_len = counts[batch["chosen_index"]], counts[batch["rejected_index"]]
    else:
        per_row = masked_sum(values, mask, axis=-1)
        counts = jnp.sum(mask, axis=-1)
        c_sum, r_sum = jnp.split(per_row, 2)
        c_len, r_len = jnp.split(counts, 2)
    if average:
        c_sum = c_sum / jnp.maximum(c_len, 1.0)
        r_sum = r_sum / jnp.maximum(r_len, 1.0)
    return c_sum, r_sum, c_len, r_len


def pair_token_segments(
    values: jax.Array, rows: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(chosen [P, N], rejected [P, N], chosen_mask [P, N], rejected_mask [P, N])`: per-token
    `values [R, T]` (aligned log-probs) of each pair's chosen and rejected completion, in token
    order, for a per-token loss (`rlhf_jax.losses.cpl_loss`) on either layout of
    `pair_forward_batch` (`rows` is its output). The masks are 1 on the `loss_mask` tokens.

    Padded: rows `:P` and `P:` (`N = T`). Prefix-shared: each pair's row twice, masked to its
    `branch_ids` 1 / 2 (`N = T`). Packed: the flattened rows (`N = R*T`), masked to the pair's
    `chosen_index` / `rejected_index` sequence; a sequence is contiguous in its row, so token
    order is kept.
    """
    mask = rows["loss_mask"].astype(jnp.float32)
    if is_prefix_shared_pairs(batch):
        branch = rows["branch_ids"]
        return values, values, mask * (branch == 1), mask * (branch == 2)
    if is_packed_pairs(batch):
        ids = rows["sequence_ids"].reshape(1, -1)
        flat_mask = mask.reshape(1, -1)
        flat = jnp.broadcast_to(values.reshape(1, -1), (batch["chosen_index"].shape[0],
                                                         ids.shape[1]))
        c_mask = flat_mask * (ids == batch["chosen_index"][:, None])
        r_mask = flat_mask * (ids == batch["rejected_index"][:, None])
        return flat, flat, c_mask, r_mask
    c, r = jnp.split(values, 2)
    c_mask, r_mask = jnp.split(mask, 2)
    return c, r, c_mask, r_mask


def pair_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[P]` float weights of the pairs: `pair_mask` of a packed batch, else ones."""
    if is_packed_pairs(batch):
        return batch["pair_mask"].astype(jnp.float32)
    if is_prefix_shared_pairs(batch):
        return jnp.ones(batch["input_ids"].shape[:1], jnp.float32)
    return jnp.ones(batch["chosen_input_ids"].shape[:1], jnp.float32)


__all__ = [
    "is_packed_pairs",
    "is_prefix_shared_pairs",
    "pair_forward_batch",
    "pair_sequence_sums",
    "pair_token_segments",
    "pair_weights",
]
