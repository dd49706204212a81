"""The gradient analysis of the ToDi paper as one figure: how FKL, RKL and ToDi push on a token.

    python examples/gradient_analysis.py                   # writes ./gradient_analysis.png
    python examples/gradient_analysis.py --out fig.png

Left: the per-token derivative w.r.t. the student probability q as a function of the ratio p/q,
dFKL/dq = -p/q and dRKL/dq = log(q/p) + 1, with ToDi's (weight a held constant) for a few beta.
Right: ToDi's weight a = sigmoid(beta * log(p/q)) for the same beta. Notebook 01 explains both.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

BETAS = (0.0, 1.0, 4.0)


def derivatives(ratio, beta):
    """Per-token d/dq of the FKL, RKL and ToDi terms at p/q = ratio (ToDi's weight frozen)."""
    d_fkl = -ratio
    d_rkl = 1 - np.log(ratio)
    a = 1 / (1 + ratio ** -beta)  # sigmoid(beta * log(ratio))
    return d_fkl, d_rkl, a * d_fkl + (1 - a) * d_rkl


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gradient_analysis.png", help="where to write the PNG")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = np.logspace(-2, 2, 400)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    d_fkl, d_rkl, _ = derivatives(ratio, 1.0)
    left.semilogx(ratio, d_fkl, "k", lw=3, alpha=0.3, label="FKL: -p/q")
    left.semilogx(ratio, d_rkl, "k--", lw=3, alpha=0.3, label="RKL: log(q/p) + 1")
    for beta in BETAS:
        left.semilogx(ratio, derivatives(ratio, beta)[2], label=f"ToDi, beta = {beta:g}")
        right.plot(np.log(ratio), 1 / (1 + ratio ** -beta), label=f"beta = {beta:g}")
    left.set_yscale("symlog", linthresh=1)
    left.set(xlabel="p / q", ylabel="d term / d q", title="per-token derivative (a frozen)")
    right.set(xlabel="log(p / q)", ylabel="a", title="ToDi's weight a = sigmoid(beta log(p/q))")
    for ax in (left, right):
        ax.axvline(1 if ax is left else 0, color="k", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
