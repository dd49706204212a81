"""The distillation loss as training computes it: the mask, the temperature and the mean over positions.

    kd_loss(s, t, labels, temperature) -> (L, dL_ds)

s, t (B, T, V) student and teacher logits, labels (B, T) with -100 where nothing is learnt (the prompt,
the padding). With the temperature tau (T counts positions, as in the notebooks), p = softmax(t / tau)
and q = softmax(s / tau) at each position,

    L = (1/N) sum over counted positions (labels != -100) of KL(p || q),    N = the number counted,

one number, and dL_ds (B, T, V), zero at the positions that do not count. The reference is
minitodi.core.losses.fkl with mask = labels != -100, as the training loop calls it (no tau^2 factor, as in
the paper's code). The mistakes are the computation written out with one thing wrong.
"""

import numpy as np

from ..core import losses
from ..core.layers import IGNORE_INDEX
from ..core.losses import log_softmax
from .grading import Case, Exercise, Mistake, Output


def kd_loss_reference(s, t, labels, temperature):
    """(L as a 0-d array, dL/ds) from minitodi.core.losses.fkl with the mask labels != -100."""
    loss, grad = losses.fkl(s, t, labels != IGNORE_INDEX, temperature=temperature)
    return np.asarray(loss, dtype=np.float64), grad


def _kl_per_position(s_scaled, t_scaled):
    """(D (B, T), dD/d s_scaled (B, T, V)) of KL(softmax(t_scaled) || softmax(s_scaled)): D and q - p."""
    lp = log_softmax(t_scaled)
    lq = log_softmax(s_scaled)
    p = np.exp(lp)
    q = np.exp(lq)
    return (p * (lp - lq)).sum(axis=-1), q - p


def _counted(labels):
    """(the counted positions as 0/1 floats (B, T, 1), their number N)."""
    counted = labels != IGNORE_INDEX
    return counted[..., None].astype(np.float64), int(counted.sum())


def _mask_ignored(s, t, labels, temperature):
    D, g = _kl_per_position(s / temperature, t / temperature)
    return D.mean(), g / (D.size * temperature)


def _divided_by_every_position(s, t, labels, temperature):
    D, g = _kl_per_position(s / temperature, t / temperature)
    counted, _ = _counted(labels)
    return (D * counted[..., 0]).sum() / D.size, g * counted / (D.size * temperature)


def _sum_not_mean(s, t, labels, temperature):
    D, g = _kl_per_position(s / temperature, t / temperature)
    counted, _ = _counted(labels)
    return (D * counted[..., 0]).sum(), g * counted / temperature


def _student_not_divided(s, t, labels, temperature):
    D, g = _kl_per_position(s, t / temperature)
    counted, N = _counted(labels)
    return (D * counted[..., 0]).sum() / N, g * counted / N  # s enters unscaled: no 1/tau in the chain rule


def _teacher_not_divided(s, t, labels, temperature):
    D, g = _kl_per_position(s / temperature, t)
    counted, N = _counted(labels)
    return (D * counted[..., 0]).sum() / N, g * counted / (N * temperature)


def _tau_squared(s, t, labels, temperature):
    L, grad = kd_loss_reference(s, t, labels, temperature)
    return L * temperature**2, grad * temperature**2


def _chain_rule_one_over_t_missing(s, t, labels, temperature):
    L, grad = kd_loss_reference(s, t, labels, temperature)
    return L, grad * temperature


GRADIENT = ("dL/ds = (q - p) / (N tau) at the counted positions, 0 elsewhere, with p = softmax(t / tau), "
            "q = softmax(s / tau), tau the temperature and N the number of counted positions.")

KD_LOSS_MISTAKES = (
    Mistake("mask_ignored",
            "your L is the mean over every position, the masked ones (labels == -100) included.",
            "Only positions with labels != -100 count, in the sum and in N: L = (1/N) sum over counted "
            "positions of KL(p || q). A prompt or padding position has a teacher distribution too, but "
            "nothing there is to be learnt. " + GRADIENT,
            _mask_ignored),
    Mistake("divided_by_every_position",
            "your L sums the counted positions but divides by every position, B T, not by their number N.",
            "The mean is over the counted positions: N = (labels != -100).sum(), not labels.size. Dividing "
            "by B T makes the loss depend on how much padding the batch has. " + GRADIENT,
            _divided_by_every_position),
    Mistake("sum_not_mean",
            "your L is the sum over the counted positions, not their mean: the 1/N is missing.",
            "L = (1/N) sum over counted positions of KL(p || q), so the gradient carries 1/N too. "
            + GRADIENT,
            _sum_not_mean),
    Mistake("student_temperature_forgotten",
            "your q is softmax(s): the temperature divides the teacher's logits but not the student's.",
            "The temperature applies to both sides: p = softmax(t / tau) and q = softmax(s / tau). Then s "
            "enters through s / tau, and the chain rule adds a 1/tau to the gradient. " + GRADIENT,
            _student_not_divided),
    Mistake("teacher_temperature_forgotten",
            "your p is softmax(t): the temperature divides the student's logits but not the teacher's.",
            "The temperature applies to both sides: p = softmax(t / tau) and q = softmax(s / tau); the "
            "teacher's distribution is softened as much as the student's. " + GRADIENT,
            _teacher_not_divided),
    Mistake("tau_squared",
            "your L and dL_ds carry a factor tau^2 (the temperature squared).",
            "Hinton et al. multiply the soft loss by tau^2 to keep its gradient's scale when tau "
            "changes; the ToDi paper's code does not, and neither does minitodi: L = (1/N) sum over "
            "counted positions of KL(p || q), with no factor. " + GRADIENT,
            _tau_squared),
    Mistake("chain_rule_temperature",
            "your dL_ds is tau times too large: the 1/tau of the chain rule through s / tau is missing.",
            "q = softmax(s / tau), so dL/ds = dL/d(s / tau) * 1/tau. " + GRADIENT,
            _chain_rule_one_over_t_missing),
)


def _kd_cases():
    """Prompt and padding masked at tau = 2; every position counted at tau = 1; one counted at tau = 0.5."""
    rng = np.random.default_rng(13)
    masked = np.array([[-100, -100, 3, 1, -100], [-100, 2, 4, 0, 5]])
    every = np.array([[1, 3], [0, 0], [2, 1]])
    one = np.array([[-100, -100, 1, -100]])
    cases = []
    for what, labels, V, temperature in (("prompt and padding masked", masked, 6, 2.0),
                                         ("every position counted", every, 4, 1.0),
                                         ("one counted position", one, 3, 0.5)):
        shape = (*labels.shape, V)
        s = rng.standard_normal(shape)
        t = 2.0 * rng.standard_normal(shape)
        cases.append(Case(what, {"s": s, "t": t, "labels": labels, "temperature": temperature}))
    return cases


EXERCISES = (
    Exercise("kd_loss", "kd_loss(s, t, labels, temperature) -> (L, dL_ds)",
             (Output("L", "a number (shape ()): the mean over the counted positions"),
              Output("dL_ds", "(B, T, V), like s")),
             kd_loss_reference, _kd_cases, KD_LOSS_MISTAKES),
)
