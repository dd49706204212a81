"""What minitodi says about the distillation losses of libraries people use: TRL and Liger-Kernel.

    python examples/check_libraries.py          # a verdict per library and setting; exit 1 if one is off
    python examples/check_libraries.py --full   # every report in full, a row per case

Each loss is called the way its library calls it, wrapped in the signature that
``minitodi.conformance.check`` expects, and checked against ``minitodi.core.losses.gjsd`` (GKD's generalized
JSD, Agarwal et al. 2024, whose beta = 0 and 1 are FKL and RKL in both libraries' code):

- TRL 1.16.0, ``GKDTrainer.generalized_jsd_loss`` (trl.experimental.gkd): with labels (-100 where the
  mask is off, as GKDTrainer passes them) at beta 0, 0.1, 0.5, 0.9 and 1; without labels.
- Liger-Kernel 0.8.5, the chunked JSD of ``liger_kernel.chunked_loss`` (plain PyTorch, runs on CPU):
  the static ``LigerFusedLinearJSDFunction.distillation_loss_fn`` as its base class calls it (logits
  divided by T, a sum over the counted positions: declared with ``reduction="sum"``), and the
  ``LigerFusedLinearJSDLoss`` module, given hidden states = the logits and an identity lm-head weight, so
  that its logits are the battery's (``weight_hard_loss=0``: the distillation term alone).

The verdicts expected are those of the pinned versions (``.ci/run`` installs them); with another version
installed, the verdicts are printed and compared but do not set the exit status. A library that is not
installed is skipped, and said. PyTorch is needed by both. The whole run takes about 9 s on two cores,
7 of them importing trl; with MINITODI_FAST=1 trl is skipped.

The module's logits come from a matrix product, so they are never -inf (and -inf inputs would give
0 * -inf = NaN in the product itself): it is checked with ``neginf=False``. TRL's and Liger's static
losses are checked both ways: on the case with -inf logits both give a NaN value, from
``F.kl_div(log_target=True)``, whose exp(-inf) * (-inf - -inf) is 0 * NaN.
"""

import argparse
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minitodi.conformance import check  # noqa: E402

PINNED = {"trl": "1.16.0", "liger-kernel": "0.8.5"}
TRL_BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
LIGER_BETA = 0.1


@dataclass
class LibraryCheck:
    """One check: a library's loss in one setting, and what minitodi is expected to say of it.

    ``expect``: "passed", or words the diagnosis must contain (each of them) when it fails.
    """

    library: str
    setting: str
    fn: object
    loss: str
    expect: tuple
    settings: dict = field(default_factory=dict)  # check's keywords: options, reduction, neginf

    def run(self):
        return check(self.fn, self.loss, framework="torch", **self.settings)

    def verdict_right(self, report):
        if self.expect == ("passed",):
            return report.passed
        return not report.passed and all(words in report.diagnosis for words in self.expect)


def summary(report):
    """'passed', or what differs: the diagnosis's first sentence, without its prefixes."""
    if report.passed:
        return "passed"
    text = report.diagnosis.removeprefix("diagnosis: ").removeprefix("likely bug: ")
    first, _, _ = text.partition(". ")
    return first.rstrip(".")


# --------------------------------------------------------------------------------------------------
# TRL
def trl_checks():
    """TRL's generalized JSD with and without labels, at each beta; import trl only when called."""
    import torch

    with warnings.catch_warnings():  # trl.experimental warns that its API may change: we pin the version
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer

    def with_labels(student_logits, teacher_logits, mask, temperature, beta=0.5):
        labels = torch.where(mask, 0, -100)  # GKDTrainer's labels: -100 where a position does not count
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                               temperature=temperature)

    def without_labels(student_logits, teacher_logits, mask, temperature, beta=0.5):
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=beta,
                                               temperature=temperature)

    checks = []
    for beta in TRL_BETAS:
        checks.append(LibraryCheck("TRL", f"labels, beta={beta:g}", with_labels, "gjsd", ("passed",),
                                   {"beta": beta, "neginf": False}))
    checks.append(LibraryCheck("TRL", "labels, beta=0.5, -inf logits", with_labels, "gjsd",
                               ("Non-finite", "the value is nan"), {"beta": 0.5}))
    checks.append(LibraryCheck("TRL", "no labels, beta=0.5", without_labels, "gjsd",
                               ("mask ignored", "batch size B"), {"beta": 0.5, "neginf": False}))
    return checks


# --------------------------------------------------------------------------------------------------
# Liger-Kernel
def liger_checks():
    """Liger's static JSD and its fused-linear module on CPU; import liger_kernel only when called."""
    import torch
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction, LigerFusedLinearJSDLoss

    def targets(mask, masked):
        """Liger's targets, flat: -100 (ignore_index) where a position does not count, else token 0."""
        if not masked:
            return torch.zeros(mask.numel(), dtype=torch.long)
        return torch.where(mask, 0, -100).reshape(-1)

    def static(masked):
        def fn(student_logits, teacher_logits, mask, temperature, beta=0.5):
            V = student_logits.shape[-1]
            student = (student_logits / temperature).reshape(-1, V)  # as the base class: logits / T, rows
            teacher = (teacher_logits / temperature).reshape(-1, V)
            target = targets(mask, masked)
            loss_fn = LigerFusedLinearJSDFunction.distillation_loss_fn
            return loss_fn(student, teacher, beta=beta, target=target)
        return fn

    def module(masked, **weights):
        def fn(student_logits, teacher_logits, mask, temperature, beta=0.5):
            V = student_logits.shape[-1]
            identity = torch.eye(V, dtype=student_logits.dtype)  # lm-head weight: logits = hidden states
            loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, beta=beta, temperature=temperature,
                                           compiled=False, **weights)
            return loss(student_logits.reshape(-1, V), identity, teacher_logits.reshape(-1, V), identity,
                        targets(mask, masked))
        return fn

    beta = {"beta": LIGER_BETA}
    summed = {**beta, "reduction": "sum"}
    static_name = "distillation_loss_fn"
    module_name = "LigerFusedLinearJSDLoss"
    finite = {"neginf": False}
    return [
        LibraryCheck("Liger", f"{static_name}, target, beta=0.1, sum", static(True), "gjsd", ("passed",),
                     {**summed, **finite}),
        LibraryCheck("Liger", f"{static_name}, target, beta=0.1, sum, -inf logits", static(True), "gjsd",
                     ("Non-finite", "the value is nan"), summed),
        LibraryCheck("Liger", f"{static_name}, no target, beta=0.1, sum", static(False), "gjsd",
                     ("mask ignored",), {**summed, **finite}),
        LibraryCheck("Liger", f"{module_name}, default weights, beta=0.1", module(True), "gjsd",
                     ("scaled by 0.5",), {**beta, **finite}),
        LibraryCheck("Liger", f"{module_name}, weight_soft_loss=1, beta=0.1",
                     module(True, weight_soft_loss=1.0), "gjsd", ("passed",), {**beta, **finite}),
        LibraryCheck("Liger", f"{module_name}, all labels, beta=0.1", module(False, weight_soft_loss=1.0),
                     "gjsd", ("mask ignored",), {**beta, **finite}),
    ]


LIBRARIES = {  # distribution -> (module to import, the checks)
    "trl": ("trl", trl_checks),
    "liger-kernel": ("liger_kernel", liger_checks),
}
# Importing GKDTrainer loads transformers' Trainer, accelerate and datasets: 7 s on two cores, nearly the
# whole run. With MINITODI_FAST=1 (tests/test_notebooks.py runs every example so) trl is left out: the
# tests check it in tests/test_conformance.py.
SLOW_TO_IMPORT = {"trl"}


def installed(distribution):
    """The installed version of ``distribution``, or None when it (or PyTorch) cannot be imported."""
    module, _ = LIBRARIES[distribution]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec(module) is None:
        return None
    return metadata.version(distribution)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="print every report in full")
    args = parser.parse_args(argv)
    fast = os.environ.get("MINITODI_FAST") == "1"
    verdicts_right = True
    print(f"{'library':<8}{'setting':<60}verdict")
    for distribution, (_, make_checks) in LIBRARIES.items():
        if fast and distribution in SLOW_TO_IMPORT:
            print(f"{distribution}: skipped with MINITODI_FAST=1 (importing it takes seconds)")
            continue
        version = installed(distribution)
        if version is None:
            pin = f"{distribution}=={PINNED[distribution]}"
            print(f"{distribution}: not installed, or PyTorch is not (pip install torch {pin}); skipped")
            continue
        pinned = version == PINNED[distribution]
        if not pinned:
            print(f"{distribution} {version}: the expected verdicts are {PINNED[distribution]}'s")
        for item in make_checks():
            report = item.run()
            right = item.verdict_right(report)
            mark = "" if right else f"   <- expected: {' / '.join(item.expect)}"
            print(f"{item.library:<8}{item.setting:<60}{summary(report)}{mark}")
            if args.full:
                print(f"{report}\n")
            verdicts_right &= right or not pinned
    return 0 if verdicts_right else 1


if __name__ == "__main__":
    sys.exit(main())
