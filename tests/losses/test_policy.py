"""Policy-gradient losses (PPO, GRPO, GSPO, CISPO, value loss, diagnostics) vs float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax.losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    approx_kl,
    cispo_loss,
    clip_fraction,
    clipped_value_loss,
    grpo_loss,
    gspo_loss,
    ppo_clip_loss,
    sequence_log_ratio,
)

VARIANTS = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["nojit", "jit"])
B, T = 4, 5
LENGTHS = (5, 3, 1, 4)


# ----------------------------------------------------------------- float64 NumPy references
def np_ppo(lp, old, a, clip_eps=0.2, clip_eps_high=None, dual_clip=None, cap=None):
    lp, old, a = (np.asarray(x, np.float64) for x in (lp, old, a))
    if a.ndim == 1:
        a = a[:, None]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    r = np.exp(lp - old)
    unclipped = r if cap is None else np.minimum(r, cap)
    loss = np.maximum(-a * unclipped, -a * np.clip(r, 1 - clip_eps, 1 + high))
    if dual_clip is not None:
        loss = np.where(a < 0, np.minimum(loss, -dual_clip * a), loss)
    return loss


def np_seq_log_ratio(lp, old, m):
    lp, old, m = (np.asarray(x, np.float64) for x in (lp, old, m))
    d = np.where(m > 0, lp - old, 0.0)
    return d.sum(-1) / np.maximum(m.sum(-1), 1.0)


def np_grpo(lp, old, a, m, ref=None, kl_coef=0.0, clip_eps=0.2, clip_eps_high=None,
            level="token", delta=None):
    lp, old, m = (np.asarray(x, np.float64) for x in (lp, old, m))
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if level == "token":
        log_w = np.where(m > 0, lp - old, 0.0)
    else:
        log_w = np.broadcast_to(np_seq_log_ratio(lp, old, m)[:, None], lp.shape)
    w = np.exp(log_w)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = w if delta is None else np.minimum(w, delta)
    loss = np.maximum(-a * unclipped, -a * np.clip(w, 1 - clip_eps, 1 + high))
    if kl_coef:
        d = np.where(m > 0, np.asarray(ref, np.float64) - lp, 0.0)
        loss = loss + kl_coef * (np.exp(d) - d - 1.0)
    return np.where(m > 0, loss, 0.0)


def np_cispo(lp, old, a, m, max_ratio=5.0):
    lp, old, m = (np.asarray(x, np.float64) for x in (lp, old, m))
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    w = np.minimum(np.exp(np.where(m > 0, lp - old, 0.0)), max_ratio)
    return np.where(m > 0, -w * a * lp, 0.0)


def np_value(v, v_old, ret, clip=0.2):
    v, v_old, ret = (np.asarray(x, np.float64) for x in (v, v_old, ret))
    vc = v_old + np.clip(v - v_old, -clip, clip)
    return 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)


# ----------------------------------------------------------------------------- fixtures
def make_mask(lengths=LENGTHS, t=T):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    lp = rng.uniform(-3.0, -0.1, (B, T)).astype(np.float32)
    old = (lp + rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
    ref = (lp + rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
    adv_seq = np.array([1.3, -0.7, 0.4, -2.0], np.float32)
    adv_tok = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
    mask = make_mask()
    # Garbage on padding: must never matter.
    lp_pad = np.where(mask > 0, lp, 37.0).astype(np.float32)
    old_pad = np.where(mask > 0, old, -55.0).astype(np.float32)
    ref_pad = np.where(mask > 0, ref, 91.0).astype(np.float32)
    return dict(lp=lp_pad, old=old_pad, ref=ref_pad, adv_seq=adv_seq, adv_tok=adv_tok, mask=mask)


# ----------------------------------------------------------------------------- ppo_clip_loss
@VARIANTS
@pytest.mark.parametrize(
    "kw",
    [{}, {"clip_eps": 0.1, "clip_eps_high": 0.28}, {"dual_clip": 3.0},
     {"clip_eps": 0.2, "clip_eps_high": 0.3, "dual_clip": 2.0}],
    ids=["sym", "decoupled", "dual", "decoupled_dual"],
)
@pytest.mark.parametrize("adv_kind", ["adv_seq", "adv_tok"])
def test_ppo_clip_loss_matches_numpy(variant, kw, adv_kind):
    rng = np.random.default_rng(1)
    lp = rng.uniform(-3.0, -0.1, (B, T)).astype(np.float32)
    old = (lp + rng.normal(0.0, 0.8, (B, T))).astype(np.float32)  # many clipped ratios
    a = rng.normal(0.0, 1.5, (B,) if adv_kind == "adv_seq" else (B, T)).astype(np.float32)
    got = variant(lambda x, y, z: ppo_clip_loss(x, y, z, **kw))(lp, old, a)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, np_ppo(lp, old, a, **kw), rtol=1e-5, atol=1e-6)


def test_ppo_clip_loss_hand_worked():
    # ratio r = e^{lp - old}; loss = max(-A r, -A clip(r, 0.8, 1.2)).
    lr = np.log(np.array([[1.5, 0.5, 1.1, 0.5]], np.float32))
    a = np.array([[1.0, 1.0, -2.0, -1.0]], np.float32)
    got = ppo_clip_loss(lr, np.zeros_like(lr), a, clip_eps=0.2)
    # r=1.5,A=1: max(-1.5,-1.2)=-1.2 | r=0.5,A=1: max(-0.5,-0.8)=-0.5
    # r=1.1,A=-2: max(2.2,2.2)=2.2 | r=0.5,A=-1: max(0.5,0.8)=0.8
    np.testing.assert_allclose(got, [[-1.2, -0.5, 2.2, 0.8]], rtol=1e-6)
    # DAPO clip-higher: upper bound 1 + 0.28, lower 1 - 0.2.
    got = ppo_clip_loss(lr, np.zeros_like(lr), a, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(got, [[-1.28, -0.5, 2.2, 0.8]], rtol=1e-6)


def test_ppo_dual_clip_hand_worked():
    # A = -1, r = 10: plain PPO loss = max(10, 1.2) = 10; dual clip c=3 -> min(10, 3) = 3.
    # A = -1, r = 2: max(2, 1.2) = 2 < 3, unchanged. A = +1, r = 10: dual clip does not apply.
    lr = np.log(np.array([[10.0, 2.0, 10.0]], np.float32))
    a = np.array([[-1.0, -1.0, 1.0]], np.float32)
    got = ppo_clip_loss(lr, np.zeros_like(lr), a, dual_clip=3.0)
    np.testing.assert_allclose(got, [[3.0, 2.0, -1.2]], rtol=1e-6)
    # In the dual-clipped region the gradient w.r.t. logps is 0.
    g = jax.grad(lambda x: ppo_clip_loss(x, jnp.zeros_like(x), a, dual_clip=3.0).sum())(lr)
    assert float(g[0, 0]) == 0.0
    np.testing.assert_allclose(g[0, 1], 2.0, rtol=1e-5)  # d(-A r)/dlp = -A r = 2


def test_ppo_gradient_analytic_and_old_is_constant():
    rng = np.random.default_rng(2)
    lp = rng.uniform(-2.0, -0.1, (B, T))
    old = lp + rng.normal(0.0, 0.5, (B, T))
    a = rng.normal(0.0, 1.0, (B, T))
    g_lp, g_old = jax.grad(lambda x, y: ppo_clip_loss(x, y, a).sum(), argnums=(0, 1))(lp, old)
    r = np.exp(lp - old)
    # Where the clipped branch is strictly larger, the gradient is 0.
    expected = np.where(-a * np.clip(r, 0.8, 1.2) > -a * r, 0.0, -a * r)
    np.testing.assert_allclose(g_lp, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_old) == 0.0)


def test_ppo_check_grads_smooth_region():
    rng = np.random.default_rng(3)
    lp = jnp.asarray(rng.uniform(-2.0, -0.5, (2, 3)))
    old = lp + 0.05 * jnp.asarray(rng.normal(size=(2, 3)))  # |log r| << clip: no kinks nearby
    a = jnp.asarray(rng.normal(size=(2, 3)))
    check_grads(lambda x: ppo_clip_loss(x, old, a, clip_eps=0.5), (lp,), order=1,
                modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_ppo_bad_input():
    x = jnp.zeros((2, 3))
    with pytest.raises(AssertionError, match="old_logps"):
        ppo_clip_loss(x, jnp.zeros((2, 4)), jnp.zeros(2))
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(x, x, jnp.zeros(3))
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clip_loss(x, x, jnp.zeros(2), clip_eps=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(x, x, jnp.zeros(2), dual_clip=1.0)
    with pytest.raises(AssertionError, match="logps"):
        ppo_clip_loss(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3))


# ------------------------------------------------------------------------ clipped_value_loss
@VARIANTS
def test_clipped_value_loss_matches_numpy(variant):
    rng = np.random.default_rng(4)
    v, v_old, ret = (rng.normal(0.0, 1.0, (B, T)).astype(np.float32) for _ in range(3))
    got = variant(lambda *x: clipped_value_loss(*x, clip=0.3))(v, v_old, ret)
    np.testing.assert_allclose(got, np_value(v, v_old, ret, clip=0.3), rtol=1e-5, atol=1e-7)


def test_clipped_value_loss_hand_worked_and_gradient():
    # v=2, v_old=0, R=1, c=0.2: v_clip=0.2; max((1)^2, (0.8)^2)/2 = 0.5, grad = v - R = 1.
    # v=0.5, v_old=0, R=2: v_clip=0.2; max(2.25, 3.24)/2 = 1.62, grad 0 (clipped branch).
    v = jnp.array([[2.0, 0.5]])
    v_old = jnp.zeros((1, 2))
    ret = jnp.array([[1.0, 2.0]])
    np.testing.assert_allclose(clipped_value_loss(v, v_old, ret), [[0.5, 1.62]], rtol=1e-6)
    g = jax.grad(lambda x, y, z: clipped_value_loss(x, y, z).sum(), argnums=(0, 1, 2))(
        v, v_old, ret
    )
    np.testing.assert_allclose(g[0], [[1.0, 0.0]], atol=1e-6)
    assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.asarray(g[2]) == 0.0)


def test_clipped_value_loss_bad_shape():
    with pytest.raises(AssertionError, match="returns"):
        clipped_value_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 2)))


# ------------------------------------------------------------------------ sequence_log_ratio
@VARIANTS
def test_sequence_log_ratio_matches_numpy(variant, data):
    got = variant(sequence_log_ratio)(data["lp"], data["old"], data["mask"])
    assert got.shape == (B,)
    np.testing.assert_allclose(
        got, np_seq_log_ratio(data["lp"], data["old"], data["mask"]), rtol=1e-5, atol=1e-6
    )


def test_sequence_log_ratio_hand_worked_and_empty_row():
    lp = jnp.array([[-1.0, -2.0, 9.0], [0.0, 0.0, 0.0]])
    old = jnp.array([[-1.5, -1.0, -9.0], [5.0, 5.0, 5.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
    # row 0: ((-1+1.5) + (-2+1)) / 2 = -0.25; empty row: 0.
    np.testing.assert_allclose(sequence_log_ratio(lp, old, mask), [-0.25, 0.0], atol=1e-7)


# --------------------------------------------------------------------------------- grpo_loss
@VARIANTS
@pytest.mark.parametrize(
    "kw",
    [{}, {"kl_coef": 0.04}, {"clip_eps_high": 0.28, "delta": 1.5},
     {"importance_sampling_level": "sequence"},
     {"importance_sampling_level": "sequence", "kl_coef": 0.1, "clip_eps": 0.05}],
    ids=["token", "kl", "high_delta", "sequence", "sequence_kl"],
)
@pytest.mark.parametrize("adv_kind", ["adv_seq", "adv_tok"])
def test_grpo_loss_matches_numpy(variant, data, kw, adv_kind):
    ref = data["ref"] if kw.get("kl_coef") else None
    a = data[adv_kind]
    got = variant(lambda lp, old, aa, m, r: grpo_loss(lp, old, aa, m, ref_logps=r, **kw))(
        data["lp"], data["old"], a, data["mask"], ref
    )
    level = kw.get("importance_sampling_level", "token")
    np_kw = {k: v for k, v in kw.items() if k != "importance_sampling_level"}
    want = np_grpo(data["lp"], data["old"], a, data["mask"], ref=data["ref"], level=level, **np_kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_grpo_hand_worked_kl_term():
    # Single token, w = 1 (lp == old), A = 0.5: surrogate = -0.5;
    # k3 with d = ref - lp = 0.1: e^0.1 - 0.1 - 1 = 0.0051709...; beta = 0.2.
    lp = jnp.array([[-1.0]])
    got = grpo_loss(lp, lp, jnp.array([0.5]), jnp.ones((1, 1)), ref_logps=lp + 0.1, kl_coef=0.2)
    np.testing.assert_allclose(got, [[-0.5 + 0.2 * (np.exp(0.1) - 0.1 - 1.0)]], rtol=1e-5)


def test_grpo_masked_equals_sliced(data):
    full = grpo_loss(data["lp"], data["old"], data["adv_seq"], data["mask"],
                     ref_logps=data["ref"], kl_coef=0.05, importance_sampling_level="sequence")
    for b, n in enumerate(LENGTHS):
        row = grpo_loss(data["lp"][b:b + 1, :n], data["old"][b:b + 1, :n],
                        data["adv_seq"][b:b + 1], np.ones((1, n)),
                        ref_logps=data["ref"][b:b + 1, :n], kl_coef=0.05,
                        importance_sampling_level="sequence")
        np.testing.assert_allclose(full[b, :n], row[0], rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(full[b, n:]) == 0.0)


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
def test_grpo_zero_gradient_on_padding_and_finite(data, level):
    def f(lp):
        return grpo_loss(lp, data["old"], data["adv_tok"], data["mask"], ref_logps=data["ref"],
                         kl_coef=0.1, importance_sampling_level=level).sum()

    g = np.asarray(jax.grad(f)(data["lp"]))
    assert np.all(np.isfinite(g))
    assert np.all(g[data["mask"] == 0] == 0.0)
    assert np.any(g[data["mask"] > 0] != 0.0)


def test_grpo_check_grads_smooth_region():
    rng = np.random.default_rng(5)
    lp = jnp.asarray(rng.uniform(-2.0, -0.5, (2, 3)))
    old = lp + 0.02 * jnp.asarray(rng.normal(size=(2, 3)))
    ref = lp + 0.3 * jnp.asarray(rng.normal(size=(2, 3)))
    m = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    a = jnp.array([0.7, -1.1])
    for level in IMPORTANCE_SAMPLING_LEVELS:
        check_grads(
            lambda x, level=level: grpo_loss(x, old, a, m, ref_logps=ref, kl_coef=0.1, clip_eps=0.5,
                                             importance_sampling_level=level),
            (lp,), order=1, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2,
        )


def test_grpo_bad_input():
    x = jnp.zeros((2, 3))
    m = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="importance_sampling_level.*'token', 'sequence'"):
        grpo_loss(x, x, jnp.zeros(2), m, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x, x, jnp.zeros(2), m, kl_coef=0.1)
    with pytest.raises(AssertionError, match="mask"):
        grpo_loss(x, x, jnp.zeros(2), jnp.ones((2, 4)))
    with pytest.raises(AssertionError, match="ref_logps"):
        grpo_loss(x, x, jnp.zeros(2), m, ref_logps=jnp.zeros((3, 3)), kl_coef=0.1)


# --------------------------------------------------------------------------------- gspo_loss
@VARIANTS
@pytest.mark.parametrize("token_level", [False, True])
def test_gspo_loss_matches_numpy_and_grpo_sequence(variant, data, token_level):
    kw = {"clip_eps": 0.05, "clip_eps_high": 0.08}
    got = variant(lambda *x: gspo_loss(*x, token_level=token_level, **kw))(
        data["lp"], data["old"], data["adv_seq"], data["mask"]
    )
    want = np_grpo(data["lp"], data["old"], data["adv_seq"], data["mask"], level="sequence", **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grpo = grpo_loss(data["lp"], data["old"], data["adv_seq"], data["mask"],
                     importance_sampling_level="sequence", **kw)
    np.testing.assert_allclose(got, grpo, rtol=1e-6, atol=1e-7)


def test_gspo_gradient_structure():
    # Near-on-policy, unclipped: L_b = -A_b s_b on each real token; summed per-sequence mean
    # (aggregate "grpo" up to 1/B) has d/dlp_bt = -A_b s_b / |y_b| on real tokens.
    rng = np.random.default_rng(6)
    m = make_mask()
    lp = rng.uniform(-2.0, -0.5, (B, T))
    old = lp + 1e-5 * rng.normal(size=(B, T))
    a = np.array([1.0, -0.5, 2.0, -1.5])
    n = m.sum(-1)
    s = np.exp(np_seq_log_ratio(lp, old, m))
    expected = (-a * s / n)[:, None] * m

    for token_level in (False, True):
        def f(x, token_level=token_level):
            per_tok = gspo_loss(x, old, a, m, clip_eps=0.2, token_level=token_level)
            return jnp.sum(jnp.sum(per_tok, -1) / jnp.sum(m, -1))

        # GSPO-token: each token's gradient is -A s (no 1/|y| inside the ratio) and the
        # per-sequence mean divides by |y|: the same gradient as the sequence ratio.
        g = jax.grad(f)(lp)
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
    # Gradient is zero w.r.t. old_logps, and zero for a sequence whose clip is active.
    g_old = jax.grad(lambda y: gspo_loss(lp, y, a, m).sum())(old)
    assert np.all(np.asarray(g_old) == 0.0)
    far = lp + np.where(np.arange(B)[:, None] == 0, -1.0, 0.0)  # row 0: log s = 1, A > 0
    g = np.asarray(jax.grad(lambda x: gspo_loss(x, far, a, m).sum())(lp))
    assert np.all(g[0] == 0.0) and np.any(g[1] != 0.0)


def test_gspo_token_level_per_token_advantage_differs_only_in_gradient(data):
    # Values agree for per-token advantages too; only the gradient differs (GSPO-token).
    kw = {"clip_eps": 0.5, "clip_eps_high": 0.2}  # bounds [0.5, 1.2]
    v0 = gspo_loss(data["lp"], data["old"], data["adv_tok"], data["mask"], **kw)
    v1 = gspo_loss(data["lp"], data["old"], data["adv_tok"], data["mask"], token_level=True, **kw)
    np.testing.assert_allclose(v0, v1, rtol=1e-6, atol=1e-7)
    g1 = np.asarray(jax.grad(lambda x: gspo_loss(
        x, data["old"], data["adv_tok"], data["mask"], token_level=True, **kw).sum())(data["lp"]))
    s = np.exp(np_seq_log_ratio(data["lp"], data["old"], data["mask"]))
    # GSPO-token: d/dlp_bt [-A_bt sg(s_b) e^{lp - sg(lp)}] = -A_bt s_b where unclipped,
    # 0 where the clipped branch is the larger one.
    a, s = data["adv_tok"], s[:, None]
    clipped = -a * np.clip(s, 0.5, 1.2) > -a * s
    expected = np.where((data["mask"] > 0) & ~clipped, -a * s, 0.0)
    assert clipped[data["mask"] > 0].any() and (~clipped[data["mask"] > 0]).any()
    np.testing.assert_allclose(g1, expected, rtol=1e-4, atol=1e-6)


def test_gspo_masked_equals_sliced_and_zero_pad_gradient(data):
    full = gspo_loss(data["lp"], data["old"], data["adv_seq"], data["mask"], clip_eps=0.1)
    for b, n in enumerate(LENGTHS):
        row = gspo_loss(data["lp"][b:b + 1, :n], data["old"][b:b + 1, :n],
                        data["adv_seq"][b:b + 1], np.ones((1, n)), clip_eps=0.1)
        np.testing.assert_allclose(full[b, :n], row[0], rtol=1e-6, atol=1e-7)
    for token_level in (False, True):
        g = np.asarray(jax.grad(lambda x, tl=token_level: gspo_loss(
            x, data["old"], data["adv_seq"], data["mask"], clip_eps=0.5, token_level=tl).sum()
        )(data["lp"]))
        assert np.all(np.isfinite(g)) and np.all(g[data["mask"] == 0] == 0.0)


# -------------------------------------------------------------------------------- cispo_loss
@VARIANTS
@pytest.mark.parametrize("adv_kind", ["adv_seq", "adv_tok"])
def test_cispo_loss_matches_numpy(variant, data, adv_kind):
    got = variant(lambda *x: cispo_loss(*x, max_ratio=1.3))(
        data["lp"], data["old"], data[adv_kind], data["mask"]
    )
    want = np_cispo(data["lp"], data["old"], data[adv_kind], data["mask"], max_ratio=1.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cispo_gradient_is_stopgrad_weight_times_advantage(data):
    a = data["adv_tok"]
    g_lp, g_old = jax.grad(
        lambda x, y: cispo_loss(x, y, a, data["mask"], max_ratio=1.3).sum(), argnums=(0, 1)
    )(data["lp"], data["old"])
    lp, old, m = (np.asarray(data[k], np.float64) for k in ("lp", "old", "mask"))
    w = np.minimum(np.exp(lp - old), 1.3)
    np.testing.assert_allclose(g_lp, np.where(m > 0, -w * a, 0.0), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g_old) == 0.0)
    # Every real token keeps a gradient even when its ratio is far above the cap.
    g = jax.grad(lambda x: cispo_loss(x, jnp.zeros((1, 1)), jnp.ones(1), jnp.ones((1, 1))).sum())(
        jnp.full((1, 1), 3.0)
    )
    np.testing.assert_allclose(g, [[-5.0]], rtol=1e-6)


def test_cispo_hand_worked():
    # r = 2 (<5): -2 * 1.5 * log(0.5); r = e^3 capped at 5: -5 * 1.5 * lp.
    lp = jnp.array([[np.log(0.5), -0.2]])
    old = jnp.array([[np.log(0.25), -3.2]])
    got = cispo_loss(lp, old, jnp.array([1.5]), jnp.ones((1, 2)))
    np.testing.assert_allclose(got, [[-3.0 * np.log(0.5), -7.5 * -0.2]], rtol=1e-5)


def test_cispo_masked_equals_sliced(data):
    full = cispo_loss(data["lp"], data["old"], data["adv_seq"], data["mask"])
    for b, n in enumerate(LENGTHS):
        row = cispo_loss(data["lp"][b:b + 1, :n], data["old"][b:b + 1, :n],
                         data["adv_seq"][b:b + 1], np.ones((1, n)))
        np.testing.assert_allclose(full[b, :n], row[0], rtol=1e-6)
        assert np.all(np.asarray(full[b, n:]) == 0.0)


# ------------------------------------------------------------------ clip_fraction, approx_kl
@VARIANTS
def test_clip_fraction_matches_numpy(variant, data):
    lp, old, m = (np.asarray(data[k], np.float64) for k in ("lp", "old", "mask"))
    r = np.exp(lp - old)
    got = variant(lambda *x: clip_fraction(*x, clip_eps=0.1, clip_eps_high=0.2))(
        data["lp"], data["old"], data["mask"]
    )
    want = (((r < 0.9) | (r > 1.2)) * m).sum() / m.sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    a = data["adv_tok"]
    got = variant(lambda *x: clip_fraction(*x, clip_eps=0.1, clip_eps_high=0.2, advantages=a))(
        data["lp"], data["old"], data["mask"]
    )
    want = (((-a * np.clip(r, 0.9, 1.2)) > (-a * r)) * m).sum() / m.sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_clip_fraction_hand_worked():
    lr = np.log(np.array([[1.5, 0.5, 1.1, 0.5]], np.float32))
    m = np.array([[1, 1, 1, 0]], np.float32)
    # Real ratios 1.5, 0.5 outside [0.8, 1.2], 1.1 inside: 2/3.
    np.testing.assert_allclose(clip_fraction(lr, np.zeros_like(lr), m), 2.0 / 3.0, rtol=1e-6)
    # Active in the loss with A = +1: r = 1.5 clipped (upper bound binds), r = 0.5 not: 1/3.
    np.testing.assert_allclose(
        clip_fraction(lr, np.zeros_like(lr), m, advantages=np.ones(1)), 1.0 / 3.0, rtol=1e-6
    )


@VARIANTS
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_approx_kl_matches_numpy(variant, data, estimator):
    lp, old, m = (np.asarray(data[k], np.float64) for k in ("lp", "old", "mask"))
    d = np.where(m > 0, old - lp, 0.0)  # log(pi_old / pi)
    per = {"k1": -d, "k2": 0.5 * d**2, "k3": np.expm1(d) - d}[estimator]
    got = variant(lambda *x: approx_kl(*x, estimator=estimator))(
        data["lp"], data["old"], data["mask"]
    )
    np.testing.assert_allclose(got, (per * m).sum() / m.sum(), rtol=1e-5)


def test_approx_kl_hand_worked_and_no_gradient():
    lp = jnp.array([[-1.0, -2.0, 0.0]])
    old = jnp.array([[-1.5, -1.0, 7.0]])
    m = jnp.array([[1.0, 1.0, 0.0]])
    # k2 = 0.5 * (0.5^2 + 1^2) / 2 = 0.3125
    np.testing.assert_allclose(approx_kl(lp, old, m), 0.3125, rtol=1e-6)
    g = jax.grad(lambda x: approx_kl(x, old, m) + clip_fraction(x, old, m))(lp)
    assert np.all(np.asarray(g) == 0.0)


def test_diagnostics_bad_input():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="estimator"):
        approx_kl(x, x, jnp.ones((2, 3)), estimator="k4")
    with pytest.raises(AssertionError, match="mask"):
        clip_fraction(x, x, jnp.ones((2, 2)))


# ---------------------------------------------------------------------- extreme inputs
def test_all_losses_finite_at_extreme_inputs():
    m = make_mask()
    rng = np.random.default_rng(7)
    lp = np.where(m > 0, rng.uniform(-60.0, 0.0, (B, T)), -1e30).astype(np.float32)
    old = np.where(m > 0, rng.uniform(-60.0, 0.0, (B, T)), 1e30).astype(np.float32)
    ref = np.where(m > 0, rng.uniform(-60.0, 0.0, (B, T)), np.nan).astype(np.float32)
    a = np.array([50.0, -50.0, 1e-3, -1e-3], np.float32)
    fns = {
        "grpo": lambda x: grpo_loss(x, old, a, m, ref_logps=np.nan_to_num(ref), kl_coef=0.04),
        "grpo_seq": lambda x: grpo_loss(x, old, a, m, importance_sampling_level="sequence"),
        "gspo": lambda x: gspo_loss(x, old, a, m),
        "gspo_token": lambda x: gspo_loss(x, old, a, m, token_level=True),
        "cispo": lambda x: cispo_loss(x, old, a, m),
    }
    for name, fn in fns.items():
        val = np.asarray(fn(lp))
        g = np.asarray(jax.grad(lambda x, fn=fn: fn(x).sum())(lp))
        assert np.all(np.isfinite(val)), name
        assert np.all(np.isfinite(g)), name
        assert np.all(g[m == 0] == 0.0), name
    for est in ("k1", "k2", "k3"):
        assert np.isfinite(float(approx_kl(lp, old, m, estimator=est)))
    assert np.isfinite(float(clip_fraction(lp, old, m, advantages=a)))
    # ppo_clip_loss (no mask): large but representable log-ratios stay finite.
    big = np.array([[40.0, -40.0, 40.0, -40.0]], np.float32)
    aa = np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)
    assert np.all(np.isfinite(np.asarray(ppo_clip_loss(big, np.zeros_like(big), aa,
                                                       dual_clip=3.0))))
    v = np.array([[1e6, -1e6]], np.float32)
    assert np.all(np.isfinite(np.asarray(clipped_value_loss(v, np.zeros_like(v), -v))))


def test_bfloat16_inputs_compute_in_float32(data):
    lp = jnp.asarray(data["lp"], jnp.bfloat16)
    old = jnp.asarray(data["old"], jnp.bfloat16)
    got = grpo_loss(lp, old, data["adv_seq"], data["mask"])
    assert got.dtype == jnp.float32
    want = np_grpo(np.asarray(lp, np.float32), np.asarray(old, np.float32), data["adv_seq"],
                   data["mask"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nonfinite_padding_never_leaks():
    m = make_mask()
    rng = np.random.default_rng(8)
    lp = np.where(m > 0, rng.uniform(-2.0, -0.1, (B, T)), np.nan).astype(np.float32)
    old = np.where(m > 0, lp + 0.1 * rng.normal(size=(B, T)), -np.inf).astype(np.float32)
    ref = np.where(m > 0, lp + 0.1 * rng.normal(size=(B, T)), np.inf).astype(np.float32)
    a = rng.normal(size=(B, T)).astype(np.float32)
    fns = {
        "grpo": lambda x: grpo_loss(x, old, a, m, ref_logps=ref, kl_coef=0.04),
        "grpo_seq": lambda x: grpo_loss(x, old, a, m, importance_sampling_level="sequence"),
        "gspo": lambda x: gspo_loss(x, old, a, m),
        "gspo_token": lambda x: gspo_loss(x, old, a, m, token_level=True),
        "cispo": lambda x: cispo_loss(x, old, a, m),
        "seq_ratio": lambda x: sequence_log_ratio(x, old, m),
    }
    for name, fn in fns.items():
        val = np.asarray(fn(lp))
        g = np.asarray(jax.grad(lambda x, fn=fn: fn(x).sum())(lp))
        assert np.all(np.isfinite(val)), name
        assert np.all(np.isfinite(g)) and np.all(g[m == 0] == 0.0), name
    for est in ("k1", "k2", "k3"):
        assert np.isfinite(float(approx_kl(lp, old, m, estimator=est)))
    assert np.isfinite(float(clip_fraction(lp, old, m, advantages=a)))


def test_check_grads_value_cispo_gspo():
    rng = np.random.default_rng(9)
    lp = jnp.asarray(rng.uniform(-2.0, -0.5, (2, 3)))
    old = lp + 0.02 * jnp.asarray(rng.normal(size=(2, 3)))
    m = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    a = jnp.array([0.7, -1.1])
    tol = dict(order=1, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)
    # CISPO's weight is stop-gradient, so its gradient is the true derivative of the value only
    # where the weight is constant: every ratio above the cap (r = e^3 > 5).
    check_grads(lambda x: cispo_loss(x, lp - 3.0, a, m), (lp,), **tol)
    check_grads(lambda x: gspo_loss(x, old, a, m, clip_eps=0.5, clip_eps_high=0.5), (lp,), **tol)
    check_grads(lambda x: sequence_log_ratio(x, old, m), (lp,), **tol)
    v_old = jnp.asarray(rng.normal(size=(2, 3)))
    v = v_old + 0.05 * jnp.asarray(rng.normal(size=(2, 3)))  # inside the clip band
    ret = v_old + jnp.asarray(rng.normal(size=(2, 3)))
    check_grads(lambda x: clipped_value_loss(x, v_old, ret, clip=0.5), (v,), **tol)


def test_grpo_kl_coef_may_be_traced(data):
    args = (data["lp"], data["old"], data["adv_seq"], data["mask"])
    fixed = grpo_loss(*args, ref_logps=data["ref"], kl_coef=0.3)
    traced = jax.jit(lambda c: grpo_loss(*args, ref_logps=data["ref"], kl_coef=c))(0.3)
    np.testing.assert_allclose(traced, fixed, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logps"):
        grpo_loss(*args, kl_coef=0.3)
