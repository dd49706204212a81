"""The settings of a run and the one table of model sizes and budgets that everything shares.

:class:`TrainConfig` holds the settings of one training run (the loop in :mod:`minitodi.train` reads
them; they are written to the run's ``run.json``). :data:`MODELS` names GPT-2 sizes (width, depth, heads;
the vocabulary comes from the tokenizer and the context from the task); each size is also a Llama
(``arch="llama"``, see :func:`model_config`). A :class:`Preset` is a whole experiment at one budget: the
synthetic suite's size, the tokenizer, both models and both training budgets, the seeds and the
generation room. The demo, the command line and the examples all read this one table.
"""

import inspect
import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np

from . import data
from .core import losses
from .core.model import GPTConfig, LlamaConfig

SFT = "sft"  # the loss name of a cross-entropy-only run

# TrainConfig's fields by the values they accept
_COUNTS = ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every")  # integers >= 1
_COUNTS_FROM_ZERO = ("warmup_steps", "seed")  # integers >= 0
_POSITIVE = ("lr", "grad_clip", "temperature")  # finite numbers > 0
_NON_NEGATIVE = ("min_lr", "weight_decay", "kd_rate")  # finite numbers >= 0
# The divergence and its gradient grow as 1 / temperature. Distilling the tiny preset from a teacher, T =
# 1e-15 trained and T = 1e-20 stopped at step 0 with an infinite gradient norm (float32 squares overflow)
# and a misleading likely cause; 1e-6 leaves nine orders of magnitude for larger logits. (The paper: 1-2.)
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; every one is checked when the config is made.

    ``loss`` is "sft" (cross-entropy alone) or a name in :data:`minitodi.core.losses.LOSSES`; a distillation
    step's loss is (1 - kd_rate) CE + kd_rate KD at ``temperature``, with ``loss_options`` handed to the
    divergence (kd_rate = 0.5 and T = 2 are the official ToDi scripts' values).
    """

    loss: str = SFT
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batch_size: int = 64
    log_every: int = 10
    seed: int = 0
    dtype: str = "float32"
    kd_rate: float = 0.5
    temperature: float = 2.0
    loss_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.loss != SFT and self.loss not in losses.LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose {SFT!r} or one of {sorted(losses.LOSSES)}")
        for name in _COUNTS:
            _check_int(name, getattr(self, name), low=1)
        for name in _COUNTS_FROM_ZERO:
            _check_int(name, getattr(self, name), low=0)
        for name in _POSITIVE:
            _check_number(name, getattr(self, name), positive=True)
        for name in _NON_NEGATIVE:
            _check_number(name, getattr(self, name), positive=False)
        # NumPy scalars are welcome, stored as Python numbers: run.json writes them as JSON
        for name in _COUNTS + _COUNTS_FROM_ZERO:
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _POSITIVE + _NON_NEGATIVE:
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.kd_rate > 1.0:
            raise ValueError(f"kd_rate must be in [0, 1], got {self.kd_rate}")
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be at least {MIN_TEMPERATURE:g}, got {self.temperature!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        self._check_loss_options()

    def _check_loss_options(self):
        """Options must be keyword options of the loss, and the loss must accept their values."""
        loss = losses.LOSSES.get(self.loss)
        valid = []
        if loss is not None:
            # set by the training loop, not by the user (n_counted would rescale the mean silently)
            not_options = ("temperature", "stopgrad_at", "n_counted")
            valid = [p.name for p in inspect.signature(loss).parameters.values()
                     if p.kind == p.KEYWORD_ONLY and p.name not in not_options]
        unknown = sorted(set(self.loss_options) - set(valid))
        if unknown:
            raise ValueError(f"loss {self.loss!r} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(valid) or 'none'}")
        if loss is not None:  # the loss's own checks of the values, on a 1 x 2 input
            loss(np.zeros((1, 2)), np.zeros((1, 2)), temperature=self.temperature, **self.loss_options)


def _check_int(name, value, *, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_number(name, value, *, positive):
    finite = isinstance(value, numbers.Real) and math.isfinite(value)
    if positive:
        ok = finite and value > 0
        requirement = "> 0"
    else:
        ok = finite and value >= 0
        requirement = ">= 0"
    if not ok:
        raise ValueError(f"{name} must be a finite number {requirement}, got {value!r}")


MODELS = {
    "teacher": {"n_embd": 128, "n_layer": 4, "n_head": 4},
    "student": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "small": {"n_embd": 32, "n_layer": 2, "n_head": 2},
    "tiny": {"n_embd": 32, "n_layer": 1, "n_head": 2},
}
ARCHS = ("gpt2", "llama")


def model_config(size, vocab_size, n_positions, arch="gpt2"):
    """The configuration of a size in :data:`MODELS`, as a GPT-2 or as a Llama.

    The Llama has the same width, depth and query heads, half as many key/value heads, and a SwiGLU
    width I = 8C/3 rounded up to a multiple of 8: its three C x I matrices hold about GPT-2's 8 C^2 MLP
    weights.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "gpt2":
        return GPTConfig(vocab_size=vocab_size, n_positions=n_positions, **MODELS[size])
    C = MODELS[size]["n_embd"]
    H = MODELS[size]["n_head"]
    swiglu_width = 8 * math.ceil(C / 3)  # 8C/3 rounded up to a multiple of 8
    return LlamaConfig(vocab_size=vocab_size, hidden_size=C, intermediate_size=swiglu_width,
                       num_hidden_layers=MODELS[size]["n_layer"], num_attention_heads=H,
                       num_key_value_heads=max(1, H // 2), max_position_embeddings=n_positions)


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one experiment on the synthetic suite (``families``: None for all of them)."""

    n_train: int = 4000
    n_valid: int = 160
    n_test: int = 320
    families: tuple | None = None
    vocab_size: int = 1024
    seq_len: int = 64
    n_positions: int = 96
    teacher: str = "teacher"
    student: str = "student"
    teacher_train: TrainConfig = TrainConfig(steps=1500, eval_every=250)
    student_train: TrainConfig = TrainConfig(steps=800, eval_every=200)
    seeds: tuple = (0, 1, 2)
    max_new_tokens: int = 24
    arch: str = "gpt2"  # both models' architecture, one of ARCHS

    def dataset(self):
        """The suite as :func:`minitodi.data.load_dataset` returns datasets."""
        suite = data.synthetic_suite(seed=0, n_train=self.n_train, n_valid=self.n_valid, n_test=self.n_test,
                                     families=self.families)
        return {"kind": "instructions", **suite}

    def models(self, vocab_size):
        """``(teacher, student)`` configurations of ``arch`` for a tokenizer's vocabulary."""
        teacher = model_config(self.teacher, vocab_size, self.n_positions, self.arch)
        student = model_config(self.student, vocab_size, self.n_positions, self.arch)
        return teacher, student


_TINY_TRAIN = TrainConfig(batch_size=16, lr=3e-3, warmup_steps=20)
_TINY = Preset(
    n_train=2000, n_valid=64, n_test=96,
    families=("starts_with", "number_between", "other_color", "rhyme"),
    vocab_size=320, seq_len=48, n_positions=64, teacher="student", student="small",
    teacher_train=replace(_TINY_TRAIN, steps=700, eval_every=140),
    student_train=replace(_TINY_TRAIN, steps=400, eval_every=100),
    seeds=(0,), max_new_tokens=12,
)

# The demo (README, "What the demo shows"):
# - six families whose scores a 2-layer width-64 student learns steadily (add and reverse are left out:
#   their todi - X differences swung by 10-20 points between two training seeds);
# - 50 test and 16 validation prompts a family (other_color's 132 prompts allow 66 held out; with 6
#   validation prompts the teacher's best step, chosen on 72 tokens, moved with float rounding);
# - sixteen training seeds of 700 steps (todi - fkl varied by 3 points from seed to seed: 12 seeds would
#   just reach a 95% half-width of 2).
_DEMO = Preset(
    families=("next", "count", "starts_with", "number_between", "other_color", "rhyme"),
    n_valid=96, n_test=300,
    student_train=TrainConfig(steps=700, eval_every=100),
    seeds=tuple(range(16)), max_new_tokens=12,
)

PRESETS = {
    "full": _DEMO,
    "quick": replace(_DEMO, teacher_train=TrainConfig(steps=500, eval_every=250),
                     student_train=TrainConfig(steps=300, eval_every=150), seeds=(0,)),
    "tiny": _TINY,  # the examples: the four multi-answer families, a minute on a laptop
    "tiny-fast": replace(_TINY, n_train=400, n_valid=32, n_test=32,
                         teacher_train=replace(_TINY_TRAIN, steps=60, eval_every=12),
                         student_train=replace(_TINY_TRAIN, steps=30, eval_every=7, warmup_steps=15)),
}
