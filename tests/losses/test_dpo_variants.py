"""DPO variants (EXO, NCA, BCO with its running mean, SPPO, AOT, APO, DiscoPOP) and the
f-divergence scores, against float64 NumPy references of TRL 1.16 ``DPOTrainer``'s formulas
(``_compute_loss``) and hand-worked values."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import rlhf_jax.losses as L

VARIANTS = ("exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
            "apo_down", "discopop")
SMOOTHED = ("exo_pair", "aot", "aot_unpaired")
F_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
# (f_divergence, f_alpha); 0.5 is TRL's default f_alpha_divergence_coef
F_DIVS = (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
          ("alpha_divergence", 0.3), ("alpha_divergence", 2.0), ("alpha_divergence", -1.0))
LENGTHS_C = np.array([3, 5, 7, 2, 9, 4, 1, 6.0])
LENGTHS_R = np.array([4, 4, 6, 8, 1, 2, 3, 5.0])


# ------------------------------------------------------------------ float64 NumPy reference
def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return np.exp(_logsig(x))


def _softplus(x):
    return math.log1p(math.exp(x))


def _sigm(x):
    return 1.0 / (1.0 + math.exp(-x))


def _np_scores(rho, fdiv, alpha):
    """TRL's f-divergence scores f'(pi / pi_ref) of a float64 log-ratio."""
    if fdiv == "reverse_kl":
        return rho
    if fdiv == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - np.exp(-rho)
    if fdiv == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return np.log(2.0) + _logsig(rho)
    if abs(alpha - 1.0) < 1e-6:  # TRL falls back to reverse_kl
        return rho
    t = np.minimum((alpha - 1.0) * rho, 80.0)  # TRL's float32 clamp
    return (np.exp(t) - 1.0) * (1.0 / (alpha - 1.0))


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, nc=None, nr=None, fdiv="reverse_kl",
            alpha=0.5, tau=0.05, bco_delta=0.0):
    """TRL 1.16 ``DPOTrainer._compute_loss`` per-sequence losses, float64 (``bco_delta``: the
    running mean TRL <= 0.28 subtracted in ``bco_pair``; 0 in TRL 1.16)."""
    clr, rlr = pc - rc, pr - rr
    cs, rs = _np_scores(clr, fdiv, alpha), _np_scores(rlr, fdiv, alpha)
    ds = cs - rs
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsig(beta * ds) - eps * _logsig(-beta * ds)
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - beta * ds)
    if loss_type == "ipo":
        return (cs / np.maximum(nc, 1.0) - rs / np.maximum(nr, 1.0) - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -_logsig(beta * (cs / np.maximum(nc, 1.0) - rs / np.maximum(nr, 1.0)))
    if loss_type == "robust":
        clean = -(1 - eps) * _logsig(beta * ds)
        flipped = -eps * _logsig(-beta * ds)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        qw, log_qw = _sig(beta * ds), _logsig(beta * ds)
        ql, log_ql = _sig(-beta * ds), _logsig(-beta * ds)
        return qw * (log_qw - np.log1p(-eps)) + ql * (log_ql - np.log(eps))
    if loss_type == "nca_pair":
        cw, rw = beta * clr, beta * rlr
        return -_logsig(cw) - 0.5 * _logsig(-cw) - 0.5 * _logsig(-rw)
    if loss_type == "bco_pair":
        return -_logsig(beta * clr - bco_delta) - _logsig(-(beta * rlr - bco_delta))
    if loss_type == "sppo_hard":
        return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = np.sort(pc - pr) - np.sort(rc - rr)
        return -_logsig(beta * delta) * (1 - eps) - _logsig(-beta * delta) * eps
    if loss_type == "aot_unpaired":
        delta = np.sort(clr) - np.sort(rlr)
        return -_logsig(beta * delta) * (1 - eps) - _logsig(-beta * delta) * eps
    if loss_type == "apo_zero":
        return (1 - _sig(beta * clr)) + _sig(beta * rlr)
    if loss_type == "apo_down":
        return _sig(beta * clr) + (1 - _sig(beta * (clr - rlr)))
    if loss_type == "discopop":
        logits = beta * ds
        w = _sig(logits / tau)
        return -_logsig(logits) * (1 - w) + np.exp(-logits) * w
    raise ValueError(loss_type)


def _logps(seed=0, n=8, loc=-20.0, scale=5.0):
    """Four float32-representable float64 arrays of sequence log-probs (pc, pr, rc, rr)."""
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(loc, scale, n).astype(np.float32).astype(np.float64)
                 for _ in range(4))


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _smoothing(loss_type, eps=0.1):
    return {"label_smoothing": eps} if loss_type in SMOOTHED else {}


# ---------------------------------------------------------------------- reference, realistic
class TestAgainstTRLReference(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(loss_type=VARIANTS, beta=[0.1, 0.5])
    def test_variant(self, loss_type, beta):
        # sequence log-probs ~ -20 +- 5: log-ratios of several units
        pc, pr, rc, rr = _logps(seed=11)
        kw = _smoothing(loss_type)
        fn = self.variant(lambda *a: L.dpo_loss(*a, beta=beta, loss_type=loss_type, **kw))
        got = fn(*_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                       eps=kw.get("label_smoothing", 0.0))
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(loss_type=SMOOTHED, eps=[1e-3, 0.1, 0.4])
    def test_label_smoothing(self, loss_type, eps):
        pc, pr, rc, rr = _logps(seed=12)
        fn = self.variant(lambda *a: L.dpo_loss(*a, beta=0.1, loss_type=loss_type,
                                                label_smoothing=eps))
        got = fn(*_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, eps=eps)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_exo_pair_per_pair_label_smoothing(self):
        pc, pr, rc, rr = _logps(seed=13)
        eps = np.linspace(0.01, 0.5, 8)
        fn = self.variant(lambda e, *a: L.dpo_loss(*a, beta=0.1, loss_type="exo_pair",
                                                   label_smoothing=e))
        got = fn(jnp.asarray(eps, jnp.float32), *_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=0.1, loss_type="exo_pair",
                       eps=eps.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fdiv_alpha=F_DIVS, loss_type=F_LOSSES)
    def test_f_divergence(self, fdiv_alpha, loss_type):
        fdiv, alpha = fdiv_alpha
        # the scores are exponential in the log-ratio: log-ratios of about +-1 keep the losses
        # away from saturation, so the comparison is informative
        pc, pr, rc, rr = _logps(seed=14, scale=0.7)
        eps = {"exo_pair": 0.2, "robust": 0.1}.get(loss_type, 0.0)
        fn = self.variant(lambda *a: L.dpo_loss(
            *a, beta=0.5, loss_type=loss_type, label_smoothing=eps, chosen_lengths=LENGTHS_C,
            rejected_lengths=LENGTHS_R, f_divergence=fdiv, f_alpha=alpha, discopop_tau=0.5))
        got = fn(*_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, eps=eps, nc=LENGTHS_C,
                       nr=LENGTHS_R, fdiv=fdiv, alpha=alpha, tau=0.5)
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*F_LOSSES)
    def test_reverse_kl_is_the_plain_log_ratio(self, loss_type):
        pc, pr, rc, rr = _f32(*_logps(seed=15))
        eps = {"exo_pair": 0.2, "robust": 0.1}.get(loss_type, 0.0)
        kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=eps, chosen_lengths=LENGTHS_C,
                  rejected_lengths=LENGTHS_R)
        default = L.dpo_loss(pc, pr, rc, rr, **kw)
        explicit = self.variant(lambda *a: L.dpo_loss(*a, f_divergence="reverse_kl", **kw))
        alpha_one = self.variant(lambda *a: L.dpo_loss(*a, f_divergence="alpha_divergence",
                                                       f_alpha=1.0, **kw))
        # equal up to the float32 rounding jit's fusion may change
        np.testing.assert_allclose(explicit(pc, pr, rc, rr), default, rtol=1e-6, atol=0)
        np.testing.assert_allclose(alpha_one(pc, pr, rc, rr), default, rtol=1e-6, atol=0)

    def test_reverse_kl_sigmoid_is_dpo(self):
        pc, pr, rc, rr = _logps(seed=16)
        got = L.dpo_loss(*_f32(pc, pr, rc, rr), beta=0.1, f_divergence="reverse_kl")
        want = -_logsig(0.1 * ((pc - rc) - (pr - rr)))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)

    def test_alpha_zero_is_forward_kl(self):
        # (t^(0 - 1) - 1) / (0 - 1) = 1 - 1/t: the alpha -> 0 member is forward KL
        args = _f32(*_logps(seed=17, scale=0.7))
        a0 = L.dpo_loss(*args, beta=0.5, f_divergence="alpha_divergence", f_alpha=0.0)
        fkl = L.dpo_loss(*args, beta=0.5, f_divergence="forward_kl")
        np.testing.assert_allclose(a0, fkl, rtol=1e-5, atol=1e-6)

    @parameterized.parameters(1.0, 1.0 + 5e-7, 1.0 - 5e-7)
    def test_alpha_within_1e_6_of_one_falls_back_to_reverse_kl(self, alpha):
        args = _f32(*_logps(seed=18))
        got = L.dpo_loss(*args, beta=0.2, f_divergence="alpha_divergence", f_alpha=alpha)
        np.testing.assert_array_equal(got, L.dpo_loss(*args, beta=0.2))

    def test_mpo_mixture_of_variants(self):
        pc, pr, rc, rr = _logps(seed=19)
        weights = {"sigmoid": 0.8, "bco_pair": 0.2, "exo_pair": 0.5, "aot": 0.1}
        got = L.mixed_dpo_loss(*_f32(pc, pr, rc, rr), loss_weights=weights, beta=0.1,
                               label_smoothing=0.05)
        want = sum(w * _np_dpo(pc, pr, rc, rr, beta=0.1, loss_type=t,
                               eps=0.05 if t in SMOOTHED + ("sigmoid",) else 0.0)
                   for t, w in weights.items())
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------- hand-worked
class TestHandWorked:
    # log-probs: chosen -1 vs ref -2 (log-ratio 1), rejected -3 vs ref -2 (log-ratio -1);
    # beta = 0.5: beta * rho_c = 0.5, beta * rho_r = -0.5, beta * delta = 1
    ARGS = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    ZERO = (jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))  # all log-ratios 0

    @pytest.mark.parametrize("loss_type, kw, want", [
        # q_w = sig(1), q_l = sig(-1): q_w (log q_w - log 0.9) + q_l (log q_l - log 0.1)
        # = 0.731059 * (-0.313262 + 0.105361) + 0.268941 * (-1.313262 + 2.302585) = 0.114082
        ("exo_pair", {"label_smoothing": 0.1},
         _sigm(1) * (math.log(_sigm(1)) - math.log(0.9))
         + _sigm(-1) * (math.log(_sigm(-1)) - math.log(0.1))),
        # the KL is zero where q_w = 1 - eps: eps = sig(-1)
        ("exo_pair", {"label_smoothing": _sigm(-1)}, 0.0),
        # -log sig(0.5) - 0.5 log sig(-0.5) - 0.5 log sig(0.5)
        # = 1.5 softplus(-0.5) + 0.5 softplus(0.5) = 1.5 * 0.474077 + 0.5 * 0.974077 = 1.198154
        ("nca_pair", {}, 1.5 * _softplus(-0.5) + 0.5 * _softplus(0.5)),
        # -log sig(0.5) - log sig(-(-0.5)) = 2 softplus(-0.5) = 0.948154
        ("bco_pair", {}, 2 * _softplus(-0.5)),
        # -log sig(0.5 - 0.5) - log sig(-(-0.5 - 0.5)) = log 2 + softplus(-1) = 1.006409
        ("bco_pair", {"bco_delta": 0.5}, math.log(2) + _softplus(-1)),
        # (1 - 1/(2 * 0.5))^2 + (-1 + 1/(2 * 0.5))^2 = 0
        ("sppo_hard", {}, 0.0),
        # single pair: sorting changes nothing. -(1 - 0.25) log sig(1) - 0.25 log sig(-1)
        # = 0.75 * 0.313262 + 0.25 * 1.313262 = 0.563262
        ("aot", {"label_smoothing": 0.25}, 0.75 * _softplus(-1) + 0.25 * _softplus(1)),
        ("aot_unpaired", {"label_smoothing": 0.25}, 0.75 * _softplus(-1) + 0.25 * _softplus(1)),
        ("aot", {}, _softplus(-1)),
        # 1 - sig(0.5) + sig(-0.5) = 2 sig(-0.5) = 0.755081
        ("apo_zero", {}, 2 * _sigm(-0.5)),
        # sig(0.5) + 1 - sig(1) = 0.622459 + 1 - 0.731059 = 0.891401
        ("apo_down", {}, _sigm(0.5) + 1 - _sigm(1)),
        # w = sig(1 / 0.05) = sig(20): (1 - w) softplus(-1) + w e^-1 = 0.367879 (w ~ 1)
        ("discopop", {}, (1 - _sigm(20)) * _softplus(-1) + _sigm(20) * math.exp(-1)),
        # tau = 1: w = sig(1): 0.268941 * 0.313262 + 0.731059 * 0.367879 = 0.353186
        ("discopop", {"discopop_tau": 1.0},
         _sigm(-1) * _softplus(-1) + _sigm(1) * math.exp(-1)),
    ])
    def test_single_pair(self, loss_type, kw, want):
        got = L.dpo_loss(*self.ARGS, beta=0.5, loss_type=loss_type, **kw)
        assert got.shape == (1,)
        assert float(got[0]) == pytest.approx(want, abs=2e-6)

    @pytest.mark.parametrize("loss_type, kw, want", [
        # q_w = q_l = 1/2: 1/2 (log 1/2 - log 0.9) + 1/2 (log 1/2 - log 0.1) = -log 2 - log(0.09)/2
        ("exo_pair", {"label_smoothing": 0.1}, -math.log(2) - 0.5 * math.log(0.09)),
        # 1 + 1/2 + 1/2 times log 2
        ("nca_pair", {}, 2 * math.log(2)),
        ("bco_pair", {}, 2 * math.log(2)),
        # 2 * (1 / (2 * 0.5))^2
        ("sppo_hard", {}, 2.0),
        ("aot", {"label_smoothing": 0.3}, math.log(2)),
        # 1 - 1/2 + 1/2 and 1/2 + 1 - 1/2
        ("apo_zero", {}, 1.0),
        ("apo_down", {}, 1.0),
        # w = 1/2 for any tau: log 2 / 2 + 1/2
        ("discopop", {}, 0.5 * math.log(2) + 0.5),
    ])
    def test_zero_log_ratios(self, loss_type, kw, want):
        got = L.dpo_loss(*self.ZERO, beta=0.5, loss_type=loss_type, **kw)
        assert float(got[0]) == pytest.approx(want, abs=2e-6)

    @pytest.mark.parametrize("fdiv, alpha, rho_r, want", [
        # rho_c = 0, rho_r = log 2. forward: s_c = 0, s_r = 1 - 1/2: -log sig(-0.5)
        ("forward_kl", 0.5, math.log(2), _softplus(0.5)),
        # js: s_c = log 2 + log(1/2) = 0, s_r = log 2 + log(2/3) = log(4/3): log(1 + 4/3)
        ("js_divergence", 0.5, math.log(2), math.log(7 / 3)),
        # alpha = 0.5, rho_r = 2 log 2: s_r = (e^{-log 2} - 1) / (-0.5) = 1, s_c = 0
        ("alpha_divergence", 0.5, 2 * math.log(2), _softplus(1)),
        # alpha = 2, rho_r = log 3: s_r = (3 - 1) / 1 = 2: -log sig(-2)
        ("alpha_divergence", 2.0, math.log(3), _softplus(2)),
    ])
    def test_f_divergence_sigmoid(self, fdiv, alpha, rho_r, want):
        z = jnp.zeros(1)
        got = L.dpo_loss(z, z + rho_r, z, z, beta=1.0, f_divergence=fdiv, f_alpha=alpha)
        assert float(got[0]) == pytest.approx(want, abs=2e-6)

    def test_f_divergence_exo_and_discopop(self):
        # forward KL, rho_c = log 2, rho_r = 0: s_c = 1/2, s_r = 0; beta = 2: z = 1
        z = jnp.zeros(1)
        pc = z + math.log(2)
        exo = L.dpo_loss(pc, z, z, z, beta=2.0, loss_type="exo_pair", label_smoothing=0.1,
                         f_divergence="forward_kl")
        want = (_sigm(1) * (math.log(_sigm(1)) - math.log(0.9))
                + _sigm(-1) * (math.log(_sigm(-1)) - math.log(0.1)))
        assert float(exo[0]) == pytest.approx(want, abs=2e-6)
        disco = L.dpo_loss(pc, z, z, z, beta=2.0, loss_type="discopop", discopop_tau=1.0,
                           f_divergence="forward_kl")
        assert float(disco[0]) == pytest.approx(
            _sigm(-1) * _softplus(-1) + _sigm(1) * math.exp(-1), abs=2e-6)

    def test_length_normalised_losses_keep_the_f_divergence_constants(self):
        """1 - e^{-rho} keeps its constant 1: with unequal lengths it does not cancel."""
        z = jnp.zeros(1)
        got = L.dpo_loss(z + 1.0, z + 1.0, z, z, beta=1.0, loss_type="sigmoid_norm",
                         chosen_lengths=jnp.array([1]), rejected_lengths=jnp.array([2]),
                         f_divergence="forward_kl")
        s = 1.0 - math.exp(-1.0)  # the same score for both; normalised: s / 1 - s / 2 = s / 2
        assert float(got[0]) == pytest.approx(_softplus(-s / 2), rel=1e-6)


# ------------------------------------------------------------------------------------ AOT
def _aot_grads_np(pc, pr, rc, rr, *, beta, eps, unpaired):
    """d sum(loss) / d inputs for AOT: each sorted slot's gradient goes to the pair holding
    that rank (torch.sort's backward), float64."""
    m, mr = (pc - rc, pr - rr) if unpaired else (pc - pr, rc - rr)
    im, imr = np.argsort(m), np.argsort(mr)
    delta = m[im] - mr[imr]
    dd = -(1 - eps) * beta * _sig(-beta * delta) + eps * beta * _sig(beta * delta)
    g_m, g_mr = np.empty_like(m), np.empty_like(mr)
    g_m[im], g_mr[imr] = dd, -dd
    if unpaired:  # m = rho_c, mr = rho_r
        return g_m, g_mr, -g_m, -g_mr
    return g_m, -g_m, g_mr, -g_mr  # m = pc - pr, mr = rc - rr


class TestAOTSorting:
    def test_aot_sorts_policy_and_reference_margins_separately(self):
        # policy margins [3, -1] sorted [-1, 3]; reference margins [0, 2] sorted [0, 2]:
        # delta = [-1, 1]: losses [softplus(1), softplus(-1)], not pair-aligned (pairwise
        # deltas would be [3, -3])
        pc, pr = jnp.array([0.0, -3.0]), jnp.array([-3.0, -2.0])
        rc, rr = jnp.array([-1.0, -1.0]), jnp.array([-1.0, -3.0])
        got = L.dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot")
        np.testing.assert_allclose(got, [_softplus(1), _softplus(-1)], atol=1e-6)

    def test_aot_unpaired_sorts_each_log_ratio(self):
        # chosen log-ratios [3, 1] sorted [1, 3]; rejected [-2, 2] sorted [-2, 2]: delta [3, 1]
        z = jnp.zeros(2)
        got = L.dpo_loss(jnp.array([3.0, 1.0]), jnp.array([-2.0, 2.0]), z, z, beta=1.0,
                         loss_type="aot_unpaired")
        np.testing.assert_allclose(got, [_softplus(-3), _softplus(-1)], atol=1e-6)

    @pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
    def test_output_is_invariant_to_the_batch_order(self, loss_type):
        args = _f32(*_logps(seed=21))
        perm = np.random.default_rng(0).permutation(8)
        got = L.dpo_loss(*args, beta=0.1, loss_type=loss_type, label_smoothing=0.1)
        shuffled = L.dpo_loss(*(a[perm] for a in args), beta=0.1, loss_type=loss_type,
                              label_smoothing=0.1)
        np.testing.assert_array_equal(got, shuffled)  # the same vector, not a permutation
        assert np.all(np.diff(np.asarray(got)) != 0)  # and not a constant one

    def test_aot_only_sees_the_sets_of_margins(self):
        # the reference pairs may be shuffled against the policy pairs
        pc, pr, rc, rr = _f32(*_logps(seed=22))
        perm = np.random.default_rng(1).permutation(8)
        a = L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot")
        b = L.dpo_loss(pc, pr, rc[perm], rr[perm], beta=0.1, loss_type="aot")
        np.testing.assert_array_equal(a, b)

    def test_aot_unpaired_decouples_chosen_and_rejected(self):
        pc, pr, rc, rr = _f32(*_logps(seed=23))
        perm = np.random.default_rng(2).permutation(8)
        a = L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot_unpaired")
        b = L.dpo_loss(pc[perm], pr, rc[perm], rr, beta=0.1, loss_type="aot_unpaired")
        np.testing.assert_array_equal(a, b)

    @pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
    def test_batch_of_one_is_dpo(self, loss_type):
        args = _f32(*_logps(seed=24, n=1))
        np.testing.assert_allclose(L.dpo_loss(*args, beta=0.1, loss_type=loss_type),
                                   L.dpo_loss(*args, beta=0.1), rtol=1e-6)

    @pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
    def test_gradient_follows_the_sort(self, loss_type):
        pc, pr, rc, rr = _logps(seed=25)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(L.dpo_loss(
            *a, beta=0.1, loss_type=loss_type, label_smoothing=0.2)), argnums=(0, 1, 2, 3)))(
                *_f32(pc, pr, rc, rr))
        want = _aot_grads_np(pc, pr, rc, rr, beta=0.1, eps=0.2,
                             unpaired=loss_type == "aot_unpaired")
        for g, w in zip(grads, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------- BCO running mean
class _TRLRunningMoments:
    """The mean part of TRL <= 0.28 ``RunningMoments`` (single process), float64."""

    def __init__(self):
        self.mean, self.count = 0.0, 1e-24

    def update(self, xs):
        xs = np.atleast_1d(np.asarray(xs, np.float64))
        xs_count = xs.size
        delta = xs.mean() - self.mean
        tot_count = self.count + xs_count
        self.mean += delta * xs_count / tot_count
        self.count = tot_count


class TestBCORunningMean:
    def test_init(self):
        state = L.bco_running_mean_init()
        assert isinstance(state, L.BCORunningMean)
        for leaf in state:
            assert leaf.shape == () and leaf.dtype == jnp.float32 and float(leaf) == 0.0

    def test_update_hand_worked(self):
        state = L.bco_running_mean_update(L.bco_running_mean_init(), jnp.array([1.0, 3.0]),
                                          jnp.array([-1.0, 1.0]))  # batch mean 4 / 4 = 1
        assert float(state.mean) == 1.0 and float(state.count) == 1.0
        state = L.bco_running_mean_update(state, jnp.array([3.0, 3.0]),
                                          jnp.array([3.0, 3.0]))  # 1 + (3 - 1) / 2 = 2
        assert float(state.mean) == 2.0 and float(state.count) == 2.0

    def test_old_trl_training_loop(self):
        """TRL <= 0.28 bco_pair per step: rewards = mean(cat(beta rho_c, beta rho_r)),
        running.update(rewards), delta = running.mean, then the loss with that delta."""
        beta, running = 0.1, _TRLRunningMoments()

        @jax.jit
        def step(state, pc, pr, rc, rr):
            state = L.bco_running_mean_update(state, beta * (pc - rc), beta * (pr - rr))
            loss = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair",
                              bco_delta=state.mean)
            return state, loss

        state = L.bco_running_mean_init()
        for i in range(6):
            pc, pr, rc, rr = _logps(seed=30 + i, loc=-20.0 + i)
            running.update(np.concatenate([beta * (pc - rc), beta * (pr - rr)]).mean())
            state, got = step(state, *_f32(pc, pr, rc, rr))
            assert float(state.mean) == pytest.approx(running.mean, rel=1e-5, abs=1e-6)
            want = _np_dpo(pc, pr, rc, rr, beta=beta, loss_type="bco_pair",
                           bco_delta=running.mean)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
        assert float(state.count) == 6.0

    def test_default_delta_is_trl_1_16(self):
        args = _f32(*_logps(seed=36))
        np.testing.assert_array_equal(
            L.dpo_loss(*args, beta=0.1, loss_type="bco_pair"),
            L.dpo_loss(*args, beta=0.1, loss_type="bco_pair", bco_delta=0.0))

    def test_running_mean_carries_no_gradient(self):
        # TRL detaches the rewards before the running update: the gradient of the loss is
        # that with the running mean held constant
        pc, pr, rc, rr = _f32(*_logps(seed=37))
        state = L.bco_running_mean_update(L.bco_running_mean_init(), jnp.ones(8), jnp.ones(8))

        def through_state(pc):
            s = L.bco_running_mean_update(state, 0.1 * (pc - rc), 0.1 * (pr - rr))
            return jnp.sum(L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="bco_pair",
                                      bco_delta=s.mean))

        delta = L.bco_running_mean_update(state, 0.1 * (pc - rc), 0.1 * (pr - rr)).mean
        constant = jax.grad(lambda pc: jnp.sum(L.dpo_loss(
            pc, pr, rc, rr, beta=0.1, loss_type="bco_pair", bco_delta=delta)))(pc)
        np.testing.assert_array_equal(jax.grad(through_state)(pc), constant)
        g_state = jax.grad(lambda c: L.bco_running_mean_update(state, c, c).mean)(jnp.ones(2))
        np.testing.assert_array_equal(g_state, 0.0)

    def test_axis_name_under_shard_map_equals_the_global_batch(self):
        n_dev = jax.device_count()
        rng = np.random.default_rng(38)
        c, r = (rng.normal(0.5, 2.0, 2 * n_dev).astype(np.float32) for _ in range(2))
        c2, r2 = (rng.normal(-0.5, 2.0, 2 * n_dev).astype(np.float32) for _ in range(2))
        mesh = jax.make_mesh((n_dev,), ("data",))

        def body(c, r, c2, r2):
            s = L.bco_running_mean_update(L.bco_running_mean_init(), c, r, axis_name="data")
            s = L.bco_running_mean_update(s, c2, r2, axis_name="data")
            return s.mean[None]

        put = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (c, r, c2, r2)]
        got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 4,
                                    out_specs=P("data")))(*put)
        running = _TRLRunningMoments()
        running.update(np.concatenate([c, r]).mean())
        running.update(np.concatenate([c2, r2]).mean())
        np.testing.assert_allclose(got, np.full(n_dev, running.mean), rtol=1e-5, atol=1e-6)
        single = L.bco_running_mean_update(L.bco_running_mean_update(
            L.bco_running_mean_init(), c, r), c2, r2)
        np.testing.assert_allclose(got, np.full(n_dev, single.mean), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- gradients and extremes
class TestGradients:
    @pytest.mark.parametrize("loss_type", VARIANTS)
    def test_check_grads(self, loss_type):
        # moderate log-probs (log-ratios of about +-1), all four inputs differentiated
        args = _f32(*_logps(seed=40, n=4, loc=-2.0, scale=1.0))
        kw = _smoothing(loss_type, 0.2)
        check_grads(lambda *a: L.dpo_loss(*a, beta=0.5, loss_type=loss_type, **kw), args,
                    order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)

    @pytest.mark.parametrize("fdiv, alpha", F_DIVS)
    @pytest.mark.parametrize("loss_type", ["sigmoid", "exo_pair", "discopop"])
    def test_check_grads_f_divergence(self, loss_type, fdiv, alpha):
        args = _f32(*_logps(seed=41, n=4, loc=-2.0, scale=0.5))
        kw = _smoothing(loss_type, 0.2)
        check_grads(lambda *a: L.dpo_loss(*a, beta=0.5, loss_type=loss_type, f_divergence=fdiv,
                                          f_alpha=alpha, discopop_tau=0.5, **kw), args,
                    order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def _value_and_grads(loss_type, pc, pr, rc, rr, **kw):
    fn = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(L.dpo_loss(*a, loss_type=loss_type,
                                                                  **kw)), argnums=(0, 1, 2, 3)))
    value, grads = fn(*_f32(pc, pr, rc, rr))
    return float(value), [np.asarray(g) for g in grads]


class TestExtremes:
    # every log-ratio sign combination at magnitude `big`
    @staticmethod
    def _extreme(big):
        pc = np.array([big, -big, big, -big, 0.0, 3.0])
        pr = np.array([-big, big, big, -big, big, -3.0])
        rc = np.array([-20.0, -20.0, -big, 20.0, -20.0, 0.0])
        rr = np.full(6, -20.0)
        return pc, pr, rc, rr

    @pytest.mark.parametrize("big", [1e3, 1e4, 1e30])
    @pytest.mark.parametrize(
        "loss_type", ["exo_pair", "nca_pair", "bco_pair", "aot", "aot_unpaired", "apo_zero",
                      "apo_down"])
    def test_saturating_variants(self, loss_type, big):
        # log-sigmoid and sigmoid terms saturate: finite (and matching the reference) for any
        # finite float32 log-ratio
        pc, pr, rc, rr = self._extreme(big)
        kw = _smoothing(loss_type)
        value, grads = _value_and_grads(loss_type, pc, pr, rc, rr, beta=0.1, **kw)
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
        got = L.dpo_loss(*_f32(pc, pr, rc, rr), beta=0.1, loss_type=loss_type, **kw)
        want = _np_dpo(*(np.float32(x).astype(np.float64) for x in (pc, pr, rc, rr)),
                       beta=0.1, loss_type=loss_type, eps=kw.get("label_smoothing", 0.0))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("big", [1e3, 1e4, 1e15])
    def test_sppo_hard_is_a_squared_error(self, big):
        # finite while (rho +- 1/(2 beta))^2 fits in float32, |rho| < ~1e19
        pc, pr, rc, rr = self._extreme(big)
        value, grads = _value_and_grads("sppo_hard", pc, pr, rc, rr, beta=0.1)
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
        np.testing.assert_allclose(grads[0], 2 * ((pc - rc) - 5.0), rtol=1e-5)

    def test_discopop_within_its_exponential_range(self):
        # TRL's exp(-beta * delta) overflows float32 for beta * delta < -88.7 (there
        # inf * sigmoid(z / tau) = inf * 0 is NaN in TRL's float32 formula as here); from -80 up
        # to any positive value the loss and its gradients are finite
        z = np.array([-80.0, -40.0, -1.0, 0.0, 1.0, 40.0, 1e4, 1e30])  # beta * delta
        zeros = np.zeros_like(z)
        value, grads = _value_and_grads("discopop", z, zeros, zeros, zeros, beta=1.0)
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
        got = L.dpo_loss(*_f32(z, zeros, zeros, zeros), beta=1.0, loss_type="discopop")
        np.testing.assert_allclose(got, _np_dpo(z, zeros, zeros, zeros, beta=1.0,
                                                loss_type="discopop"), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("fdiv, alpha", [("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                             ("alpha_divergence", 2.0),
                                             ("alpha_divergence", -1.0)])
    @pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "exo_pair"])
    def test_f_divergences_at_extremes(self, loss_type, fdiv, alpha):
        # js saturates; alpha is clamped at exp(80) as in TRL: finite for log-ratios +-1e4
        pc, pr, rc, rr = self._extreme(1e4)
        kw = _smoothing(loss_type)
        value, grads = _value_and_grads(loss_type, pc, pr, rc, rr, beta=0.1, f_divergence=fdiv,
                                        f_alpha=alpha, **kw)
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)

    def test_forward_kl_within_its_exponential_range(self):
        # 1 - e^{-rho} is finite for rho > -88 in float32 (TRL's formula as here)
        rho = np.array([-80.0, -10.0, 0.0, 10.0, 1e4])
        zeros = np.zeros_like(rho)
        for loss_type in ("sigmoid", "exo_pair", "discopop"):
            kw = _smoothing(loss_type)
            value, grads = _value_and_grads(loss_type, zeros, rho, zeros, zeros, beta=1e-3,
                                            f_divergence="forward_kl", **kw)
            assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)

    def test_alpha_divergence_exponent_is_clamped_at_80(self):
        # alpha = 2: s = e^{min(rho, 80)} - 1. Beyond the clamp the score is constant (TRL's
        # torch.clamp): the value is e^80 - 1 and the gradient through it is zero
        z = jnp.zeros(2)
        pr = jnp.array([100.0, 1e4])
        value = L.dpo_loss(z, pr, z, z, beta=1.0, f_divergence="alpha_divergence", f_alpha=2.0)
        np.testing.assert_allclose(value, np.full(2, math.expm1(80.0)), rtol=1e-5)
        g = jax.grad(lambda p: jnp.sum(L.dpo_loss(z, p, z, z, beta=1.0, loss_type="hinge",
                                                  f_divergence="alpha_divergence",
                                                  f_alpha=2.0)))(pr)
        np.testing.assert_array_equal(g, 0.0)
        # just below the clamp the gradient is beta * e^rho
        g = jax.grad(lambda p: jnp.sum(L.dpo_loss(z[:1], p, z[:1], z[:1], beta=1.0,
                                                  loss_type="hinge",
                                                  f_divergence="alpha_divergence",
                                                  f_alpha=2.0)))(jnp.array([70.0]))
        np.testing.assert_allclose(g, [math.exp(70.0)], rtol=1e-5)


# ---------------------------------------------------------------------------- shapes, dtypes
class TestShapesAndDtypes:
    @pytest.mark.parametrize("loss_type", VARIANTS)
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float64])
    def test_unreduced_float32(self, loss_type, dtype):
        pc, pr, rc, rr = _logps(seed=50, n=5)
        kw = _smoothing(loss_type)
        xs = [np.asarray(x, dtype) if dtype is np.float64 else jnp.asarray(x, dtype)
              for x in (pc, pr, rc, rr)]
        got = L.dpo_loss(*xs, beta=0.1, loss_type=loss_type, **kw)
        assert got.shape == (5,) and got.dtype == jnp.float32
        # computed in float32 from the rounded inputs
        rounded = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in xs]
        want = _np_dpo(*rounded, beta=0.1, loss_type=loss_type,
                       eps=kw.get("label_smoothing", 0.0))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)

    @pytest.mark.parametrize("loss_type", VARIANTS)
    def test_vmap_over_a_leading_axis(self, loss_type):
        # rows are independent batches (AOT sorts within each row)
        rng = np.random.default_rng(51)
        xs = [rng.normal(-20.0, 5.0, (3, 4)).astype(np.float32) for _ in range(4)]
        kw = _smoothing(loss_type)
        got = jax.vmap(lambda *a: L.dpo_loss(*a, beta=0.1, loss_type=loss_type, **kw))(
            *map(jnp.asarray, xs))
        assert got.shape == (3, 4)
        for i in range(3):
            want = _np_dpo(*(x[i].astype(np.float64) for x in xs), beta=0.1,
                           loss_type=loss_type, eps=kw.get("label_smoothing", 0.0))
            np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ errors
class TestErrors:
    ARGS = _f32(*_logps(n=2))

    def test_unknown_loss_type_names_the_allowed_values(self):
        with pytest.raises(ValueError, match=r"loss_type='kto' is not supported; allowed values:"
                                             r".*'exo_pair'.*'discopop'"):
            L.dpo_loss(*self.ARGS, loss_type="kto")

    def test_unknown_f_divergence_names_the_allowed_values(self):
        with pytest.raises(ValueError, match=r"f_divergence='hellinger' is not supported; "
                                             r"allowed values: 'reverse_kl', 'forward_kl'"):
            L.dpo_loss(*self.ARGS, f_divergence="hellinger")

    @pytest.mark.parametrize("eps", [0.0, 1.0, -0.1])
    def test_exo_needs_label_smoothing_in_the_open_unit_interval(self, eps):
        # TRL refuses label_smoothing == 0 for exo_pair (log 0 in its KL target)
        with pytest.raises(ValueError, match=r"exo_pair' needs 0 < label_smoothing < 1"):
            L.dpo_loss(*self.ARGS, loss_type="exo_pair", label_smoothing=eps)

    def test_exo_default_label_smoothing_is_refused(self):
        with pytest.raises(ValueError, match="label_smoothing"):
            L.dpo_loss(*self.ARGS, loss_type="exo_pair")

    @pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard", "aot",
                                           "aot_unpaired", "apo_zero", "apo_down"])
    @pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
    def test_f_divergence_only_where_trl_supports_it(self, loss_type, fdiv):
        with pytest.raises(ValueError, match=f"f_divergence='{fdiv}' is not supported by "
                                             f"loss_type='{loss_type}'"):
            L.dpo_loss(*self.ARGS, loss_type=loss_type, f_divergence=fdiv,
                       **_smoothing(loss_type))

    @pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                                           "apo_down", "discopop"])
    def test_label_smoothing_is_refused_where_unused(self, loss_type):
        with pytest.raises(ValueError, match=f"label_smoothing is not used by loss_type="
                                             f"'{loss_type}'"):
            L.dpo_loss(*self.ARGS, loss_type=loss_type, label_smoothing=0.1)

    @pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair", "aot"])
    def test_bco_delta_only_for_bco(self, loss_type):
        with pytest.raises(ValueError, match=f"bco_delta is only used by loss_type='bco_pair', "
                                             f"not '{loss_type}'"):
            L.dpo_loss(*self.ARGS, loss_type=loss_type, bco_delta=1.0)

    def test_wrong_rank_names_the_argument(self):
        pc, pr, rc, rr = self.ARGS
        with pytest.raises(AssertionError, match="policy_chosen_logps"):
            L.dpo_loss(pc[:, None], pr, rc, rr, loss_type="nca_pair")

    def test_mismatched_shapes_name_the_arguments(self):
        pc, pr, rc, rr = self.ARGS
        with pytest.raises(AssertionError, match=r"ref_rejected_logps=\(3,\)"):
            L.dpo_loss(pc, pr, rc, jnp.zeros(3), loss_type="aot")

    def test_bco_running_mean_update_checks_shapes(self):
        state = L.bco_running_mean_init()
        with pytest.raises(AssertionError, match="chosen_rewards"):
            L.bco_running_mean_update(state, jnp.zeros((2, 2)), jnp.zeros((2, 2)))
        with pytest.raises(AssertionError, match="rejected_rewards"):
            L.bco_running_mean_update(state, jnp.zeros(2), jnp.zeros(3))


def test_alpha_divergence_clamp_passes_the_full_gradient_at_the_bound():
    """TRL clamps (alpha - 1) * rho at 80 with torch.clamp, whose gradient is 1 up to and at the
    bound (jnp.minimum would halve it at the tie): d/dp [e^{(alpha-1) p} - 1] / (alpha - 1) at
    (alpha - 1) p = 80 is e^80."""
    z = jnp.zeros(1)
    grad = jax.grad(lambda p: jnp.sum(L.dpo_loss(
        z, p, z, z, beta=1.0, loss_type="hinge", f_divergence="alpha_divergence",
        f_alpha=2.0)))(jnp.array([80.0]))
    np.testing.assert_allclose(np.asarray(grad, np.float64), [math.exp(80.0)], rtol=1e-5)
    beyond = jax.grad(lambda p: jnp.sum(L.dpo_loss(
        z, p, z, z, beta=1.0, loss_type="hinge", f_divergence="alpha_divergence",
        f_alpha=2.0)))(jnp.array([80.5]))
    np.testing.assert_array_equal(beyond, 0.0)
