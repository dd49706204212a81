"""The layers' backward passes: linear, layer norm, GELU, cross-entropy and RMSNorm.

Each exercise gives the learner the forward's inputs and the incoming gradient dy and asks for the
gradients of the inputs and parameters. The references are minitodi.core.layers' forward and backward;
every mistake is the backward written out with one thing wrong.
"""

import math

import numpy as np

from ..core import layers
from ..core.losses import log_softmax
from .grading import Case, Exercise, Mistake, Output

# ---- linear: y = x @ w + b ------------------------------------------------------------------------


def linear_reference(dy, x, w, b):
    """(dx, dw, db) from minitodi.core.layers' linear_forward and linear_backward."""
    _, cache = layers.linear_forward(x, w, b)
    return layers.linear_backward(dy, cache)


def _linear_cases():
    """Random shapes; one row; repeated rows of x with a square w (a transposed dw has the right shape)."""
    rng = np.random.default_rng(7)

    def case(what, N, Cin, Cout):
        x = rng.standard_normal((N, Cin))
        w = rng.standard_normal((Cin, Cout))
        b = rng.standard_normal(Cout)
        dy = rng.standard_normal((N, Cout))
        return what, x, w, b, dy

    cases = [case("random", 5, 3, 4), case("one row", 1, 4, 2), case("repeated rows, square w", 4, 3, 3)]
    what, x, w, b, dy = cases[2]
    x[2] = x[0]
    return [Case(what, {"dy": dy, "x": x, "w": w, "b": b}) for what, x, w, b, dy in cases]


LINEAR_MISTAKES = (
    Mistake("db_not_summed",
            "your db is dy itself, one row per position: it is not summed over the rows.",
            "b is added to every row, y[n] = x[n] w + b, so every row's dy[n] reaches b: db = sum_n dy[n], "
            "of shape (Cout,) like b.",
            lambda dy, x, w, b: (dy @ w.T, x.T @ dy, dy.copy())),
    Mistake("db_averaged",
            "your db is the mean of dy over the rows; it is their sum.",
            "y[n] = x[n] w + b adds b to every row with weight 1, so db = sum_n dy[n]. If the loss is a "
            "mean, its 1/N is already inside dy.",
            lambda dy, x, w, b: (dy @ w.T, x.T @ dy, dy.mean(axis=0))),
    Mistake("dw_transposed",
            "your dw is transposed: dy^T x, shaped (Cout, Cin), instead of x^T dy.",
            "y[n, j] = sum_i x[n, i] w[i, j] + b[j], so dw[i, j] = sum_n x[n, i] dy[n, j]: dw = x^T dy, of "
            "shape (Cin, Cout) like w. (A gradient always has the shape of what it differentiates.)",
            lambda dy, x, w, b: (dy @ w.T, dy.T @ x, dy.sum(axis=0))),
    Mistake("dw_averaged",
            "your dw is x^T dy / N: divided by the number of rows.",
            "dw = x^T dy = sum_n outer(x[n], dy[n]): each row adds its own contribution and nothing divides "
            "it. If the loss is a mean, its 1/N is already inside dy.",
            lambda dy, x, w, b: (dy @ w.T, x.T @ dy / x.shape[0], dy.sum(axis=0))),
)


# ---- layer norm: y = xhat * w + b, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps) ------------


def layernorm_reference(dy, x, w, b, eps):
    """(dx, dw, db) from minitodi.core.layers' layernorm_forward and layernorm_backward."""
    _, cache = layers.layernorm_forward(x, w, b, eps)
    return layers.layernorm_backward(dy, cache)


def _centred(x, eps, divisor):
    """(xhat, rstd) with the variance sum((x - mean)^2) / divisor over the row (C, or C - 1)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((centred * centred).sum(axis=-1, keepdims=True) / divisor + eps)
    return centred * rstd, rstd


def _row_mean(x):
    return x.mean(axis=-1, keepdims=True)


def _ln_normalisation_constant(dy, x, w, b, eps):
    xhat, rstd = _centred(x, eps, x.shape[-1])
    return rstd * dy * w, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def _ln_mean_term_dropped(dy, x, w, b, eps):
    xhat, rstd = _centred(x, eps, x.shape[-1])
    dxhat = dy * w
    return rstd * (dxhat - xhat * _row_mean(dxhat * xhat)), (dy * xhat).sum(axis=0), dy.sum(axis=0)


def _ln_variance_term_dropped(dy, x, w, b, eps):
    xhat, rstd = _centred(x, eps, x.shape[-1])
    dxhat = dy * w
    return rstd * (dxhat - _row_mean(dxhat)), (dy * xhat).sum(axis=0), dy.sum(axis=0)


def _ln_w_forgotten(dy, x, w, b, eps):
    xhat, rstd = _centred(x, eps, x.shape[-1])
    dxhat = dy  # the mistake: dy * w
    dx = rstd * (dxhat - _row_mean(dxhat) - xhat * _row_mean(dxhat * xhat))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def _ln_dw_with_x(dy, x, w, b, eps):
    dx, _, db = layernorm_reference(dy, x, w, b, eps)
    return dx, (dy * x).sum(axis=0), db


def _ln_unbiased(dy, x, w, b, eps):
    C = x.shape[-1]
    xhat, rstd = _centred(x, eps, C - 1)
    dxhat = dy * w
    dx = rstd * (dxhat - _row_mean(dxhat) - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / (C - 1))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def _layernorm_cases():
    """Random rows; a constant row (variance 0) with a large eps; rows with a large mean and spread."""
    rng = np.random.default_rng(8)

    def case(what, N, C, eps, loc=0.0, scale=1.0):
        x = loc + scale * rng.standard_normal((N, C))
        w = 1.0 + 0.3 * rng.standard_normal(C)
        b = 0.3 * rng.standard_normal(C)
        dy = rng.standard_normal((N, C))
        return Case(what, {"dy": dy, "x": x, "w": w, "b": b, "eps": eps})

    cases = [case("random", 4, 6, 1e-5), case("a constant row", 3, 5, 0.1),
             case("large mean and spread", 2, 8, 1e-5, loc=5.0, scale=10.0)]
    cases[1].inputs["x"][1] = 2.0
    return cases


NORM_W_FORGOTTEN = ("your dx was computed from dy, not from dxhat = dy * w.",
                    "y = xhat * w (+ b), so the gradient reaching xhat is dxhat = dy * w, elementwise; dx is "
                    "then computed from dxhat.")
NORM_DW_WITH_X = ("your dw is the sum over rows of dy * x; it is the sum of dy * xhat.",
                  "w multiplies the normalised xhat, not x: y = xhat * w (+ b), so dw = sum over rows of "
                  "dy * xhat.")
LAYERNORM_DX = ("dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat * xhat)), the means over the row, "
                "dxhat = dy * w.")

LAYERNORM_MISTAKES = (
    Mistake("normalisation_constant",
            "your dx is rstd * dy * w: the mean and rstd were treated as constants.",
            "mean and rstd depend on every x_j of the row: d xhat_i / d x_j = rstd (delta_ij - 1/C - "
            "xhat_i xhat_j / C). This gives " + LAYERNORM_DX,
            _ln_normalisation_constant),
    Mistake("mean_term_dropped",
            "your dx lacks the term -mean(dxhat): the derivative of the mean was dropped.",
            "x - mean(x) moves with every x_j: d(x_i - mean) / d x_j = delta_ij - 1/C, which contributes "
            "-rstd mean(dxhat). In full, " + LAYERNORM_DX,
            _ln_mean_term_dropped),
    Mistake("variance_term_dropped",
            "your dx lacks the term -xhat mean(dxhat * xhat): the derivative of rstd was dropped.",
            "rstd = 1 / sqrt(var + eps) depends on every x_j: d rstd / d x_j = -rstd^3 (x_j - mean) / C, "
            "which contributes -rstd xhat mean(dxhat * xhat). In full, " + LAYERNORM_DX,
            _ln_variance_term_dropped),
    Mistake("w_forgotten", NORM_W_FORGOTTEN[0], NORM_W_FORGOTTEN[1] + " " + LAYERNORM_DX, _ln_w_forgotten),
    Mistake("dw_with_x", *NORM_DW_WITH_X, _ln_dw_with_x),
    Mistake("unbiased_variance",
            "your answer uses the unbiased variance, divided by C - 1.",
            "Layer norm (PyTorch's included) divides by C: var = mean((x - mean(x))^2), NumPy's default "
            "ddof=0, not torch.var's default. The C appears twice: in rstd, and as the 1/C of the term "
            "xhat mean(dxhat * xhat).",
            _ln_unbiased),
)


# ---- GELU, GPT-2's tanh form: y = 0.5 x (1 + tanh(u)), u = k (x + a x^3) ----------------------------

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_reference(dy, x):
    """dx from minitodi.core.layers' gelu_forward and gelu_backward."""
    _, cache = layers.gelu_forward(x)
    return layers.gelu_backward(dy, cache)


def _tanh_u(x):
    return np.tanh(GELU_K * (x + GELU_A * x**3))


def _gelu_x_dtanh_term_missing(dy, x):
    return dy * 0.5 * (1.0 + _tanh_u(x))


def _gelu_cubic_term_missing(dy, x):
    tanh_u = _tanh_u(x)
    return dy * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * GELU_K)


def _gelu_cubic_factor_3_missing(dy, x):
    tanh_u = _tanh_u(x)
    return dy * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * GELU_K * (1.0 + GELU_A * x**2))


def _gelu_tanh_derivative(dy, x):
    tanh_u = _tanh_u(x)
    du_dx = GELU_K * (1.0 + 3.0 * GELU_A * x**2)
    return dy * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u) * du_dx)


def _gelu_dy_not_multiplied(dy, x):
    tanh_u = _tanh_u(x)
    du_dx = GELU_K * (1.0 + 3.0 * GELU_A * x**2)
    return 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * du_dx


def _gelu_exact(dy, x):
    """The derivative of the exact GELU, x Phi(x): Phi(x) + x phi(x) (close to the tanh form, not equal)."""
    phi_cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    phi_pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (phi_cdf + x * phi_pdf)


def _gelu_cases():
    """Random values; edge values (0, tiny, saturated at +-10); a vector of evenly spaced values."""
    rng = np.random.default_rng(9)
    x1 = 2.0 * rng.standard_normal((3, 5))
    x2 = np.array([[0.0, 1e-3, -1e-3, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0]])
    x3 = np.linspace(-6.0, 6.0, 13)
    return [Case(what, {"dy": rng.standard_normal(x.shape), "x": x})
            for what, x in [("random", x1), ("edge values", x2), ("a vector from -6 to 6", x3)]]


GELU_DERIVATIVE = ("gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) k (1 + 3 a x^2), with "
                   "u = k (x + a x^3), k = sqrt(2/pi), a = 0.044715, and dx = dy * gelu'(x).")

GELU_MISTAKES = (
    Mistake("x_dtanh_term_missing",
            "your dx is dy * 0.5 (1 + tanh(u)): the term from differentiating tanh(u) is missing.",
            "y = 0.5 x (1 + tanh u) is a product of x and (1 + tanh u); the product rule gives two terms. "
            + GELU_DERIVATIVE,
            _gelu_x_dtanh_term_missing),
    Mistake("cubic_term_missing",
            "your du/dx is k: the derivative of the cubic term a x^3 is missing.",
            "u = k (x + a x^3), so du/dx = k (1 + 3 a x^2). " + GELU_DERIVATIVE,
            _gelu_cubic_term_missing),
    Mistake("cubic_factor_3_missing",
            "your du/dx is k (1 + a x^2): the 3 of d(x^3)/dx = 3 x^2 is missing.",
            "u = k (x + a x^3), so du/dx = k (1 + 3 a x^2). (The term is small near 0, so the error grows "
            "with |x|: largest around |x| = 2, where the tanh has not yet saturated.) " + GELU_DERIVATIVE,
            _gelu_cubic_factor_3_missing),
    Mistake("tanh_derivative",
            "your derivative of tanh is 1 - tanh(u); it is 1 - tanh(u)^2.",
            "d tanh(u) / du = 1 - tanh(u)^2 (which is 1 / cosh(u)^2). " + GELU_DERIVATIVE,
            _gelu_tanh_derivative),
    Mistake("dy_not_multiplied",
            "your dx is gelu'(x) alone: it is not multiplied by the incoming gradient dy.",
            "The chain rule: dL/dx = dL/dy * dy/dx, elementwise. " + GELU_DERIVATIVE,
            _gelu_dy_not_multiplied),
    Mistake("exact_gelu",
            "your dx is the derivative of the exact GELU, x Phi(x), not of GPT-2's tanh approximation.",
            "GPT-2 uses y = 0.5 x (1 + tanh(u)), close to x Phi(x) but not equal (about 1e-3 apart); "
            "differentiate that one. " + GELU_DERIVATIVE,
            _gelu_exact),
)


# ---- cross-entropy: L = -(1/N) sum_n log q[n, t_n], q = softmax(logits) ------------------------------


def cross_entropy_reference(logits, targets):
    """dlogits from minitodi.core.layers' cross_entropy_forward and cross_entropy_backward (dL = 1)."""
    _, cache = layers.cross_entropy_forward(logits, targets)
    return layers.cross_entropy_backward(1.0, cache)


def _softmax_onehot(logits, targets):
    """(q, onehot(targets), N) of the cross-entropy."""
    q = np.exp(log_softmax(logits))
    onehot = np.zeros_like(logits)
    onehot[np.arange(len(targets)), targets] = 1.0
    return q, onehot, logits.shape[0]


def _ce_one_over_n_missing(logits, targets):
    q, onehot, _ = _softmax_onehot(logits, targets)
    return q - onehot


def _ce_one_hot_not_subtracted(logits, targets):
    q, _, N = _softmax_onehot(logits, targets)
    return q / N


def _ce_wrong_sign(logits, targets):
    q, onehot, N = _softmax_onehot(logits, targets)
    return (onehot - q) / N


def _ce_softmax_forgotten(logits, targets):
    _, onehot, N = _softmax_onehot(logits, targets)
    return -onehot / N


def _cross_entropy_cases():
    """Random rows; a single row; confident logits (x4) whose targets are all the same class."""
    rng = np.random.default_rng(10)
    logits1 = rng.standard_normal((5, 7))
    targets1 = rng.integers(0, 7, 5)
    logits2 = rng.standard_normal((1, 3))
    targets2 = np.array([1])
    logits3 = 4.0 * rng.standard_normal((6, 4))
    targets3 = np.full(6, 2)
    return [Case("random", {"logits": logits1, "targets": targets1}),
            Case("one row", {"logits": logits2, "targets": targets2}),
            Case("confident logits, one target class", {"logits": logits3, "targets": targets3})]


CROSS_ENTROPY_GRADIENT = "dlogits = (q - onehot(t)) / N, with q = softmax(logits) row by row."

CROSS_ENTROPY_MISTAKES = (
    Mistake("one_over_n_missing",
            "your dlogits is q - onehot(targets): the 1/N of the mean is missing.",
            "The loss is the mean over the N rows, L = -(1/N) sum_n log q[n, t_n], so every row's gradient "
            "carries 1/N: " + CROSS_ENTROPY_GRADIENT,
            _ce_one_over_n_missing),
    Mistake("one_hot_not_subtracted",
            "your dlogits is q / N: the one-hot of the targets is not subtracted.",
            "-log q[n, t] = -logits[n, t] + log sum_v exp(logits[n, v]): the first term gives -1 at the "
            "target, the second gives q. So " + CROSS_ENTROPY_GRADIENT,
            _ce_one_hot_not_subtracted),
    Mistake("wrong_sign",
            "your dlogits has the wrong sign: (onehot(targets) - q) / N.",
            "A check of the sign: raising the target's logit lowers the loss, so its derivative, "
            "(q_t - 1) / N, is negative. " + CROSS_ENTROPY_GRADIENT,
            _ce_wrong_sign),
    Mistake("softmax_forgotten",
            "your dlogits is -onehot(targets) / N: the softmax's normalisation is missing.",
            "log q[n, t] = logits[n, t] - log sum_v exp(logits[n, v]), and the log-sum-exp depends on every "
            "logit of the row, with derivative q. So " + CROSS_ENTROPY_GRADIENT,
            _ce_softmax_forgotten),
)


# ---- RMSNorm: y = xhat * w, xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) ------------------------


def rmsnorm_reference(dy, x, w, eps):
    """(dx, dw) from minitodi.core.layers' rmsnorm_forward and rmsnorm_backward."""
    _, cache = layers.rmsnorm_forward(x, w, eps)
    return layers.rmsnorm_backward(dy, cache)


def _rms_scaled(x, eps):
    """(xhat, rstd) of RMSNorm."""
    rstd = 1.0 / np.sqrt(_row_mean(x * x) + eps)
    return x * rstd, rstd


def _rms_xhat_term_dropped(dy, x, w, eps):
    xhat, rstd = _rms_scaled(x, eps)
    return rstd * dy * w, (dy * xhat).sum(axis=0)


def _rms_w_forgotten(dy, x, w, eps):
    xhat, rstd = _rms_scaled(x, eps)
    dxhat = dy  # the mistake: dy * w
    return rstd * (dxhat - xhat * _row_mean(dxhat * xhat)), (dy * xhat).sum(axis=0)


def _rms_dw_with_x(dy, x, w, eps):
    dx, _ = rmsnorm_reference(dy, x, w, eps)
    return dx, (dy * x).sum(axis=0)


def _rms_mean_subtracted(dy, x, w, eps):
    xhat, rstd = _rms_scaled(x, eps)
    dxhat = dy * w
    dx = rstd * (dxhat - _row_mean(dxhat) - xhat * _row_mean(dxhat * xhat))
    return dx, (dy * xhat).sum(axis=0)


def _rmsnorm_cases():
    """Random rows; a row of zeros with a large eps; large values."""
    rng = np.random.default_rng(12)

    def case(what, N, C, eps, scale=1.0):
        x = scale * rng.standard_normal((N, C))
        w = 1.0 + 0.3 * rng.standard_normal(C)
        dy = rng.standard_normal((N, C))
        return Case(what, {"dy": dy, "x": x, "w": w, "eps": eps})

    cases = [case("random", 4, 6, 1e-6), case("a row of zeros", 3, 5, 0.1),
             case("large values", 2, 8, 1e-6, scale=10.0)]
    cases[1].inputs["x"][1] = 0.0
    return cases


RMSNORM_DX = "dx = rstd (dxhat - xhat mean(dxhat * xhat)), the mean over the row, dxhat = dy * w."

RMSNORM_MISTAKES = (
    Mistake("xhat_term_dropped",
            "your dx is rstd * dy * w: the term from rstd's dependence on x is missing.",
            "rstd = 1 / sqrt(mean(x^2) + eps) depends on every x_j of the row: d rstd / d x_j = "
            "-rstd^3 x_j / C, so d xhat_i / d x_j = rstd (delta_ij - xhat_i xhat_j / C) and " + RMSNORM_DX,
            _rms_xhat_term_dropped),
    Mistake("w_forgotten", NORM_W_FORGOTTEN[0], NORM_W_FORGOTTEN[1] + " " + RMSNORM_DX, _rms_w_forgotten),
    Mistake("dw_with_x", *NORM_DW_WITH_X, _rms_dw_with_x),
    Mistake("mean_subtracted",
            "your dx subtracts mean(dxhat), as layer norm's does; RMSNorm has no mean to differentiate.",
            "RMSNorm divides by the root mean square without centring x first, so layer norm's -mean(dxhat) "
            "term does not appear: " + RMSNORM_DX,
            _rms_mean_subtracted),
)


# ---- the exercises --------------------------------------------------------------------------------

_NORM_OUTPUTS = (Output("dx", "(N, C), like x"), Output("dw", "(C,), like w"))

LINEAR = Exercise("linear_backward", "linear_backward(dy, x, w, b) -> (dx, dw, db)",
                  (Output("dx", "(N, Cin), like x"), Output("dw", "(Cin, Cout), like w"),
                   Output("db", "(Cout,), like b")),
                  linear_reference, _linear_cases, LINEAR_MISTAKES)
LAYERNORM = Exercise("layernorm_backward", "layernorm_backward(dy, x, w, b, eps) -> (dx, dw, db)",
                     (*_NORM_OUTPUTS, Output("db", "(C,), like b")),
                     layernorm_reference, _layernorm_cases, LAYERNORM_MISTAKES)
GELU = Exercise("gelu_backward", "gelu_backward(dy, x) -> dx", (Output("dx", "like x"),),
                gelu_reference, _gelu_cases, GELU_MISTAKES)
CROSS_ENTROPY = Exercise("cross_entropy_backward", "cross_entropy_backward(logits, targets) -> dlogits",
                         (Output("dlogits", "(N, V), like logits"),),
                         cross_entropy_reference, _cross_entropy_cases, CROSS_ENTROPY_MISTAKES)
RMSNORM = Exercise("rmsnorm_backward", "rmsnorm_backward(dy, x, w, eps) -> (dx, dw)", _NORM_OUTPUTS,
                   rmsnorm_reference, _rmsnorm_cases, RMSNORM_MISTAKES)
