"""Hindsight Instruction Relabeling (`hir_contrastive_loss`, `hir_loss`, `vocab_mean_logps`)
against float64 NumPy references written from the paper's contrastive term and from the released
code's loss (github.com/tianjunz/HIR, `offline_trainer.py`: Hugging Face `LabelSmoother`, the
two-instruction contrastive term, the entropy bonus), hand-worked values, masks, gradients and
extreme inputs."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import rlhf_jax.losses as L

# --------------------------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------------------------


def _np_contrastive(cand, *, positive=None, cmask=None, eps=0.0):
    cand = np.asarray(cand, np.float64)
    b, k = cand.shape
    positive = np.arange(b) if positive is None else np.asarray(positive)
    out = np.zeros(b)
    for i in range(b):
        valid = [j for j in range(k) if j == positive[i] or (cmask is None or cmask[i, j])]
        if cmask is None:
            valid = [positive[i]]
        lse = np.logaddexp.reduce(cand[i, valid])
        log_q = {j: cand[i, j] - lse for j in valid}
        negatives = [j for j in valid if j != positive[i]]
        neg = np.mean([log_q[j] for j in negatives]) if negatives else 0.0
        out[i] = -(1 - eps) * log_q[positive[i]] - eps * neg
    return out


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def _np_hir(logps, mask, cand, *, positive=None, cmask=None, c=1.0, eps=0.0, eps_s=0.0,
            vocab_mean=None, entropy=None, eta=0.0):
    logps, mask = np.asarray(logps, np.float64), np.asarray(mask, bool)
    n = np.maximum(mask.sum(-1), 1)
    sft = -np.where(mask, logps, 0.0).sum(-1) / n
    if eps_s:
        sft = (1 - eps_s) * sft - eps_s * np.where(mask, vocab_mean, 0.0).sum(-1) / n
    con = _np_contrastive(cand, positive=positive, cmask=cmask, eps=eps)
    ent = np.zeros_like(sft) if entropy is None else np.where(mask, entropy, 0.0).sum(-1) / n
    return {"loss": sft + c * con - eta * ent, "sft": sft, "contrastive": con, "entropy": ent}


def _reference_code_loss(logits_pos, logits_neg, labels, *, epsilon=0.2, entropy_coeff=0.001):
    """One step of the released `offline_trainer.py` (batch of one, no padding), float64:
    `LabelSmoother(epsilon)` on the relabelled input's logits, the two-instruction contrastive
    term on mean token cross-entropies with its `+ 1e-8`, and `- 0.001 * entropy.mean()`."""
    lp_pos, lp_neg = _np_log_softmax(logits_pos), _np_log_softmax(logits_neg)
    v = lp_pos.shape[-1]
    nll = -np.take_along_axis(lp_pos, labels[..., None], -1)[..., 0]
    smoothed = -lp_pos.sum(-1)
    smoother = (1 - epsilon) * nll.mean() + epsilon * smoothed.sum() / (nll.size * v)
    nll_neg = -np.take_along_axis(lp_neg, labels[..., None], -1)[..., 0]
    pos_prob, neg_prob = np.exp(-nll.mean(-1)), np.exp(-nll_neg.mean(-1))
    pos_log_prob = -np.log(pos_prob / (pos_prob + neg_prob) + 1e-8)
    neg_log_prob = -np.log(neg_prob / (pos_prob + neg_prob) + 1e-8)
    entropy = -(np.exp(lp_pos) * lp_pos).sum(-1).mean()
    return float(smoother + (1 - epsilon) * pos_log_prob + epsilon * neg_log_prob
                 - entropy_coeff * entropy)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _f32(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


def _cands(seed, b=5, k=None):
    rng = np.random.default_rng(seed)
    k = b if k is None else k
    cand = rng.normal(-20.0, 4.0, (b, k))
    cmask = rng.uniform(size=(b, k)) > 0.3
    return cand, cmask


def _tokens(seed, b=5, t=6):
    rng = np.random.default_rng(seed)
    logps = -np.abs(rng.normal(1.5, 1.0, (b, t)))
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, b)[:, None]
    vocab_mean = logps - np.abs(rng.normal(3.0, 0.5, (b, t)))
    entropy = np.abs(rng.normal(2.0, 0.5, (b, t)))
    return logps, mask, vocab_mean, entropy


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


class TestHIRContrastive(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.0, False), (0.2, False), (0.0, True), (0.3, True))
    def test_in_batch_matches_float64_reference(self, eps, masked):
        cand, cmask = _cands(0)
        cmask = cmask if masked else np.ones_like(cmask)
        got = self.variant(lambda c, m: L.hir_contrastive_loss(c, candidate_mask=m,
                                                              label_smoothing=eps))(
            *_f32(cand), jnp.asarray(cmask))
        want = _np_contrastive(cand, cmask=cmask, eps=eps)
        assert got.shape == (5,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_explicit_alternatives_match_float64_reference(self):
        cand, cmask = _cands(1, b=6, k=3)
        positive = np.array([0, 2, 1, 0, 1, 2])
        got = self.variant(lambda c, p, m: L.hir_contrastive_loss(
            c, positive_index=p, candidate_mask=m, label_smoothing=0.1))(
            *_f32(cand), jnp.asarray(positive), jnp.asarray(cmask))
        want = _np_contrastive(cand, positive=positive, cmask=cmask, eps=0.1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    def test_hand_worked(self):
        # mean log-probs -1 (own instruction) and -2 (other): q = sigma(1) = 0.7310586,
        # loss = log(1 + e^-1) = 0.3132617; eps 0.2: 0.8 * 0.3132617 + 0.2 * 1.3132617
        cand = jnp.array([[-1.0, -2.0]])
        got = L.hir_contrastive_loss(cand, positive_index=jnp.zeros(1, jnp.int32),
                                     candidate_mask=jnp.ones((1, 2)))
        assert float(got[0]) == pytest.approx(0.3132617, abs=1e-6)
        got = L.hir_contrastive_loss(cand, positive_index=jnp.zeros(1, jnp.int32),
                                     candidate_mask=jnp.ones((1, 2)), label_smoothing=0.2)
        assert float(got[0]) == pytest.approx(0.5132617, abs=1e-6)
        # three equal candidates: log 3; no candidate mask: only the positive, loss 0
        got = L.hir_contrastive_loss(jnp.full((3, 3), -5.0), candidate_mask=jnp.ones((3, 3)))
        np.testing.assert_allclose(got, np.full(3, math.log(3.0)), atol=1e-6)
        np.testing.assert_array_equal(L.hir_contrastive_loss(jnp.full((3, 3), -5.0),
                                                             label_smoothing=0.2), 0.0)

    def test_matches_the_reference_code_contrastive_term(self):
        rng = np.random.default_rng(2)
        pos_mean, neg_mean = rng.normal(-2.0, 1.0, 4), rng.normal(-2.5, 1.0, 4)
        pos_prob, neg_prob = np.exp(pos_mean), np.exp(neg_mean)
        want = (0.8 * -np.log(pos_prob / (pos_prob + neg_prob) + 1e-8)
                + 0.2 * -np.log(neg_prob / (pos_prob + neg_prob) + 1e-8))
        got = L.hir_contrastive_loss(jnp.asarray(np.stack([pos_mean, neg_mean], -1), jnp.float32),
                                     positive_index=jnp.zeros(4, jnp.int32),
                                     candidate_mask=jnp.ones((4, 2)), label_smoothing=0.2)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)

    def test_masked_candidates_equal_sliced_and_get_zero_gradient(self):
        cand, cmask = _cands(3)
        cand_nan = np.where(cmask | np.eye(5, dtype=bool), cand, np.nan)

        def per_row(c):
            return L.hir_contrastive_loss(c, candidate_mask=jnp.asarray(cmask), label_smoothing=0.2)

        got = per_row(*_f32(cand_nan))
        for i in range(5):
            keep = [j for j in range(5) if cmask[i, j] or j == i]
            row = L.hir_contrastive_loss(
                jnp.asarray(cand[i:i + 1, keep], jnp.float32),
                positive_index=jnp.asarray([keep.index(i)]),
                candidate_mask=jnp.ones((1, len(keep))), label_smoothing=0.2)
            np.testing.assert_allclose(got[i], row[0], rtol=1e-6, atol=1e-6)
        jac = np.asarray(jax.jit(jax.jacrev(per_row))(*_f32(cand_nan)))  # [B, B(rows), K]
        valid = cmask | np.eye(5, dtype=bool)
        assert np.all(np.isfinite(jac))
        for i in range(5):
            np.testing.assert_array_equal(jac[i][~valid], 0.0)
            other_rows = np.ones(5, bool)
            other_rows[i] = False
            np.testing.assert_array_equal(jac[i][other_rows], 0.0)  # rows are independent

    def test_gradient_raises_the_positive_and_lowers_the_negatives(self):
        cand, _ = _cands(4)
        g = np.asarray(jax.jit(jax.grad(lambda c: jnp.sum(L.hir_contrastive_loss(
            c, candidate_mask=jnp.ones((5, 5))))))(*_f32(cand)))
        assert np.all(np.diag(g) < 0) and np.all(g[~np.eye(5, dtype=bool)] > 0)

    def test_check_grads(self):
        cand, cmask = _cands(5, b=4)
        check_grads(jax.jit(lambda c: jnp.sum(L.hir_contrastive_loss(
            c, candidate_mask=jnp.asarray(cmask), label_smoothing=0.2))), _f32(cand), order=1,
            modes=["rev"], atol=5e-2, rtol=5e-2)

    def test_extreme_inputs(self):
        cand = np.array([[-1e4, -1e-4, -5e3], [-1e-4, -1e4, -1e4], [0.0, -1e4, 0.0],
                         [-1e4, -1e4, -1e4]], np.float32)
        pos = np.array([0, 0, 2, 1])
        cmask = np.ones((4, 3), bool)
        got = L.hir_contrastive_loss(*_f32(cand), positive_index=jnp.asarray(pos),
                                     candidate_mask=jnp.asarray(cmask), label_smoothing=0.1)
        want = _np_contrastive(cand, positive=pos, cmask=cmask, eps=0.1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
        for fn in (lambda c: c, jax.jit):
            g = fn(jax.grad(lambda c: jnp.sum(L.hir_contrastive_loss(
                c, positive_index=jnp.asarray(pos), candidate_mask=jnp.asarray(cmask),
                label_smoothing=0.1))))(*_f32(cand))
            assert np.all(np.isfinite(np.asarray(g)))

    def test_errors(self):
        with pytest.raises(ValueError, match="must be square"):
            L.hir_contrastive_loss(jnp.zeros((3, 2)))
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\)"):
            L.hir_contrastive_loss(jnp.zeros((2, 2)), label_smoothing=1.0)
        with pytest.raises(ValueError, match="positive_index must lie in \\[0, 2\\)"):
            L.hir_contrastive_loss(jnp.zeros((2, 2)), positive_index=jnp.array([0, 2]))
        with pytest.raises(ValueError, match="positive_index must be integer"):
            L.hir_contrastive_loss(jnp.zeros((2, 2)), positive_index=jnp.array([0.0, 1.0]))
        with pytest.raises(ValueError, match="positive_index must have shape \\(2,\\)"):
            L.hir_contrastive_loss(jnp.zeros((2, 2)), positive_index=jnp.array([0]))
        with pytest.raises(AssertionError, match="candidate_mask=\\(2, 3\\)"):
            L.hir_contrastive_loss(jnp.zeros((2, 2)), candidate_mask=jnp.ones((2, 3)))
        with pytest.raises(AssertionError, match="`candidate_logps` must have rank 2"):
            L.hir_contrastive_loss(jnp.zeros(2))


class TestHIRLoss(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        dict(c=1.0, eps=0.0, eps_s=0.0, eta=0.0),
        dict(c=0.5, eps=0.2, eps_s=0.2, eta=0.001),
        dict(c=0.0, eps=0.0, eps_s=0.1, eta=0.3),
    )
    def test_matches_float64_reference(self, c, eps, eps_s, eta):
        logps, mask, vocab_mean, entropy = _tokens(0)
        cand, cmask = _cands(0)
        vm = vocab_mean if eps_s else None
        ent = entropy if eta else None

        def fn(logps, mask, cand, cmask, vm, ent):
            return L.hir_loss(logps, mask, cand, candidate_mask=cmask, contrastive_coeff=c,
                              label_smoothing=eps, sft_label_smoothing=eps_s, vocab_mean_logps=vm,
                              token_entropy=ent, entropy_coeff=eta)

        got = self.variant(fn)(*_f32(logps), jnp.asarray(mask), *_f32(cand),
                               jnp.asarray(cmask), *_f32(vm, ent))
        want = _np_hir(logps, mask, cand, cmask=cmask, c=c, eps=eps, eps_s=eps_s,
                       vocab_mean=vocab_mean, entropy=entropy if eta else None, eta=eta)
        for field in ("loss", "sft", "contrastive", "entropy"):
            value = getattr(got, field)
            assert value.shape == (5,) and value.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(value), want[field], rtol=2e-5, atol=2e-6,
                                       err_msg=field)

    def test_matches_the_reference_code_per_example(self):
        # Per example: the released code's loss on a batch of one (no padding), composed from
        # logits with token_logps, vocab_mean_logps and entropy_from_logits.
        rng = np.random.default_rng(1)
        b, t, v = 3, 5, 11
        logits_pos = rng.normal(0.0, 2.0, (b, t, v))
        logits_neg = logits_pos + rng.normal(0.0, 1.0, (b, t, v))
        labels = rng.integers(0, v, (b, t))
        want = [_reference_code_loss(logits_pos[i], logits_neg[i], labels[i]) for i in range(b)]

        @jax.jit
        def ours(logits_pos, logits_neg, labels):
            mask = jnp.ones(labels.shape)
            tok = L.token_logps(logits_pos, labels)
            tok_neg = L.token_logps(logits_neg, labels)
            cand = jnp.stack([L.sequence_logps(tok, mask, average=True),
                              L.sequence_logps(tok_neg, mask, average=True)], axis=-1)
            return L.hir_loss(tok, mask, cand, positive_index=jnp.zeros(b, jnp.int32),
                              candidate_mask=jnp.ones((b, 2)), label_smoothing=0.2,
                              sft_label_smoothing=0.2,
                              vocab_mean_logps=L.vocab_mean_logps(logits_pos),
                              token_entropy=L.entropy_from_logits(logits_pos),
                              entropy_coeff=0.001).loss

        got = ours(*_f32(logits_pos, logits_neg), jnp.asarray(labels))
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6)

    def test_hand_worked(self):
        # tokens -1, -3 (third padded): sft = 2; candidates [[-1, -2], [-2, -1]] in batch,
        # contrastive = log(1 + e^-1) per row; entropy [1, 3] -> 2, eta 0.5: loss = 2 + 0.3133 - 1
        logps = jnp.array([[-1.0, -3.0, -7.0]] * 2)
        mask = jnp.array([[1.0, 1.0, 0.0]] * 2)
        cand = jnp.array([[-1.0, -2.0], [-2.0, -1.0]])
        got = L.hir_loss(logps, mask, cand, candidate_mask=jnp.ones((2, 2)),
                         token_entropy=jnp.array([[1.0, 3.0, 9.0]] * 2), entropy_coeff=0.5)
        np.testing.assert_allclose(got.sft, [2.0, 2.0])
        np.testing.assert_allclose(got.contrastive, [0.3132617] * 2, atol=1e-6)
        np.testing.assert_allclose(got.entropy, [2.0, 2.0])
        np.testing.assert_allclose(got.loss, [2.0 + 0.3132617 - 1.0] * 2, atol=1e-6)
        # label smoothing of the SFT term, eps 0.25, vocab means [-4, -6]: 0.75 * 2 + 0.25 * 5
        got = L.hir_loss(logps, mask, cand, sft_label_smoothing=0.25,
                         vocab_mean_logps=jnp.array([[-4.0, -6.0, -1.0]] * 2))
        np.testing.assert_allclose(got.sft, [2.75, 2.75])

    def test_vocab_mean_logps(self):
        rng = np.random.default_rng(3)
        logits = rng.normal(0.0, 3.0, (2, 4, 9))
        got = jax.jit(L.vocab_mean_logps)(jnp.asarray(logits, jnp.bfloat16))
        want = _np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)).mean(-1)
        assert got.shape == (2, 4) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        # uniform logits: log(1/V)
        np.testing.assert_allclose(L.vocab_mean_logps(jnp.zeros((3, 9))), np.full(3, -math.log(9)),
                                   rtol=1e-6)
        with pytest.raises(AssertionError, match="`logits` must have rank"):
            L.vocab_mean_logps(jnp.zeros(3))

    def test_masked_equals_sliced_and_padding_gets_zero_gradient(self):
        logps, mask, vocab_mean, entropy = _tokens(4)
        cand, cmask = _cands(4)
        nan = lambda x: np.where(mask, x, np.nan)  # noqa: E731
        kwargs = dict(candidate_mask=jnp.asarray(cmask), label_smoothing=0.1,
                      sft_label_smoothing=0.2, entropy_coeff=0.05)

        def fn(logps, vm, ent):
            return L.hir_loss(logps, jnp.asarray(mask), jnp.asarray(cand, jnp.float32),
                              vocab_mean_logps=vm, token_entropy=ent, **kwargs)

        got = fn(*_f32(nan(logps), nan(vocab_mean), nan(entropy)))
        for b in range(5):
            n = int(mask[b].sum())
            row = L.hir_loss(*_f32(logps[b:b + 1, :n]), jnp.ones((1, n)), *_f32(cand[b:b + 1]),
                             positive_index=jnp.array([b]), candidate_mask=jnp.asarray(cmask[b:b + 1]),
                             label_smoothing=0.1, sft_label_smoothing=0.2,
                             vocab_mean_logps=jnp.asarray(vocab_mean[b:b + 1, :n], jnp.float32),
                             token_entropy=jnp.asarray(entropy[b:b + 1, :n], jnp.float32),
                             entropy_coeff=0.05)
            for field in ("loss", "sft", "contrastive", "entropy"):
                np.testing.assert_allclose(getattr(got, field)[b], getattr(row, field)[0],
                                           rtol=1e-6, atol=1e-6, err_msg=field)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).loss), argnums=(0, 1, 2)))(
            *_f32(nan(logps), nan(vocab_mean), nan(entropy)))
        for g in grads:
            g = np.asarray(g)
            assert np.all(np.isfinite(g))
            np.testing.assert_array_equal(g[~mask], 0.0)
            assert np.all(g[mask] != 0.0)

    def test_fully_masked_row_and_check_grads(self):
        logps, mask, vocab_mean, entropy = _tokens(5, b=4, t=4)
        cand, cmask = _cands(5, b=4)
        mask[0] = False
        m, cm = jnp.asarray(mask), jnp.asarray(cmask)

        def total(logps, cand, vm, ent):
            return jnp.sum(L.hir_loss(logps, m, cand, candidate_mask=cm, label_smoothing=0.2,
                                      sft_label_smoothing=0.2, vocab_mean_logps=vm,
                                      token_entropy=ent, entropy_coeff=0.1).loss)

        args = _f32(logps, cand, vocab_mean, entropy)
        value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3)))(*args)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        np.testing.assert_array_equal(np.asarray(grads[0])[0], 0.0)
        check_grads(jax.jit(total), args, order=1, modes=["rev"], atol=5e-2, rtol=5e-2)

    def test_errors(self):
        z, m, c = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 2))
        for kwargs, match in [
            (dict(contrastive_coeff=-1.0), "contrastive_coeff must be >= 0.0"),
            (dict(entropy_coeff=-0.1), "entropy_coeff must be"),
            (dict(sft_label_smoothing=1.0), r"sft_label_smoothing must be in \[0.0, 1.0\)"),
            (dict(sft_label_smoothing=0.1), "needs vocab_mean_logps"),
            (dict(vocab_mean_logps=z), "only used with sft_label_smoothing > 0"),
            (dict(entropy_coeff=0.1), "needs token_entropy"),
            (dict(label_smoothing=-0.1), "label_smoothing must be"),
        ]:
            with pytest.raises(ValueError, match=match):
                L.hir_loss(z, m, c, **kwargs)
        with pytest.raises(ValueError, match="one row per example \\(2\\)"):
            L.hir_loss(z, m, jnp.zeros((3, 3)))
        with pytest.raises(AssertionError, match="token_entropy=\\(2, 4\\)"):
            L.hir_loss(z, m, c, token_entropy=jnp.zeros((2, 4)))
        with pytest.raises(AssertionError, match="`token_logps` must have rank 2"):
            L.hir_loss(jnp.zeros(2), jnp.ones(2), c)
