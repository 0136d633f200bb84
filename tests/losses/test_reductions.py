"""Masked reductions and aggregate_loss against float64 NumPy, on one device and across 8."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from rlhf_jax.losses import (
    AGGREGATION_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

VARIANTS = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["nojit", "jit"])
N_DEV = 8


# ----------------------------------------------------------------- float64 NumPy references
def np_masked_sum(x, m, axis=None):
    return np.where(m > 0, np.asarray(x, np.float64), 0.0).sum(axis=axis)


def np_masked_mean(x, m, axis=None):
    return np_masked_sum(x, m, axis) / np.maximum(np.asarray(m, np.float64).sum(axis=axis), 1.0)


def np_masked_var(x, m, unbiased=True):
    x = np.asarray(x, np.float64)
    sel = x[np.asarray(m) > 0]
    n = sel.size
    if n == 0:
        return 0.0
    var = ((sel - sel.mean()) ** 2).mean()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def np_masked_whiten(x, m, shift_mean=True):
    x = np.asarray(x, np.float64)
    sel = x[np.asarray(m) > 0]
    mu = sel.mean()
    var = sel.var(ddof=1)  # Bessel-corrected, as lm-human-preferences / TRL
    w = (x - mu) / np.sqrt(var + 1e-8)
    if not shift_mean:
        w = w + mu
    return np.where(np.asarray(m) > 0, w, 0.0)


def np_aggregate(loss, m, mode, max_len=None):
    loss = np.where(m > 0, np.asarray(loss, np.float64), 0.0)
    m = np.asarray(m, np.float64)
    b, t = loss.shape
    if mode == "grpo":
        return np.mean(loss.sum(-1) / np.maximum(m.sum(-1), 1.0))
    if mode in ("bnpo", "dapo"):
        return loss.sum() / max(m.sum(), 1.0)
    assert mode == "dr_grpo"
    return loss.sum() / (b * (t if max_len is None else max_len))


def _data(seed, b=4, t=6, full_row=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t)).astype(np.float32)
    lengths = rng.integers(1, t + 1, size=b)
    if full_row:
        lengths[-1] = 0
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return x, mask, lengths


class TestMaskedSum:
    @VARIANTS
    @pytest.mark.parametrize("axis", [None, 0, -1, (0, 1)])
    def test_matches_numpy(self, variant, axis):
        x, m, _ = _data(0)
        out = variant(functools.partial(masked_sum, axis=axis))(x, m)
        np.testing.assert_allclose(out, np_masked_sum(x, m, axis), rtol=1e-5, atol=1e-6)

    def test_hand_worked(self):
        # 1 + 3 = 4 (entry 2.0 and the NaN are masked out).
        x = jnp.array([1.0, 2.0, 3.0, jnp.nan])
        np.testing.assert_allclose(masked_sum(x, jnp.array([1, 0, 1, 0], bool)), 4.0)

    def test_padding_zero_grad_and_nan_safe(self):
        x, m, _ = _data(1)
        x = np.where(m > 0, x, np.nan).astype(np.float32)
        out = masked_sum(x, m)
        g = jax.grad(lambda v: masked_sum(v, m))(jnp.asarray(x))
        assert np.isfinite(out)
        np.testing.assert_array_equal(np.asarray(g), m)

    def test_check_grads(self):
        x, m, _ = _data(2, b=2, t=3)
        check_grads(lambda v: masked_sum(v, m, axis=-1), (jnp.asarray(x),), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_mismatched_shapes(self):
        with pytest.raises(AssertionError, match="mask"):
            masked_sum(jnp.ones((2, 3)), jnp.ones((3, 2)))


class TestMaskedMean:
    @VARIANTS
    @pytest.mark.parametrize("axis", [None, 0, -1])
    def test_matches_numpy(self, variant, axis):
        x, m, _ = _data(3)
        out = variant(functools.partial(masked_mean, axis=axis))(x, m)
        np.testing.assert_allclose(out, np_masked_mean(x, m, axis), rtol=1e-5, atol=1e-6)

    def test_hand_worked(self):
        # Row 0: (1 + 3) / 2 = 2; row 1 fully masked -> 0; over all: 4 / 2 = 2.
        x = jnp.array([[1.0, 3.0, 100.0], [7.0, 8.0, 9.0]])
        m = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        np.testing.assert_allclose(masked_mean(x, m, axis=-1), [2.0, 0.0])
        np.testing.assert_allclose(masked_mean(x, m), 2.0)

    def test_masked_equals_sliced(self):
        x, m, lengths = _data(4)
        out = masked_mean(np.where(m > 0, x, np.inf), m, axis=-1)
        for b, n in enumerate(lengths):
            expected = masked_mean(x[b, :n], np.ones(n)) if n else 0.0
            np.testing.assert_allclose(out[b], expected, rtol=1e-6)

    def test_padding_zero_grad_full_row(self):
        x, m, _ = _data(5)
        g = jax.grad(lambda v: masked_mean(v, m, axis=-1).sum())(jnp.asarray(x))
        assert np.all(np.isfinite(g))
        assert np.all(np.asarray(g)[m == 0] == 0.0)
        np.testing.assert_allclose(g, m / np.maximum(m.sum(-1, keepdims=True), 1), rtol=1e-6)

    @pytest.mark.parametrize("big", [1e4, -1e4])
    def test_extreme_finite(self, big):
        x, m, _ = _data(6)
        x = np.full_like(x, big)
        out = masked_mean(x, m, axis=-1)
        g = jax.grad(lambda v: masked_mean(v, m).sum())(jnp.asarray(x))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))

    def test_check_grads(self):
        x, m, _ = _data(7, b=2, t=3, full_row=False)
        check_grads(lambda v: masked_mean(v, m, axis=-1), (jnp.asarray(x),), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_mismatched_shapes(self):
        with pytest.raises(AssertionError, match="mask"):
            masked_mean(jnp.ones((2, 3)), jnp.ones((2, 4)))


class TestMaskedVar:
    @VARIANTS
    @pytest.mark.parametrize("unbiased", [True, False])
    def test_matches_numpy(self, variant, unbiased):
        x, m, _ = _data(8)
        out = variant(functools.partial(masked_var, unbiased=unbiased))(x, m)
        np.testing.assert_allclose(out, np_masked_var(x, m, unbiased), rtol=1e-5)

    def test_hand_worked(self):
        # Entries 1, 2, 3 (4th padded): mean 2, biased var 2/3, unbiased (Bessel) var 1.
        x = jnp.array([1.0, 2.0, 3.0, 50.0])
        m = jnp.array([1.0, 1.0, 1.0, 0.0])
        np.testing.assert_allclose(masked_var(x, m), 1.0, rtol=1e-6)
        np.testing.assert_allclose(masked_var(x, m, unbiased=False), 2.0 / 3.0, rtol=1e-6)

    def test_single_and_no_entries_finite(self):
        # n = 1: correction factor 1 -> variance 0; n = 0: 0.
        x = jnp.array([4.0, 5.0])
        np.testing.assert_allclose(masked_var(x, jnp.array([1.0, 0.0])), 0.0)
        np.testing.assert_allclose(masked_var(x, jnp.array([0.0, 0.0])), 0.0)
        g = jax.grad(lambda v: masked_var(v, jnp.zeros(2)))(x)
        np.testing.assert_array_equal(g, [0.0, 0.0])

    def test_padding_zero_grad(self):
        x, m, _ = _data(9)
        g = jax.grad(lambda v: masked_var(v, m))(jnp.asarray(x))
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[m == 0] == 0.0)

    def test_check_grads(self):
        x, m, _ = _data(10, b=2, t=3, full_row=False)
        check_grads(lambda v: masked_var(v, m), (jnp.asarray(x),), order=1, modes=["rev"],
                    eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_mismatched_shapes(self):
        with pytest.raises(AssertionError, match="mask"):
            masked_var(jnp.ones((2, 3)), jnp.ones((2,)))


class TestMaskedWhiten:
    @VARIANTS
    @pytest.mark.parametrize("shift_mean", [True, False])
    def test_matches_numpy(self, variant, shift_mean):
        x, m, _ = _data(11)
        x = 3.0 * x + 1.5
        out = variant(functools.partial(masked_whiten, shift_mean=shift_mean))(x, m)
        np.testing.assert_allclose(out, np_masked_whiten(x, m, shift_mean), rtol=1e-5,
                                   atol=1e-5)

    def test_hand_worked(self):
        # Entries 1, 2, 3: mean 2, unbiased var 1 -> [-1, 0, 1] (up to 1e-8 in the sqrt);
        # padded output is 0. shift_mean=False adds the mean back: [1, 2, 3].
        x = jnp.array([1.0, 2.0, 3.0, 9.0])
        m = jnp.array([1.0, 1.0, 1.0, 0.0])
        np.testing.assert_allclose(masked_whiten(x, m), [-1.0, 0.0, 1.0, 0.0], atol=1e-6)
        np.testing.assert_allclose(masked_whiten(x, m, shift_mean=False), [1.0, 2.0, 3.0, 0.0],
                                   atol=1e-6)

    def test_unbiased_statistics(self):
        # Output has zero mean and unit *unbiased* variance over the real entries.
        x, m, _ = _data(12)
        w = np.asarray(masked_whiten(x, m), np.float64)[m > 0]
        np.testing.assert_allclose(w.mean(), 0.0, atol=1e-6)
        np.testing.assert_allclose(w.var(ddof=1), 1.0, rtol=1e-5)

    def test_masked_equals_sliced(self):
        x, m, _ = _data(13)
        out = masked_whiten(np.where(m > 0, x, np.nan), m)
        sliced = masked_whiten(x[m > 0], np.ones(int(m.sum())))
        np.testing.assert_allclose(np.asarray(out)[m > 0], sliced, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(out)[m == 0] == 0.0)

    def test_padding_zero_grad(self):
        x, m, _ = _data(14)
        w = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
        g = jax.grad(lambda v: jnp.sum(w * masked_whiten(v, m)))(jnp.asarray(x))
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[m == 0] == 0.0)

    def test_constant_and_empty_finite(self):
        x = jnp.full((2, 3), 1e4)
        for m in (jnp.ones((2, 3)), jnp.zeros((2, 3))):
            out = masked_whiten(x, m)
            g = jax.grad(lambda v, m=m: masked_whiten(v, m).sum())(x)
            assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))

    def test_check_grads(self):
        x, m, _ = _data(15, b=2, t=3, full_row=False)
        check_grads(lambda v: masked_whiten(v, m), (jnp.asarray(x),), order=1, modes=["rev"],
                    eps=1e-2, atol=2e-2, rtol=2e-2)

    def test_mismatched_shapes(self):
        with pytest.raises(AssertionError, match="mask"):
            masked_whiten(jnp.ones((2, 3)), jnp.ones((2, 2)))


class TestAggregateLoss:
    @VARIANTS
    @pytest.mark.parametrize("mode", AGGREGATION_MODES)
    def test_matches_numpy(self, variant, mode):
        x, m, _ = _data(16)
        out = variant(functools.partial(aggregate_loss, mode=mode))(x, m)
        assert out.shape == () and out.dtype == jnp.float32
        np.testing.assert_allclose(out, np_aggregate(x, m, mode), rtol=1e-5, atol=1e-6)

    def test_dr_grpo_max_completion_length(self):
        x, m, _ = _data(17)
        out = aggregate_loss(x, m, mode="dr_grpo", max_completion_length=10)
        np.testing.assert_allclose(out, np_aggregate(x, m, "dr_grpo", 10), rtol=1e-5)

    def test_hand_worked(self):
        # rows [1, 3 | pad] and [2 | pad, pad]; B = 2, T = 3.
        # grpo: (4/2 + 2/1) / 2 = 2; bnpo/dapo: 6 / 3 = 2; dr_grpo: 6 / (2 * 3) = 1,
        # dr_grpo with L_max = 4: 6 / 8 = 0.75.
        x = jnp.array([[1.0, 3.0, 50.0], [2.0, 50.0, 50.0]])
        m = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        np.testing.assert_allclose(aggregate_loss(x, m, mode="grpo"), 2.0)
        np.testing.assert_allclose(aggregate_loss(x, m, mode="bnpo"), 2.0)
        np.testing.assert_allclose(aggregate_loss(x, m, mode="dapo"), 2.0)
        np.testing.assert_allclose(aggregate_loss(x, m, mode="dr_grpo"), 1.0)
        np.testing.assert_allclose(
            aggregate_loss(x, m, mode="dr_grpo", max_completion_length=4), 0.75)
        # grpo differs from the token mean when lengths differ: rows [1, 3] and [5 | pad]
        # -> grpo (2 + 5) / 2 = 3.5, token mean 9 / 3 = 3.
        x2 = jnp.array([[1.0, 3.0], [5.0, 0.0]])
        m2 = jnp.array([[1.0, 1.0], [1.0, 0.0]])
        np.testing.assert_allclose(aggregate_loss(x2, m2, mode="grpo"), 3.5)
        np.testing.assert_allclose(aggregate_loss(x2, m2, mode="dapo"), 3.0)

    @pytest.mark.parametrize("mode", AGGREGATION_MODES)
    def test_masked_equals_sliced(self, mode):
        x, m, lengths = _data(18, full_row=False)
        out = aggregate_loss(np.where(m > 0, x, np.nan), m, mode=mode)
        rows = [x[b, :n].astype(np.float64) for b, n in enumerate(lengths)]
        if mode == "grpo":
            expected = np.mean([r.mean() for r in rows])
        elif mode in ("bnpo", "dapo"):
            expected = np.concatenate(rows).mean()
        else:
            expected = np.concatenate(rows).sum() / x.size
        np.testing.assert_allclose(out, expected, rtol=1e-5)

    @pytest.mark.parametrize("mode", AGGREGATION_MODES)
    def test_padding_zero_grad_and_full_row(self, mode):
        x, m, _ = _data(19)
        x = np.where(m > 0, x, 1e4).astype(np.float32)
        g = jax.grad(lambda v: aggregate_loss(v, m, mode=mode))(jnp.asarray(x))
        assert np.isfinite(aggregate_loss(x, m, mode=mode))
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[m == 0] == 0.0)

    @pytest.mark.parametrize("mode", AGGREGATION_MODES)
    def test_all_masked(self, mode):
        x, _, _ = _data(20)
        m = np.zeros_like(x)
        out, g = jax.value_and_grad(lambda v: aggregate_loss(v, m, mode=mode))(jnp.asarray(x))
        assert out == 0.0 and np.all(np.asarray(g) == 0.0)

    @pytest.mark.parametrize("mode", AGGREGATION_MODES)
    def test_check_grads(self, mode):
        x, m, _ = _data(21, b=2, t=3, full_row=False)
        check_grads(lambda v: aggregate_loss(v, m, mode=mode), (jnp.asarray(x),), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match="mode='sum'.*grpo"):
            aggregate_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), mode="sum")

    def test_bad_rank(self):
        with pytest.raises(AssertionError, match="per_token_loss"):
            aggregate_loss(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)), mode="grpo")

    def test_mismatched_shapes(self):
        with pytest.raises(AssertionError, match="mask"):
            aggregate_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), mode="grpo")

    def test_bad_max_completion_length(self):
        with pytest.raises(ValueError, match="max_completion_length"):
            aggregate_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), mode="dr_grpo",
                           max_completion_length=0)


# ------------------------------------------------------------------------- across 8 devices
def _global_data(seed):
    """[8 * 2, 5] batch with ragged lengths, some fully masked rows."""
    x, m, _ = _data(seed, b=N_DEV * 2, t=5, full_row=False)
    m[3] = 0.0
    m[10] = 0.0
    return x, m


def _pmap(fn, x, m):
    xs, ms = x.reshape(N_DEV, -1, x.shape[-1]), m.reshape(N_DEV, -1, m.shape[-1])
    out = jax.pmap(fn, axis_name="data")(xs, ms)
    return np.asarray(out)


def _shard_map(fn, x, m, per_device_scalar):
    mesh = jax.make_mesh((N_DEV,), ("data",))
    if per_device_scalar:
        def body(a, b):
            return fn(a, b)[None]
    else:
        body = fn
    mapped = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")),
                                   out_specs=P("data")))
    return np.asarray(mapped(*_shard(mesh, x, m)))


def _shard(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in arrays]


CROSS_FNS = {
    **{f"aggregate_{mode}": (functools.partial(aggregate_loss, mode=mode), True)
       for mode in AGGREGATION_MODES},
    "masked_mean": (masked_mean, True),
    "masked_sum": (masked_sum, True),
    "masked_var": (masked_var, True),
    "masked_whiten_no_shift": (functools.partial(masked_whiten, shift_mean=False), False),
    "masked_whiten": (masked_whiten, False),
}


class TestCrossDevice:
    @pytest.mark.parametrize("name", sorted(CROSS_FNS))
    def test_pmap_and_shard_map_equal_single_device(self, name):
        fn, scalar = CROSS_FNS[name]
        x, m = _global_data(30)
        single = np.asarray(fn(x, m))
        with_axis = functools.partial(fn, axis_name="data")
        pm = _pmap(with_axis, x, m)
        sm = _shard_map(with_axis, x, m, scalar)
        if scalar:
            np.testing.assert_allclose(pm, np.full(N_DEV, single), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sm, np.full(N_DEV, single), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(pm.reshape(x.shape), single, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sm, single, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("mode", AGGREGATION_MODES)
    def test_gradient_is_own_term_of_global_loss(self, mode):
        x, m = _global_data(31)
        g_single = jax.grad(lambda v: aggregate_loss(v, m, mode=mode))(jnp.asarray(x))
        xs, ms = x.reshape(N_DEV, -1, 5), m.reshape(N_DEV, -1, 5)
        g_pmap = jax.pmap(
            jax.grad(lambda v, mm: aggregate_loss(v, mm, mode=mode, axis_name="data")),
            axis_name="data")(xs, ms)
        np.testing.assert_allclose(np.asarray(g_pmap).reshape(x.shape), g_single, rtol=1e-5,
                                   atol=1e-7)
        mesh = jax.make_mesh((N_DEV,), ("data",))
        g_sm = jax.jit(jax.shard_map(
            jax.grad(lambda v, mm: aggregate_loss(v, mm, mode=mode, axis_name="data")),
            mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))(*_shard(mesh, x, m))
        np.testing.assert_allclose(np.asarray(g_sm), g_single, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- non-finite padding, hypothesis
NONFINITE_FNS = {
    "masked_sum": lambda x, m: masked_sum(x, m),
    "masked_mean": lambda x, m: masked_mean(x, m, axis=-1).sum(),
    "masked_var": lambda x, m: masked_var(x, m),
    "masked_var_biased": lambda x, m: masked_var(x, m, unbiased=False),
    "masked_whiten": lambda x, m: jnp.sum(jnp.arange(x.size).reshape(x.shape) * masked_whiten(x, m)),
    **{f"aggregate_{mode}": functools.partial(aggregate_loss, mode=mode)
       for mode in AGGREGATION_MODES},
}


class TestNonFinitePadding:
    @pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
    @pytest.mark.parametrize("name", sorted(NONFINITE_FNS))
    def test_value_and_grad_ignore_padding(self, name, fill):
        fn = NONFINITE_FNS[name]
        x, m, _ = _data(40)
        clean = np.where(m > 0, x, 0.0).astype(np.float32)
        dirty = np.where(m > 0, x, fill).astype(np.float32)
        v_clean, g_clean = jax.value_and_grad(fn)(jnp.asarray(clean), m)
        v_dirty, g_dirty = jax.value_and_grad(fn)(jnp.asarray(dirty), m.astype(bool))
        np.testing.assert_allclose(v_dirty, v_clean, rtol=1e-6)
        np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6)
        assert np.all(np.asarray(g_dirty)[m == 0] == 0.0)


@st.composite
def _ragged(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    scale = draw(st.sampled_from([1.0, 1e4, -1e4]))
    seed = draw(st.integers(0, 2**16))
    x = (scale * (1.0 + np.random.default_rng(seed).random((b, t)))).astype(np.float32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    return x, mask


class TestHypothesis:
    @settings(max_examples=15)
    @given(_ragged())
    def test_all_reductions_finite(self, data):
        x, m = data
        for name, fn in NONFINITE_FNS.items():
            v, g = jax.value_and_grad(fn)(jnp.asarray(x), m)
            assert np.isfinite(v), name
            assert np.all(np.isfinite(g)), name
            assert np.all(np.asarray(g)[m == 0] == 0.0), name
        for mode in AGGREGATION_MODES:
            np.testing.assert_allclose(aggregate_loss(x, m, mode=mode), np_aggregate(x, m, mode),
                                       rtol=1e-5, atol=1e-6)
