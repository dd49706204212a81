"""The training loops: teacher SFT with cross-entropy, and student distillation with any divergence.

One loop serves both. Per step, with a batch whose labels are -100 on prompt and padding tokens::

    logits = student(idx)
    sft:      loss = CE(logits, labels)
    distill:  loss = (1 - kd_rate) * CE(logits, labels) + kd_rate * KD(logits, teacher(idx), labels != -100)

where KD is ``LOSSES[name]`` at ``temperature`` (ToDi, FKL, RKL, ...; defaults kd_rate = 0.5, T = 2 as in
the official ToDi scripts) and the teacher is frozen: its logits are data. Both gradients w.r.t. the
logits are computed by hand, added with the same weights, and sent through :func:`model.backward`;
then the gradient is clipped by its global norm and AdamW steps with warmup + cosine.

**Run directory** (``out``)::

    out/model.safetensors, config.json, tokenizer.json    the best model so far (lowest validation CE)
    out/last/                                              the latest state, with the optimizer: resume
                                                           (replaced as a whole: never half old, half new)
    out/run.json                                           the settings; a resume must match them
    out/metrics.jsonl                                      one JSON object per logged step and evaluation

**Resume.** Starting a run whose ``out/last`` exists continues it: parameters, optimizer moments,
step and data position are restored, so the resumed run computes exactly the numbers of an uninterrupted
one on the CPU (no dropout, no other randomness). Ctrl-C finishes the current step, saves ``out/last``
and stops; run the same command again to go on. The state is also saved at every evaluation.

**Safety.** minitodi writes only into a new or empty directory or one holding its ``run.json``, one process at a
time (an advisory ``flock`` on the directory, which the OS drops when the process dies: a second writer is refused,
a killed one never blocks). A best model without a resumable state is left alone unless ``start`` is "restart" or
"best". A non-finite loss or gradient stops the run before the update; ``out/last`` keeps the last finite state.
"""

import fcntl
import inspect
import json
import math
import numbers
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint, layers, losses, optim
from .data import BatchIterator
from .device import to_float, to_numpy
from .evaluation import heldout_losses
from .model import init_params
from .parallel import backward_in_shards, forward_in_shards
from .progress import Progress
from .teacher import require_same_tokenizer

SFT = "sft"  # the loss name of a cross-entropy-only run


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (all of them are written to ``out/run.json``)."""

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
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every", "warmup_steps", "seed"):
            value, low = getattr(self, name), 0 if name in ("warmup_steps", "seed") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "grad_clip", "temperature", "min_lr", "weight_decay", "kd_rate"):
            value, positive = getattr(self, name), name in ("lr", "grad_clip", "temperature")
            finite = isinstance(value, numbers.Real) and math.isfinite(value)
            if not (finite and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
        if self.kd_rate > 1.0:
            raise ValueError(f"kd_rate must be in [0, 1], got {self.kd_rate}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        self._check_loss_options()

    def _check_loss_options(self):
        """Options must be keyword options of the loss, and the loss must accept their values."""
        loss = losses.LOSSES.get(self.loss)
        valid = [] if loss is None else [p.name for p in inspect.signature(loss).parameters.values()
                                         if p.kind == p.KEYWORD_ONLY and p.name not in ("temperature", "stopgrad_at")]
        if unknown := sorted(set(self.loss_options) - set(valid)):
            raise ValueError(f"loss {self.loss!r} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(valid) or 'none'}")
        if loss is not None:  # the loss's own checks of the values, on a 1 x 2 input
            loss(np.zeros((1, 2)), np.zeros((1, 2)), temperature=self.temperature, **self.loss_options)


def step_loss(params, config, idx, labels, tcfg, teacher=None):
    """Loss of one batch and its gradient w.r.t. every parameter: ``(total, ce, kd, grads)``.

    ``kd`` is None for an SFT run. The loss's parts are floats; grads is a dict like params.
    """
    counted = labels != layers.IGNORE_INDEX  # logits only where the losses read them: (n, V)
    logits, cache = forward_in_shards(params, idx, config, rows=counted)
    ce, ce_cache = layers.cross_entropy_forward(logits, labels[counted])
    ce = to_float(ce)
    if teacher is None or tcfg.loss == SFT:
        return ce, ce, None, backward_in_shards(layers.cross_entropy_backward(1.0, ce_cache), cache)
    kd, dkd = losses.LOSSES[tcfg.loss](logits, teacher.batch_logits(idx, labels), temperature=tcfg.temperature,
                                       **tcfg.loss_options)
    dlogits = layers.cross_entropy_backward(1.0 - tcfg.kd_rate, ce_cache)
    dlogits += tcfg.kd_rate * dkd
    return (1.0 - tcfg.kd_rate) * ce + tcfg.kd_rate * kd, ce, kd, backward_in_shards(dlogits, cache)


@contextmanager
def _ctrl_c_flag():
    """A list that Ctrl-C makes non-empty, for the loop to check between steps (a second Ctrl-C stops at
    once). Outside the main thread Ctrl-C is left alone.
    """
    pressed = []

    def handle(*_):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    old = signal.signal(signal.SIGINT, handle) if threading.current_thread() is threading.main_thread() else None
    try:
        yield pressed
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path, step):
    """Drop log lines written after ``step`` (by a run killed before it could save)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _check_models(model_config, tokenizer, tcfg, teacher):
    """A clear error when a distillation has no teacher, or the teacher's tokenizer or vocabulary is not
    the student's, or the model's vocabulary is smaller than the tokenizer's.
    """
    if tcfg.loss != SFT:
        if teacher is None:
            raise ValueError(f"loss {tcfg.loss!r} distils from a teacher: pass teacher=")
        require_same_tokenizer(teacher, tokenizer)
        if teacher.config.vocab_size != model_config.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != student {model_config.vocab_size}")
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocabulary {model_config.vocab_size} < tokenizer's {tokenizer.vocab_size}")


@contextmanager
def _run_directory(out, start):
    """Hold ``out`` for this process alone (see the module docstring): created, or empty, or a run.
    Yields whether ``out/last`` is a state to resume (after finishing an interrupted replacement of it).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    except OSError as err:
        raise ValueError(f"cannot use {out} as a run directory: {err.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out} is in use by another minitodi process; wait for it or choose another "
                             "directory") from None
        if not os.access(out, os.W_OK):
            raise ValueError(f"cannot use {out} as a run directory: it is not writable")
        if any(out.iterdir()) and not _is_run(out / "run.json"):
            raise ValueError(f"{out} holds files that are not a minitodi run (no run.json of minitodi): "
                             "choose a new or empty directory")
        resumable = start == "resume" and checkpoint.has_training_state(checkpoint.recover(out / "last"))
        if start == "resume" and not resumable and (out / checkpoint.MODEL_FILE).exists():
            raise ValueError(f"{out} holds a best model but no resumable state ({out / 'last'} is missing or "
                             "incomplete); nothing was changed: --restart starts over (replacing the best "
                             "model), --from-best continues from the best model")
        if start == "best" and not (out / checkpoint.MODEL_FILE).exists():
            raise ValueError(f"{out} holds no best model to continue from")
        yield resumable
    finally:
        os.close(fd)


def _is_run(run_file):
    try:
        return {"train", "model", "tokenizer"} <= json.loads(run_file.read_text()).keys()
    except (OSError, ValueError, AttributeError):
        return False


class _Run:
    """The live state of a run directory: parameters, optimizer, step, best model, data position; from
    ``out/last`` (start "resume"), else at step 0 from ``init_params`` or the best model (start "best").
    """

    def __init__(self, out, model_config, tokenizer, tcfg, batches, valid_examples, start, device):
        self.out, self.config, self.tokenizer, self.tcfg = out, model_config, tokenizer, tcfg
        self.batches, self.valid_examples, self.device = batches, valid_examples, device
        self.last, self.log = out / "last", out / "metrics.jsonl"
        if start == "resume" and checkpoint.has_training_state(self.last):  # recovered by _run_directory
            self.params, _ = checkpoint.load(self.last, dtype=tcfg.dtype, device=device)
            state = checkpoint.load_training_state(self.last, device=device)
            self.opt, self.step, self.saved, self.best = state["optimizer"], state["step"], state["step"], state["best"]
            batches.restore(state["data"])
            _truncate_log(self.log, self.step)
            return
        shutil.rmtree(self.last, ignore_errors=True)
        self.log.unlink(missing_ok=True)
        self.saved, self.step, self.best = None, 0, {"valid_ce": math.inf, "step": None}
        if start == "best":  # its validation CE is the one to beat
            self.params = checkpoint.load(out, dtype=tcfg.dtype, device=device)[0]
            self.best = {"valid_ce": self.valid_ce(), "step": 0}
        else:
            self.params = init_params(model_config, tcfg.seed, dtype=np.dtype(tcfg.dtype), device=device)
        self.opt = optim.adamw_init(self.params)

    def valid_ce(self):
        return heldout_losses(self.params, self.config, self.valid_examples, self.tokenizer.eos_id,
                              batch_size=self.tcfg.eval_batch_size, device=self.device)[0]

    def save_last(self):
        self.saved = self.step
        checkpoint.save_replacing(self.last, self.params, self.config, training_state={
            "optimizer": self.opt, "step": self.step, "best": self.best, "data": self.batches.state()})

    def evaluate(self):
        """Validation CE now; the best model is saved when it improves, the state always (if finite)."""
        valid_ce = self.valid_ce()
        if not math.isfinite(valid_ce):
            raise FloatingPointError(f"the validation loss is {valid_ce} at step {self.step}: the parameters "
                                     f"diverged (nothing was saved; {self.last} holds the last finite state)")
        if valid_ce < self.best["valid_ce"]:
            self.best.update(valid_ce=valid_ce, step=self.step)
            eos = {"bos_token_id": self.tokenizer.eos_id, "eos_token_id": self.tokenizer.eos_id}
            checkpoint.save(self.out, self.params, self.config, config_extra=eos)
        _append_jsonl(self.log, {"step": self.step, "valid_ce": valid_ce})
        self.save_last()
        return valid_ce


def _train_steps(run, teacher, stop, bar):
    """Steps until ``tcfg.steps`` or Ctrl-C: loss and gradient, clipping, AdamW, logging, evaluation."""
    tcfg, valid_ce, last_loss = run.tcfg, math.nan, "no step finished in this session"
    while run.step < tcfg.steps and not stop:
        idx, labels = next(run.batches)
        lr = optim.lr_at(run.step, lr=tcfg.lr, total_steps=tcfg.steps, warmup_steps=tcfg.warmup_steps,
                         min_lr=tcfg.min_lr)
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is reported below
            total, ce, kd, grads = step_loss(run.params, run.config, idx, labels, tcfg, teacher)
            norm = optim.clip_grad_norm(grads, tcfg.grad_clip)
        if not (math.isfinite(total) and math.isfinite(norm)):  # nothing non-finite is ever saved
            if all(np.isfinite(to_numpy(p)).all() for p in run.params.values()):
                run.save_last()  # the state before this step
            cause = ("the teacher's logits" if kd is not None and math.isfinite(ce) and not math.isfinite(kd)
                     else f"a learning rate too large for this model (lr {lr:g} at this step)")
            raise FloatingPointError(
                f"step {run.step}: the loss is {total}, the gradient norm {norm}; {last_loss}. Likely cause: "
                f"{cause}. " + (f"{run.last} holds step {run.saved}, finite" if run.saved is not None else
                                "No state was saved") + "; change the settings, then --restart or --from-best")
        optim.adamw_step(run.params, grads, run.opt, lr=lr, weight_decay=tcfg.weight_decay)
        run.step, last_loss = run.step + 1, f"the last finite loss was {total:.6g}"
        if run.step % tcfg.log_every == 0:
            _append_jsonl(run.log, {"step": run.step, "loss": total, "ce": ce, "kd": kd, "lr": lr, "grad_norm": norm})
        if run.step % tcfg.eval_every == 0 or run.step == tcfg.steps:
            valid_ce = run.evaluate()
        bar.update(tokens=int(idx.size), loss=total, **({} if math.isnan(valid_ce) else {"valid": valid_ce}))


def fit(out, model_config, tokenizer, train_examples, valid_examples, tcfg, *, teacher=None, device="cpu",
        progress=True, label=None, start="resume"):
    """Train a model into the run directory ``out`` (see the module docstring).

    ``start``: "resume" (continue ``out/last``, or begin in a new or empty directory), "restart" (begin
    again at step 0, any settings), or "best" (begin at step 0 from the best model in ``out``, any settings).
    Returns a summary dict: steps, best validation CE and its step, seconds, and the validation curve.
    """
    out = Path(out)
    if start not in ("resume", "restart", "best"):
        raise ValueError(f"start must be 'resume', 'restart' or 'best', got {start!r}")
    _check_models(model_config, tokenizer, tcfg, teacher)
    run = {"train": asdict(tcfg), "model": asdict(model_config), "tokenizer": tokenizer.fingerprint(),
           "teacher": None if teacher is None else checkpoint.hf_config(teacher.config, tcfg.dtype)}
    with _run_directory(out, start) as resumable:
        run_file = out / "run.json"
        if resumable and json.loads(run_file.read_text()) != json.loads(json.dumps(run)):
            raise ValueError(f"{out} holds a run with other settings ({run_file}); choose another output "
                             "directory, or --restart / --from-best to replace that run")
        if tcfg.loss != SFT:
            teacher.precompute(train_examples, device)
        checkpoint.write_json(run_file, run)
        tokenizer.save(out)
        # rows are padded with the tokenizer's eos id (labels -100 there: no loss reads a padded position)
        batches = BatchIterator(train_examples, tcfg.batch_size, pad_id=tokenizer.eos_id, seed=tcfg.seed, device=device)
        state = _Run(out, model_config, tokenizer, tcfg, batches, valid_examples, start, device)
        begin = time.perf_counter()
        with _ctrl_c_flag() as stop, Progress(tcfg.steps - state.step, label or tcfg.loss, enabled=progress) as bar:
            _train_steps(state, teacher, stop, bar)
            if stop and state.step < tcfg.steps:
                state.save_last()
                print(f"\ninterrupted at step {state.step}/{tcfg.steps}; state saved in {state.last}. "
                      "Run the same command again to resume.")
                raise KeyboardInterrupt
    curve = [json.loads(line) for line in state.log.read_text().splitlines()]
    return {"steps": state.step, "best_valid_ce": state.best["valid_ce"], "best_step": state.best["step"],
            "seconds": time.perf_counter() - begin,
            "valid_curve": [(r["step"], r["valid_ce"]) for r in curve if "valid_ce" in r],
            "train_curve": [(r["step"], r["loss"]) for r in curve if "loss" in r]}
