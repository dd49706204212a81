"""Check every registered loss's gradient against finite differences, at temperatures 1 and 2.

    python examples/check_gradients.py                 # exit status 1 if any check fails
    python examples/check_gradients.py --tol 1e-8

minitodi.core.gradcheck.gradcheck_table checks random float64 logits shaped (2, 3, 11), two positions masked
off, against central differences of the loss value over every logit (stop-gradient weights held at the
base point). Prints the worst relative error per loss with its default options.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minitodi.core.gradcheck import gradcheck_table  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-6, help="largest relative error that passes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    errors = {}
    for name, options, _, _, error in gradcheck_table(seed=args.seed):
        if not options:  # the defaults: one row per loss
            errors.setdefault(name, []).append(error)
    failures = 0
    print(f"{'loss':<6} {'T = 1':>10} {'T = 2':>10}")
    for name, (e1, e2) in errors.items():
        bad = [e for e in (e1, e2) if not e < args.tol]
        failures += len(bad)
        print(f"{name:<6} {e1:>10.1e} {e2:>10.1e}  {'FAIL' if bad else 'ok'}")
    print(f"{2 * len(errors) - failures}/{2 * len(errors)} checks below {args.tol:g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
