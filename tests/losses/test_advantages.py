"""Advantage estimators (GAE, GRPO groups, RLOO, KL-shaped rewards) vs float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import (
    GROUP_SCALES,
    gae,
    group_advantages,
    kl_penalized_rewards,
    last_token_index,
    rloo_advantages,
)

VARIANTS = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["nojit", "jit"])


def make_mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------------- gae
def py_gae(rewards, values, lengths, gamma, lam):
    """Plain reverse loop in float64 over the real tokens of each right-padded row."""
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        n = int(lengths[i])
        last = 0.0
        for j in reversed(range(n)):
            next_v = float(values[i, j + 1]) if j + 1 < n else 0.0
            delta = float(rewards[i, j]) + gamma * next_v - float(values[i, j])
            last = delta + gamma * lam * last
            adv[i, j] = last
    ret = np.where(np.arange(t)[None, :] < np.asarray(lengths)[:, None], adv + values, 0.0)
    return adv, ret


@VARIANTS
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_python_loop(variant, gamma, lam):
    rng = np.random.default_rng(0)
    lengths = np.array([6, 4, 1, 0, 3])
    t = 6
    m = make_mask(lengths, t)
    rewards = rng.normal(size=(5, t)).astype(np.float32)
    values = rng.normal(size=(5, t)).astype(np.float32)
    # Garbage on padding must not leak into real positions.
    rewards_pad = np.where(m > 0, rewards, 1e6).astype(np.float32)
    values_pad = np.where(m > 0, values, -1e6).astype(np.float32)
    out = variant(lambda r, v, mm: gae(r, v, mm, gamma=gamma, lam=lam))(rewards_pad, values_pad, m)
    want_adv, want_ret = py_gae(np.float64(rewards), np.float64(values), lengths, gamma, lam)
    np.testing.assert_allclose(out.advantages, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.returns, want_ret, rtol=1e-5, atol=1e-5)
    # returns = advantages + values on real tokens, 0 on padding.
    np.testing.assert_allclose(out.returns, (np.asarray(out.advantages) + values) * m, atol=1e-5)
    assert np.all(np.asarray(out.advantages)[m == 0] == 0.0)
    assert out.advantages.dtype == jnp.float32


def test_gae_hand_worked_three_tokens():
    # r = (0, 0, 1), V = (0.5, 0.4, 0.2), gamma = 0.9, lam = 0.8 (gamma*lam = 0.72):
    # d2 = 1 + 0.9*0 - 0.2 = 0.8;   A2 = 0.8
    # d1 = 0 + 0.9*0.2 - 0.4 = -0.22; A1 = -0.22 + 0.72*0.8 = 0.356
    # d0 = 0 + 0.9*0.4 - 0.5 = -0.14; A0 = -0.14 + 0.72*0.356 = 0.11632
    out = gae(jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.4, 0.2]]), jnp.ones((1, 3)),
              gamma=0.9, lam=0.8)
    np.testing.assert_allclose(out.advantages, [[0.11632, 0.356, 0.8]], rtol=1e-5)
    np.testing.assert_allclose(out.returns, [[0.61632, 0.756, 1.0]], rtol=1e-5)


def test_gae_masked_equals_sliced_and_no_gradient():
    rng = np.random.default_rng(1)
    lengths = [4, 2]
    m = make_mask(lengths, 4)
    r = rng.normal(size=(2, 4)).astype(np.float32)
    v = rng.normal(size=(2, 4)).astype(np.float32)
    full = gae(r, v, m, gamma=0.95, lam=0.9)
    for b, n in enumerate(lengths):
        row = gae(r[b:b + 1, :n], v[b:b + 1, :n], np.ones((1, n)), gamma=0.95, lam=0.9)
        np.testing.assert_allclose(full.advantages[b, :n], row.advantages[0], rtol=1e-6)
        np.testing.assert_allclose(full.returns[b, :n], row.returns[0], rtol=1e-6)
    g = jax.grad(lambda x, y: gae(x, y, m).advantages.sum(), argnums=(0, 1))(r, v)
    assert all(np.all(np.asarray(x) == 0.0) for x in g)


def test_gae_bad_input():
    with pytest.raises(AssertionError, match="values"):
        gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)))
    with pytest.raises(AssertionError, match="rewards"):
        gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(3))


# ------------------------------------------------------------------------ group_advantages
def np_group(rewards, k, scale, eps=1e-4):
    g = np.asarray(rewards, np.float64).reshape(-1, k)
    c = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        c = c / (g.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        c = c / (g.reshape(-1).std(ddof=1) + eps)
    return c.reshape(-1)


@VARIANTS
@pytest.mark.parametrize("scale", GROUP_SCALES)
def test_group_advantages_matches_numpy(variant, scale):
    rng = np.random.default_rng(2)
    r = rng.normal(size=12).astype(np.float32) * 3.0
    got = variant(lambda x: group_advantages(x, group_size=4, scale=scale))(r)
    assert got.shape == (12,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_group(r, 4, scale), rtol=1e-5, atol=1e-6)


def test_group_advantages_hand_worked_ddof1():
    # Group (1, 2, 3): mean 2, unbiased std 1 (biased std would be sqrt(2/3)): (-1, 0, 1)/(1+eps).
    # Group (0, 0, 6): mean 2, unbiased std sqrt(12) = 3.4641: (-2, -2, 4)/3.4641.
    r = jnp.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    got = group_advantages(r, group_size=3, eps=0.0)
    s = np.sqrt(12.0)
    np.testing.assert_allclose(got, [-1.0, 0.0, 1.0, -2 / s, -2 / s, 4 / s], rtol=1e-6)
    np.testing.assert_allclose(
        group_advantages(r, group_size=3, scale="none"), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]
    )
    # Batch std over all six, ddof = 1: values (1,2,3,0,0,6), mean 2, ss = 1+0+1+4+4+16 = 26.
    np.testing.assert_allclose(
        group_advantages(r, group_size=3, scale="batch", eps=0.0),
        np.array([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]) / np.sqrt(26.0 / 5.0), rtol=1e-6,
    )


def test_group_advantages_constant_group_is_zero_and_finite():
    r = jnp.array([5.0, 5.0, 5.0, 1.0, 2.0, 3.0])
    got = np.asarray(group_advantages(r, group_size=3))
    assert np.all(np.isfinite(got)) and np.all(got[:3] == 0.0)
    # group_size=1: every centred value is 0, std defined as 0, no NaN.
    got1 = np.asarray(group_advantages(r, group_size=1))
    assert np.all(got1 == 0.0)
    big = np.asarray(group_advantages(jnp.array([1e30, -1e30, 0.0, 1.0]), group_size=2))
    assert np.all(np.isfinite(big))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(jnp.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale='std'.*'group', 'batch', 'none'"):
        group_advantages(jnp.zeros(6), group_size=3, scale="std")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(6), group_size=0)
    with pytest.raises(AssertionError, match="rewards"):
        group_advantages(jnp.zeros((2, 3)), group_size=3)


# ------------------------------------------------------------------------- rloo_advantages
def np_rloo(rewards, k, normalize=False, eps=1e-4):
    g = np.asarray(rewards, np.float64).reshape(-1, k)
    out = np.empty_like(g)
    for i in range(g.shape[0]):
        for j in range(k):
            others = [g[i, q] for q in range(k) if q != j]
            out[i, j] = g[i, j] - sum(others) / len(others)
    out = out.reshape(-1)
    if normalize:
        out = (out - out.mean()) / (out.std(ddof=1) + eps)
    return out


@VARIANTS
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_matches_numpy(variant, normalize):
    rng = np.random.default_rng(3)
    r = rng.normal(size=12).astype(np.float32)
    got = variant(lambda x: rloo_advantages(x, group_size=3, normalize=normalize))(r)
    np.testing.assert_allclose(got, np_rloo(r, 3, normalize), rtol=1e-5, atol=1e-6)


def test_rloo_hand_worked_group_of_three():
    # (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> (-3, -1.5, 4.5)
    # = k/(k-1) (r - mean) = 1.5 * (-2, -1, 3).
    got = rloo_advantages(jnp.array([1.0, 2.0, 6.0]), group_size=3)
    np.testing.assert_allclose(got, [-3.0, -1.5, 4.5], rtol=1e-6)


def test_rloo_bad_input():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(jnp.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="group_size=3"):
        rloo_advantages(jnp.zeros(4), group_size=3)


# ------------------------------------------------------------------- kl_penalized_rewards
@VARIANTS
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_matches_numpy(variant, estimator):
    rng = np.random.default_rng(4)
    lengths = np.array([5, 2, 0, 1])
    m = make_mask(lengths, 5)
    lp = np.where(m > 0, rng.uniform(-3, 0, (4, 5)), 50.0).astype(np.float32)
    ref = np.where(m > 0, rng.uniform(-3, 0, (4, 5)), -50.0).astype(np.float32)
    scores = rng.normal(size=4).astype(np.float32)
    out = variant(lambda *x: kl_penalized_rewards(*x, kl_coef=0.1, estimator=estimator))(
        scores, lp, ref, m
    )
    d = np.where(m > 0, np.float64(ref) - np.float64(lp), 0.0)  # log(pi_ref / pi)
    kl = {"k1": -d, "k2": 0.5 * d**2, "k3": np.expm1(d) - d}[estimator] * m
    want = -0.1 * kl
    for b, n in enumerate(lengths):
        if n > 0:
            want[b, n - 1] += scores[b]
    np.testing.assert_allclose(out.kl, kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.rewards, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out.rewards)[2] == 0.0)  # empty row: no score, no KL


def test_kl_penalized_rewards_hand_worked():
    # lp = (-1, -2, pad), ref = (-1.5, -1, pad), score 3, beta 0.5.
    # k1 = lp - ref = (0.5, -1); rewards = (-0.25, 0.5 + 3) = (-0.25, 3.5).
    # k3 with d = ref - lp = (-0.5, 1): e^d - 1 - d = (0.1065307, 0.7182818).
    lp = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0, 0.0]])
    m = jnp.array([[1.0, 1.0, 0.0]])
    out = kl_penalized_rewards(jnp.array([3.0]), lp, ref, m, kl_coef=0.5)
    np.testing.assert_allclose(out.rewards, [[-0.25, 3.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(out.kl, [[0.5, -1.0, 0.0]], rtol=1e-6)
    out3 = kl_penalized_rewards(jnp.array([3.0]), lp, ref, m, kl_coef=0.5, estimator="k3")
    k3 = np.array([np.exp(-0.5) - 1 + 0.5, np.e - 2.0])
    np.testing.assert_allclose(out3.rewards, [[-0.5 * k3[0], 3.0 - 0.5 * k3[1], 0.0]], rtol=1e-5)


def test_kl_penalized_rewards_traced_coef_and_no_gradient():
    lp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    m = jnp.ones((1, 2))
    f = jax.jit(lambda c: kl_penalized_rewards(jnp.array([1.0]), lp, ref, m, kl_coef=c).rewards)
    np.testing.assert_allclose(f(jnp.float32(0.2)), [[-0.1, 1.2]], rtol=1e-6)
    g = jax.grad(lambda x: kl_penalized_rewards(jnp.array([1.0]), x, ref, m, kl_coef=0.2)
                 .rewards.sum())(lp)
    assert np.all(np.asarray(g) == 0.0)


def test_kl_penalized_rewards_bad_input():
    x = jnp.zeros((2, 3))
    m = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="estimator='k4'.*'k1', 'k2', 'k3'"):
        kl_penalized_rewards(jnp.zeros(2), x, x, m, kl_coef=0.1, estimator="k4")
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(jnp.zeros(3), x, x, m, kl_coef=0.1)
    with pytest.raises(AssertionError, match="ref_logps"):
        kl_penalized_rewards(jnp.zeros(2), x, jnp.zeros((2, 2)), m, kl_coef=0.1)


# ------------------------------------------------------------------------ last_token_index
@VARIANTS
def test_last_token_index(variant):
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    np.testing.assert_array_equal(variant(last_token_index)(m), [2, 0, 0, 3])
    np.testing.assert_array_equal(last_token_index(m.astype(bool)), [2, 0, 0, 3])
    with pytest.raises(AssertionError, match="mask"):
        last_token_index(jnp.ones(3))


def test_nonfinite_padding_never_leaks():
    m = make_mask([3, 1, 0], 4)
    rng = np.random.default_rng(5)
    r = np.where(m > 0, rng.normal(size=(3, 4)), np.nan).astype(np.float32)
    v = np.where(m > 0, rng.normal(size=(3, 4)), np.inf).astype(np.float32)
    out = gae(r, v, m, gamma=0.9, lam=0.95)
    assert np.all(np.isfinite(np.asarray(out.advantages)))
    assert np.all(np.isfinite(np.asarray(out.returns)))
    lp = np.where(m > 0, -1.0, -np.inf).astype(np.float32)
    ref = np.where(m > 0, -1.5, np.nan).astype(np.float32)
    for est in ("k1", "k3"):
        pr = kl_penalized_rewards(np.ones(3, np.float32), lp, ref, m, kl_coef=0.1, estimator=est)
        assert np.all(np.isfinite(np.asarray(pr.rewards))) and np.all(np.isfinite(np.asarray(pr.kl)))
        assert np.all(np.asarray(pr.rewards)[m == 0] == 0.0)
