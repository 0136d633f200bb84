"""Hindsight Instruction Relabeling (HIR): supervised learning on instructions relabelled to match
the outputs, a contrastive term over instructions, and optional entropy regularisation."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses._checks import (
    as_mask,
    check_rank,
    check_same_shape,
    check_value,
    f32,
    is_static_zero,
)


class HIRLoss(NamedTuple):
    """HIR's terms per example, all ``[B]`` float32.

    Attributes:
      loss: ``sft + contrastive_coeff * contrastive - entropy_coeff * entropy``.
      sft: (label-smoothed) mean token negative log-likelihood of the output under its
        relabelled instruction.
      contrastive: :func:`hir_contrastive_loss`.
      entropy: mean token entropy over the output (0 when no ``token_entropy`` is given).
    """

    loss: chex.Array
    sft: chex.Array
    contrastive: chex.Array
    entropy: chex.Array


def vocab_mean_logps(logits: chex.Array) -> chex.Array:
    r"""Mean over the vocabulary of ``log_softmax(logits)``, the label-smoothing term.

    .. math:: \bar\ell_{bt} = \frac{1}{V}\sum_v \log\mathrm{softmax}(z_{bt})_v
              = \frac{1}{V}\sum_v z_{btv} - \log\sum_v e^{z_{btv}}

    :math:`-\bar\ell` is the cross-entropy to the uniform distribution, the ``smoothed_loss``
    of Hugging Face's ``LabelSmoother`` per token. Pass it to :func:`hir_loss` with
    ``sft_label_smoothing``. Logits of ``-inf`` (masked vocabulary entries) give ``-inf``.

    Args:
      logits: ``[..., V]`` (``[B, T, V]`` typically), aligned as the token log-probs are.

    Returns:
      ``[...]`` float32.
    """
    check_rank("logits", logits, {2, 3})
    z = f32(logits)
    return jnp.mean(z, axis=-1) - jax.nn.logsumexp(z, axis=-1)


def _check_candidates(candidate_logps, positive_index, candidate_mask) -> None:
    check_rank("candidate_logps", candidate_logps, 2)
    b, k = candidate_logps.shape
    check_same_shape(candidate_logps=candidate_logps, candidate_mask=candidate_mask)
    if positive_index is None:
        if b != k:
            raise ValueError(
                "candidate_logps must be square [B, B] (output i under instruction j, the positive "
                f"on the diagonal) when positive_index is not given, got {candidate_logps.shape}"
            )
    else:
        check_rank("positive_index", positive_index, 1)
        if jnp.shape(positive_index)[0] != b:
            raise ValueError(
                f"positive_index must have shape ({b},), got {jnp.shape(positive_index)}"
            )
        if not jnp.issubdtype(jnp.asarray(positive_index).dtype, jnp.integer):
            raise ValueError(
                f"positive_index must be integer, got {jnp.asarray(positive_index).dtype}"
            )
        try:  # values are checked when known at trace time
            values = np.asarray(positive_index)
        except jax.errors.TracerArrayConversionError:
            return
        if values.size and (values.min() < 0 or values.max() >= k):
            raise ValueError(
                f"positive_index must lie in [0, {k}) (candidate_logps has {k} columns), got "
                f"values in [{values.min()}, {values.max()}]"
            )


def hir_contrastive_loss(
    candidate_logps: chex.Array,
    *,
    positive_index: chex.Array | None = None,
    candidate_mask: chex.Array | None = None,
    label_smoothing: float = 0.0,
) -> chex.Array:
    r"""HIR's contrastive term: each output's likelihood under its own relabelled instruction
    against its likelihood under the other instructions (Zhang et al. 2023).

    With :math:`P_{ij}` = ``candidate_logps[i, j]`` the log-prob of output :math:`o_i` (for its
    query :math:`q_i`) under candidate instruction :math:`p_j`, :math:`j^*_i` its own relabelled
    instruction (``positive_index``, by default the diagonal), :math:`\mathcal{C}_i` the
    candidates that enter the softmax (``candidate_mask``; the positive always does) and
    :math:`\mathcal{N}_i = \mathcal{C}_i \setminus \{j^*_i\}`:

    .. math::
        \log q_{ij} = P_{ij} - \log\sum_{j' \in \mathcal{C}_i} e^{P_{ij'}},\qquad
        \mathcal{L}_i = -(1 - \varepsilon)\log q_{ij^*_i}
            - \frac{\varepsilon}{|\mathcal{N}_i|}\sum_{j \in \mathcal{N}_i}\log q_{ij}

    i.e. the cross-entropy of the softmax over instructions to a target that puts
    :math:`1 - \varepsilon` on the positive and spreads :math:`\varepsilon` (``label_smoothing``)
    over the negatives. A row with no negative gives 0.

    Two layouts are covered:

    * **In batch** (the paper's contrastive term): ``candidate_logps`` is ``[B, B]``, row ``i`` the
      output of example ``i`` scored under every example's relabelled instruction, the
      positive on the diagonal (``positive_index=None``). Mask out (``candidate_mask = 0``)
      columns whose instruction equals row ``i``'s own (frequent when relabelled instructions
      are a handful of templates: a duplicate positive among the negatives puts a floor of
      :math:`\log 2` under the loss) and padding examples.
    * **Explicit alternatives** (the released code, github.com/tianjunz/HIR,
      ``offline_trainer.py``): ``[B, K]`` with the relabelled instruction and ``K - 1``
      alternative relabellings (the code uses ``K = 2``: the other outcome's instruction,
      positive first, ``positive_index = zeros``). The code scores outputs by their mean token
      log-prob (``sequence_logps(..., average=True)``), uses :math:`\varepsilon = 0.2`, and adds
      ``1e-8`` inside the log, which is left out here (the log-softmax is exact).

    Sums or means of token log-probs are the caller's choice; the paper writes the sequence
    log-likelihood, the code the length-normalised one.

    Args:
      candidate_logps: ``[B, K]`` sequence log-probs :math:`P_{ij}` (``[B, B]`` in batch).
      positive_index: optional ``[B]`` int, the column of each row's positive; default the
        diagonal (needs ``K == B``).
      candidate_mask: optional ``[B, K]``, 1 on candidates that enter the softmax (float or
        bool); the positive is always included.
      label_smoothing: :math:`\varepsilon \in [0, 1)`.

    Returns:
      ``[B]`` float32; masked candidates get exactly zero gradient. Reduce with ``jnp.mean``
      (or ``masked_mean`` over real examples).

    References:
      Zhang, Liu, Wong, Abbeel, Gonzalez 2023, "The Wisdom of Hindsight Makes Language Models
      Better Instruction Followers" (ICML 2023); github.com/tianjunz/HIR.
    """
    check_value("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    _check_candidates(candidate_logps, positive_index, candidate_mask)
    b, k = candidate_logps.shape
    if positive_index is None:
        positive = jnp.eye(b, k, dtype=bool)
    else:
        positive = jnp.arange(k)[None, :] == jnp.asarray(positive_index)[:, None]
    valid = positive if candidate_mask is None else (as_mask(candidate_mask) > 0) | positive
    z = jnp.where(valid, f32(candidate_logps), -jnp.inf)
    log_q = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    log_q = jnp.where(valid, log_q, 0.0)
    pos = jnp.sum(jnp.where(positive, log_q, 0.0), axis=-1)
    loss = -pos
    if not is_static_zero(label_smoothing):
        negative = valid & ~positive
        n_neg = jnp.sum(negative, axis=-1).astype(jnp.float32)
        neg_mean = jnp.sum(jnp.where(negative, log_q, 0.0), axis=-1) / jnp.maximum(n_neg, 1.0)
        # A row without negatives is 0 whatever the smoothing (its positive has log q = 0).
        loss = -(1.0 - label_smoothing) * pos - label_smoothing * neg_mean
    return loss


def hir_loss(
    token_logps: chex.Array,
    mask: chex.Array,
    candidate_logps: chex.Array,
    *,
    positive_index: chex.Array | None = None,
    candidate_mask: chex.Array | None = None,
    contrastive_coeff: float = 1.0,
    label_smoothing: float = 0.0,
    sft_label_smoothing: float = 0.0,
    vocab_mean_logps: chex.Array | None = None,
    token_entropy: chex.Array | None = None,
    entropy_coeff: float = 0.0,
) -> HIRLoss:
    r"""HIR's offline objective per example (Zhang et al. 2023).

    HIR samples outputs :math:`o` for queries :math:`q` under instructions :math:`p`, relabels
    each instruction in hindsight to :math:`p^*` so that it matches the outcome, and trains on
    the relabelled triples. Per example, with :math:`m` the output mask, :math:`\ell_t` =
    ``token_logps`` (the output's log-probs under :math:`(p^*, q)`), :math:`\bar\ell_t` =
    ``vocab_mean_logps`` and :math:`H_t` = ``token_entropy`` at the output positions:

    .. math::
        \mathcal{L}_{\mathrm{sft}} = \frac{\sum_t m_t\,[-(1-\varepsilon_s)\ell_t
            - \varepsilon_s\bar\ell_t]}{\max(\sum_t m_t, 1)},\qquad
        \mathcal{H} = \frac{\sum_t m_t H_t}{\max(\sum_t m_t, 1)}

        \mathcal{L} = \mathcal{L}_{\mathrm{sft}} + c\,\mathcal{L}_{\mathrm{contrastive}}
            - \eta\,\mathcal{H}

    with :math:`\mathcal{L}_{\mathrm{contrastive}}` = :func:`hir_contrastive_loss`,
    :math:`c` = ``contrastive_coeff``, :math:`\eta` = ``entropy_coeff`` and
    :math:`\varepsilon_s` = ``sft_label_smoothing`` (Hugging Face ``LabelSmoother``'s
    :math:`(1-\varepsilon)\,\mathrm{NLL} + \varepsilon\cdot\mathrm{CE}(\mathrm{uniform})`).

    Each term is a per-example token mean, which is what the released code computes (it trains
    on one example at a time). Its settings are :math:`c = 1`, :math:`\varepsilon_s =
    \varepsilon = 0.2` and :math:`\eta = 0.001` (the entropy over the output positions of the
    relabelled input); the defaults here are the plain objective (no smoothing, no entropy
    term), the entropy regularisation being an option as in the paper. The code's optional
    KL to the initial model is not part of HIR's loss; add ``kl_from_logits`` yourself.

    Args:
      token_logps: ``[B, T]`` log-probs of the output tokens under the relabelled instruction.
      mask: ``[B, T]`` 1 on output tokens (float or bool).
      candidate_logps: ``[B, K]``, see :func:`hir_contrastive_loss`.
      positive_index, candidate_mask, label_smoothing: see :func:`hir_contrastive_loss`.
      contrastive_coeff: :math:`c \ge 0`.
      sft_label_smoothing: :math:`\varepsilon_s \in [0, 1)`; needs ``vocab_mean_logps``.
      vocab_mean_logps: ``[B, T]`` :func:`vocab_mean_logps` of the same logits.
      token_entropy: ``[B, T]`` per-token entropy (``entropy_from_logits``); logged in
        ``entropy`` even when ``entropy_coeff`` is 0.
      entropy_coeff: :math:`\eta \ge 0`; needs ``token_entropy`` when positive.

    Returns:
      :class:`HIRLoss` of ``[B]`` float32 arrays; reduce with ``jnp.mean`` (or ``masked_mean``
      over real examples). Padded positions get exactly zero gradient.

    References:
      Zhang, Liu, Wong, Abbeel, Gonzalez 2023, "The Wisdom of Hindsight Makes Language Models
      Better Instruction Followers" (ICML 2023); github.com/tianjunz/HIR.
    """
    check_value("contrastive_coeff", contrastive_coeff, low=0.0)
    check_value("sft_label_smoothing", sft_label_smoothing, low=0.0, high=1.0, high_open=True)
    check_value("entropy_coeff", entropy_coeff, low=0.0)
    smoothing = not is_static_zero(sft_label_smoothing)
    if smoothing and vocab_mean_logps is None:
        raise ValueError("sft_label_smoothing > 0 needs vocab_mean_logps (see vocab_mean_logps())")
    if not smoothing and vocab_mean_logps is not None:
        raise ValueError("vocab_mean_logps is only used with sft_label_smoothing > 0")
    if not is_static_zero(entropy_coeff) and token_entropy is None:
        raise ValueError("entropy_coeff > 0 needs token_entropy (see entropy_from_logits())")
    check_rank("token_logps", token_logps, 2)
    check_same_shape(token_logps=token_logps, mask=mask, vocab_mean_logps=vocab_mean_logps,
                     token_entropy=token_entropy)
    if candidate_logps.shape[0] != token_logps.shape[0]:
        raise ValueError(
            f"candidate_logps must have one row per example ({token_logps.shape[0]}), got "
            f"{candidate_logps.shape}"
        )
    m = as_mask(mask)
    n = jnp.maximum(jnp.sum(m, axis=-1), 1.0)

    def token_mean(x):
        return jnp.sum(jnp.where(m > 0, f32(x), 0.0) * m, axis=-1) / n

    sft = -token_mean(token_logps)
    if smoothing:
        sft = (1.0 - sft_label_smoothing) * sft - sft_label_smoothing * token_mean(vocab_mean_logps)
    contrastive = hir_contrastive_loss(candidate_logps, positive_index=positive_index,
                                       candidate_mask=candidate_mask,
                                       label_smoothing=label_smoothing)
    entropy = jnp.zeros_like(sft) if token_entropy is None else token_mean(token_entropy)
    loss = sft + contrastive_coeff * contrastive
    if not is_static_zero(entropy_coeff):
        loss = loss - entropy_coeff * entropy
    return HIRLoss(loss=loss, sft=sft, contrastive=contrastive, entropy=entropy)
