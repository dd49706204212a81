"""The ``minitodi`` command line (also ``python -m minitodi``)."""

import argparse
import sys

import numpy as np

from . import losses

# (loss, options) rows of the gradient-check table: every loss with its defaults, plus the ToDi
# variants whose gradients differ (the value's own gradient, a sharper weight) and other skews.
GRADCHECK_CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("todi", {}),
    ("todi", {"beta": 2.0}),
    ("todi", {"detach": False}),
    ("jsd", {}),
    ("tvd", {}),
    ("sfkl", {}),
    ("sfkl", {"lam": 0.3}),
    ("srkl", {}),
    ("srkl", {"lam": 0.3}),
    ("akl", {}),
]


def gradcheck_table(seed=0, temperatures=(1.0, 2.0), names=None, eps=losses.LOSS_CHECK_EPS):
    """Rows (name, options, temperature, entries checked, max relative error) in float64.

    Logits (2, 3, 11) ~ N(0, 1) (an untrained model's scale), a mask that turns off two of the six
    positions; every entry of the student's logits is checked with the fourth-order stencil of
    :data:`minitodi.losses.LOSS_CHECK_ORDER`. Stop-gradient weights are frozen at the base point.
    """
    rng = np.random.default_rng(seed)
    student = rng.standard_normal((2, 3, 11))
    teacher = rng.standard_normal((2, 3, 11))
    mask = np.array([[True, False, True], [True, True, False]])
    rows = []
    for name, options in GRADCHECK_CASES:
        if names and name not in names:
            continue
        for temperature in temperatures:
            res = losses.check_loss(name, student, teacher, mask, temperature=temperature, eps=eps,
                                    **options)
            rows.append((name, options, temperature, res.n_checked, res.max_rel_error))
    return rows


def cmd_gradcheck(args):
    rows = gradcheck_table(seed=args.seed, names=args.losses, eps=args.eps)
    print(f"{'loss':<6} {'options':<18} {'T':>4} {'entries':>8} {'max rel err':>12}")
    failed = 0
    for name, options, temperature, n, err in rows:
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        ok = err < args.tol
        failed += not ok
        print(f"{name:<6} {opts:<18} {temperature:>4g} {n:>8d} {err:>12.2e}  {'ok' if ok else 'FAIL'}")
    print(f"\nfloat64 central differences, eps={args.eps:g}; {len(rows) - failed}/{len(rows)} below {args.tol:g}")
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minitodi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every loss gradient against finite differences")
    p.add_argument("--losses", nargs="+", choices=sorted(losses.LOSSES), help="only these losses")
    p.add_argument("--eps", type=float, default=losses.LOSS_CHECK_EPS, help="finite-difference step")
    p.add_argument("--tol", type=float, default=1e-6, help="largest relative error that passes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
