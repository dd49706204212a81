"""Check three PyTorch ToDi losses against minitodi: one right, two with a bug each, and what is said.

    python examples/check_your_loss.py       # exit 1 if a verdict is off; says it is skipped without PyTorch
    minitodi conformance examples/check_your_loss.py:todi_t_squared --loss todi    # one of them, from the CLI

The three are written the way public distillation code writes them: log-softmaxes in float32, a weight
from the log-ratio, -inf entries zeroed with masked_fill, a sum over positions divided by the counted ones.

- ``todi_float32``: ToDi as the official code computes it, float32, weight detached. It passes on logits
  that are never -inf (``neginf=False``). Where both logits are -inf its gradient is NaN, as the official
  code's is (masked_fill after the product: 0 * NaN = NaN in the backward pass): with that case in, it
  fails, and the report says where.
- ``todi_weight_attached``: the same without ``.detach()``: the value is the same function, but autograd
  now differentiates through the weight, so the gradient is FKL's plus RKL's (at beta = 1).
- ``todi_t_squared``: the same times T^2, the habit of classification distillation (Hinton et al.);
  ToDi's official code applies no such factor. A library that means it says ``t_squared=True``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minitodi.conformance import check  # noqa: E402

try:
    import torch
except ImportError:  # PyTorch is no dependency of minitodi: say so, as a skipped test would
    print("check_your_loss.py checks PyTorch losses: PyTorch is not installed (pip install torch); skipped")
    sys.exit(0)


def _todi(student_logits, teacher_logits, mask, temperature, detach_weight=True):
    """Per-position ToDi summed over the vocabulary, then the mean over positions where mask is True."""
    s, t = student_logits / temperature, teacher_logits / temperature
    q, log_q = torch.softmax(s, -1, dtype=torch.float32), torch.log_softmax(s, -1, dtype=torch.float32)
    p, log_p = torch.softmax(t, -1, dtype=torch.float32), torch.log_softmax(t, -1, dtype=torch.float32)
    weight = torch.sigmoid(log_p - log_q)          # a = sigmoid(log p/q): 1 where the student underestimates
    if detach_weight:
        weight = weight.detach()
    per_token = weight * p * (log_p - log_q) + (1 - weight) * q * (log_q - log_p)
    per_position = per_token.masked_fill(s.isinf() | t.isinf(), 0.0).sum(-1)
    return per_position.masked_fill(~mask, 0.0).sum() / mask.sum()


def todi_float32(student_logits, teacher_logits, mask, temperature):
    return _todi(student_logits, teacher_logits, mask, temperature)


def todi_weight_attached(student_logits, teacher_logits, mask, temperature):
    return _todi(student_logits, teacher_logits, mask, temperature, detach_weight=False)


def todi_t_squared(student_logits, teacher_logits, mask, temperature):
    return _todi(student_logits, teacher_logits, mask, temperature) * temperature ** 2


def main():
    verdicts_right = True
    for fn, should_pass in [(todi_float32, True), (todi_weight_attached, False), (todi_t_squared, False)]:
        report = check(fn, "todi", framework="torch", neginf=False)
        print(f"== {fn.__name__}\n{report}\n")
        verdicts_right &= report.passed == should_pass
    with_inf = check(todi_float32, "todi", framework="torch")  # the case of -inf logits included
    print(f"== todi_float32, -inf logits included\n{with_inf}\n")
    verdicts_right &= not with_inf.passed
    declared = check(todi_t_squared, "todi", framework="torch", t_squared=True, neginf=False)
    print(f"todi_t_squared checked as a T^2 convention (t_squared=True): passed = {declared.passed}")
    return 0 if verdicts_right and declared.passed else 1


if __name__ == "__main__":
    sys.exit(main())
