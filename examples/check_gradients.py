"""Check every registered loss's gradient against finite differences, at temperatures 1 and 2.

    python examples/check_gradients.py                 # exit status 1 if any check fails
    python examples/check_gradients.py --tol 1e-8

Random float64 logits shaped (2, 3, 11) with two positions masked off; minitodi.losses.check_loss
compares the hand-derived gradient with central differences of the loss value over every logit
(stop-gradient weights held at the base point). Prints the worst relative error per loss.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minitodi.losses import LOSSES, check_loss  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-6, help="largest relative error that passes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    student, teacher = rng.standard_normal((2, 2, 3, 11))
    mask = np.array([[True, False, True], [True, True, False]])
    failures = 0
    print(f"{'loss':<6} {'T = 1':>10} {'T = 2':>10}")
    for name in LOSSES:
        errors = [check_loss(name, student, teacher, mask, temperature=T).max_rel_error for T in (1.0, 2.0)]
        bad = [e for e in errors if not e < args.tol]
        failures += len(bad)
        print(f"{name:<6} {errors[0]:>10.1e} {errors[1]:>10.1e}  {'FAIL' if bad else 'ok'}")
    print(f"{2 * len(LOSSES) - failures}/{2 * len(LOSSES)} checks below {args.tol:g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
