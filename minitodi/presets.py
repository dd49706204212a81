"""The one table of model sizes and training budgets that the demo, the command line and the examples share.

:data:`MODELS` names GPT-2 sizes (width, depth, heads; the vocabulary comes from the tokenizer and the
context from the task); each size is also a Llama (``arch="llama"``, see :func:`model_config`). A
:class:`Preset` is a whole experiment at one budget: the synthetic suite's size, the tokenizer, both
models and both training budgets, the seeds and the generation room.
"""

from dataclasses import dataclass, replace

from . import data
from .model import GPTConfig, LlamaConfig
from .train import TrainConfig

MODELS = {
    "teacher": {"n_embd": 128, "n_layer": 4, "n_head": 4},
    "student": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "small": {"n_embd": 32, "n_layer": 2, "n_head": 2},
    "tiny": {"n_embd": 32, "n_layer": 1, "n_head": 2},
}
ARCHS = ("gpt2", "llama")


def model_config(size, vocab_size, n_positions, arch="gpt2"):
    """The configuration of a size in :data:`MODELS`: a GPT-2, or a Llama of the same width, depth and query
    heads with half as many key/value heads and a SwiGLU width I = 8C/3 rounded up to a multiple of 8
    (its three C x I matrices hold about GPT-2's 8 C^2 MLP weights).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "gpt2":
        return GPTConfig(vocab_size=vocab_size, n_positions=n_positions, **MODELS[size])
    C, L, H = (MODELS[size][k] for k in ("n_embd", "n_layer", "n_head"))
    return LlamaConfig(vocab_size=vocab_size, hidden_size=C, intermediate_size=-(-8 * C // 24) * 8,
                       num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=max(1, H // 2),
                       max_position_embeddings=n_positions)


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
        return {"kind": "instructions", **data.synthetic_suite(seed=0, n_train=self.n_train, n_valid=self.n_valid,
                                                               n_test=self.n_test, families=self.families)}

    def models(self, vocab_size):
        """``(teacher, student)`` configurations of ``arch`` for a tokenizer's vocabulary."""
        return (model_config(self.teacher, vocab_size, self.n_positions, self.arch),
                model_config(self.student, vocab_size, self.n_positions, self.arch))


_TINY_TRAIN = TrainConfig(batch_size=16, lr=3e-3, warmup_steps=20)
_TINY = Preset(n_train=2000, n_valid=64, n_test=96, families=("starts_with", "number_between", "other_color", "rhyme"),
               vocab_size=320, seq_len=48, n_positions=64, teacher="student", student="small",
               teacher_train=replace(_TINY_TRAIN, steps=700, eval_every=140),
               student_train=replace(_TINY_TRAIN, steps=400, eval_every=100), seeds=(0,), max_new_tokens=12)

# The demo (README, "What the demo shows"): six families whose scores a 2-layer width-64 student learns steadily (add
# and reverse left out: their todi - X differences swung by 10-20 points between two training seeds); 50 test and 16
# validation prompts a family (other_color's 132 prompts allow 66 held out; with 6 validation prompts the teacher's
# best step, chosen on 72 tokens, moved with float rounding); sixteen training seeds of 700 steps (todi - fkl varied by
# 3 points from seed to seed: 12 seeds would just reach a 95% half-width of 2).
_DEMO = Preset(families=("next", "count", "starts_with", "number_between", "other_color", "rhyme"), n_valid=96,
               n_test=300, student_train=TrainConfig(steps=700, eval_every=100), seeds=tuple(range(16)),
               max_new_tokens=12)

PRESETS = {
    "full": _DEMO,
    "quick": replace(_DEMO, teacher_train=TrainConfig(steps=500, eval_every=250),
                     student_train=TrainConfig(steps=300, eval_every=150), seeds=(0,)),
    "tiny": _TINY,  # the examples: the four multi-answer families, a minute on a laptop
    "tiny-fast": replace(_TINY, n_train=400, n_valid=32, n_test=32,
                         teacher_train=replace(_TINY_TRAIN, steps=60, eval_every=12),
                         student_train=replace(_TINY_TRAIN, steps=30, eval_every=7, warmup_steps=15)),
}
