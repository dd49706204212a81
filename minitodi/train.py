"""The training loop: teacher SFT with cross-entropy, and student distillation with any divergence.

One loop serves both. Per step, with a batch whose labels are -100 on prompt and padding tokens::

    logits = student(idx)
    sft:      loss = CE(logits, labels)
    distill:  loss = (1 - kd_rate) * CE(logits, labels) + kd_rate * KD(logits, teacher(idx), labels != -100)

where KD is ``LOSSES[name]`` at ``temperature`` (ToDi, FKL, RKL, ...; defaults kd_rate = 0.5, T = 2 as in
the official ToDi scripts) and the teacher is frozen: its logits are data. Both gradients w.r.t. the
logits are computed by hand, added with the same weights, and sent through the model's backward; then
the gradient is clipped by its global norm and AdamW steps with warmup + cosine.

The run directory around the loop (one writer, resume, atomic state, the log) is :mod:`minitodi.rundir`;
the settings are :class:`minitodi.presets.TrainConfig`. Ctrl-C (or SIGTERM) finishes the current step,
saves the state and stops; run the same command again to go on. The state is also saved at every evaluation. A
non-finite loss or gradient stops the run before the update; ``out/last`` keeps the last finite state.
"""

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import checkpoint, parallel, rundir
from .core import layers, optim
from .core.device import to_float
from .data import BatchIterator
from .evaluation import heldout_losses
from .parallel import backward_in_shards, forward_in_shards
from .presets import SFT, TrainConfig
from .progress import Progress
from .teacher import require_same_tokenizer


def step_loss(params, config, idx, labels, tcfg, teacher=None):
    """Loss of one batch and its gradient w.r.t. every parameter: ``(total, ce, kd, grads)``.

    ``kd`` is None for an SFT run. The loss's parts are floats; grads is a dict like params, or None for a
    distillation whose student logits are not finite (the loss is then NaN). The head runs only at counted
    positions (labels != -100), where the losses read it: logits (n, V).
    """
    counted = labels != layers.IGNORE_INDEX
    logits, cache = forward_in_shards(params, idx, config, rows=counted)
    ce, ce_cache = layers.cross_entropy_forward(logits, labels[counted])
    ce = to_float(ce)
    if teacher is None or tcfg.loss == SFT:
        dlogits = layers.cross_entropy_backward(1.0, ce_cache)
        return ce, ce, None, backward_in_shards(dlogits, cache)
    if not math.isfinite(ce):  # non-finite logits (a diverged update): the divergences would refuse them
        return ce, ce, math.nan, None  # no gradient: the loop stops on the non-finite loss with its cause
    teacher_logits = teacher.batch_logits(idx, labels)
    kd, dkd = parallel.loss_and_grad(tcfg.loss, logits, teacher_logits, temperature=tcfg.temperature,
                                     **tcfg.loss_options)
    # loss = (1 - kd_rate) CE + kd_rate KD, so dloss/dlogits = (1 - kd_rate) dCE/dlogits + kd_rate dKD/dlogits
    total = (1.0 - tcfg.kd_rate) * ce + tcfg.kd_rate * kd
    dlogits = layers.cross_entropy_backward(1.0 - tcfg.kd_rate, ce_cache)
    dlogits += tcfg.kd_rate * dkd
    return total, ce, kd, backward_in_shards(dlogits, cache)


def _check_models(model_config, tokenizer, tcfg, teacher):
    """A clear error for models that cannot train together.

    A distillation needs a teacher whose tokenizer and vocabulary are the student's, and no model's
    vocabulary may be smaller than the tokenizer's.
    """
    if tcfg.loss != SFT:
        if teacher is None:
            raise ValueError(f"loss {tcfg.loss!r} distils from a teacher: pass teacher=")
        require_same_tokenizer(teacher, tokenizer)
        if teacher.config.vocab_size != model_config.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != student "
                             f"{model_config.vocab_size}")
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocabulary {model_config.vocab_size} < tokenizer's {tokenizer.vocab_size}")


@contextmanager
def _non_finite_reported():
    """NumPy's overflow and invalid-value warnings silenced: the loop reports a non-finite result itself.

    The loop's own error names the step and the likely cause in one line; the warnings would print lines
    of core's source before it. np.errstate covers this thread; the warnings filter covers the threads
    :mod:`minitodi.parallel` hands pieces to (np.errstate is per thread, the filter process-wide).
    """
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(overflow|invalid value) encountered",
                                category=RuntimeWarning)
        yield


class _Trainer:
    """The loop over one run's state: steps, logging, evaluation, saving."""

    def __init__(self, run, tokenizer, tcfg, teacher, valid_ce):
        self.run = run
        self.tokenizer = tokenizer
        self.tcfg = tcfg
        self.teacher = teacher
        self.valid_ce = valid_ce  # params -> validation cross-entropy
        self.last_loss = "no step finished in this session"

    def steps(self, stop, bar):
        """Steps until ``tcfg.steps`` or Ctrl-C: loss and gradient, clipping, AdamW, logging, evaluation."""
        run, tcfg = self.run, self.tcfg
        valid_ce = math.nan
        while run.step < tcfg.steps and not stop:
            idx, labels = next(run.batches)
            lr = optim.lr_at(run.step, lr=tcfg.lr, total_steps=tcfg.steps, warmup_steps=tcfg.warmup_steps,
                             min_lr=tcfg.min_lr)
            with _non_finite_reported():
                total, ce, kd, grads = step_loss(run.params, run.config, idx, labels, tcfg, self.teacher)
                norm = math.nan
                if grads is not None:
                    norm = optim.clip_grad_norm(grads, tcfg.grad_clip)
            if not (math.isfinite(total) and math.isfinite(norm)):  # nothing non-finite is ever saved
                self._stop_non_finite(total, ce, kd, norm, lr)
            with _non_finite_reported():  # an update to inf (lr 1e300) is the next step's non-finite loss
                parallel.adamw_step(run.params, grads, run.opt, lr=lr, weight_decay=tcfg.weight_decay)
            run.step += 1
            self.last_loss = f"the last finite loss was {total:.6g}"
            if run.step % tcfg.log_every == 0:
                record = {"step": run.step, "loss": total, "ce": ce, "kd": kd, "lr": lr, "grad_norm": norm}
                rundir.append_log(run.log, record)
            if run.step % tcfg.eval_every == 0 or run.step == tcfg.steps:
                valid_ce = self.evaluate()
            shown = {"loss": total}
            if not math.isnan(valid_ce):
                shown["valid"] = valid_ce
            bar.update(tokens=int(idx.size), **shown)

    def evaluate(self):
        """Validation CE now; the best model is saved when it improves, the state always (if finite)."""
        run = self.run
        with _non_finite_reported():  # the last step's update may have made the parameters non-finite
            valid_ce = self.valid_ce(run.params)
        if not math.isfinite(valid_ce):
            kept = "no state was saved"
            if run.saved is not None:
                kept = f"{run.last} holds step {run.saved}, finite"
            raise FloatingPointError(f"the validation loss is {valid_ce} at step {run.step}: the parameters "
                                     f"diverged (nothing was saved now; {kept})")
        if valid_ce < run.best["valid_ce"]:
            run.save_best(valid_ce, self.tokenizer)
        rundir.append_log(run.log, {"step": run.step, "valid_ce": valid_ce})
        run.save_last()
        return valid_ce

    def _stop_non_finite(self, total, ce, kd, norm, lr):
        """Save the state before this step if it is finite, then raise with the step and the likely cause."""
        run = self.run
        if run.params_finite():
            run.save_last()
        if kd is not None and math.isfinite(ce) and not math.isfinite(kd):
            cause = "the teacher's logits"
        else:
            cause = f"a learning rate too large for this model (lr {lr:g} at this step)"
        if run.saved is not None:
            kept = f"{run.last} holds step {run.saved}, finite"
        else:
            kept = "No state was saved"
        raise FloatingPointError(
            f"step {run.step}: the loss is {total}, the gradient norm {norm}; {self.last_loss}. "
            f"Likely cause: {cause}. {kept}; change the settings, then --restart or --from-best")


def settings(model_config, tokenizer, tcfg, teacher, train_examples, valid_examples):
    """What run.json records, and a resume (or the demo's reuse of a finished run) must match.

    The teacher by its config and a digest of its weights (another teacher of the same shape is another
    run), the data by digests of the examples' token ids and labels.
    """
    teacher_identity = None
    if teacher is not None:
        teacher_identity = {"config": checkpoint.hf_config(teacher.config, tcfg.dtype),
                            "weights": rundir.digest(teacher.params[name] for name in sorted(teacher.params))}
    data = {"train": _examples_digest(train_examples), "valid": _examples_digest(valid_examples)}
    return {"train": asdict(tcfg), "model": asdict(model_config), "tokenizer": tokenizer.fingerprint(),
            "teacher": teacher_identity, "data": data}


def _examples_digest(examples):
    """The digest of (ids, labels) examples, in order."""
    arrays = []
    for ids, labels in examples:
        arrays.append(np.asarray(ids, dtype=np.int64))
        arrays.append(np.asarray(labels, dtype=np.int64))
    return rundir.digest(arrays)


def fit(out, model_config, tokenizer, train_examples, valid_examples, tcfg: TrainConfig, *, teacher=None,
        device="cpu", progress=True, label=None, start="resume"):
    """Train a model into the run directory ``out`` (see :mod:`minitodi.rundir`).

    ``start``: "resume" (continue ``out/last``, or begin in a new or empty directory), "restart" (begin
    again at step 0, any settings), or "best" (begin at step 0 from the best model in ``out``, any settings).
    Returns a summary dict: steps, best validation CE and its step, seconds, and the validation curve.
    """
    out = Path(out)
    if start not in rundir.STARTS:
        raise ValueError(f"start must be 'resume', 'restart' or 'best', got {start!r}")
    _check_models(model_config, tokenizer, tcfg, teacher)
    run_settings = settings(model_config, tokenizer, tcfg, teacher, train_examples, valid_examples)

    def valid_ce(params):
        return heldout_losses(params, model_config, valid_examples, tokenizer.eos_id,
                              batch_size=tcfg.eval_batch_size, device=device)[0]

    with rundir.claim(out, start) as resumable, rundir.ctrl_c_flag() as stop:
        if resumable:
            rundir.check_same_settings(out, run_settings)
        if start == "best":
            rundir.check_best_model(out, model_config, tokenizer.fingerprint())
        if tcfg.loss != SFT:
            teacher.precompute(train_examples, device, stop=stop)
        # rows are padded with the tokenizer's eos id (labels -100 there: no loss reads a padded position)
        batches = BatchIterator(train_examples, tcfg.batch_size, pad_id=tokenizer.eos_id, seed=tcfg.seed,
                                device=device)
        # reads and checks the state or the best model it starts from; nothing is written before begin()
        run = rundir.RunState(out, model_config, tcfg, batches, start, device, valid_ce, run_settings)
        if stop:  # Ctrl-C while the teacher's logits or the state were read: nothing is written yet
            print(f"\ninterrupted before {out} changed; run the same command again to start.")
            raise KeyboardInterrupt
        rundir.write_settings(out, run_settings)
        run.begin()  # the tokenizer is written with the first best model, never beside another one
        trainer = _Trainer(run, tokenizer, tcfg, teacher, valid_ce)
        begin = time.perf_counter()
        steps_left = tcfg.steps - run.step
        with Progress(steps_left, label or tcfg.loss, enabled=progress) as bar:
            trainer.steps(stop, bar)
            if stop and run.step < tcfg.steps:
                run.save_last()
                print(f"\ninterrupted at step {run.step}/{tcfg.steps}; state saved in {run.last}. "
                      "Run the same command again to resume.")
                raise KeyboardInterrupt
    return _summary(run, time.perf_counter() - begin)


def _summary(run, seconds):
    """The run's summary, its curves read back from the log."""
    records = rundir.read_log(run.log)
    return {"steps": run.step, "best_valid_ce": run.best["valid_ce"], "best_step": run.best["step"],
            "seconds": seconds,
            "valid_curve": [(r["step"], r["valid_ce"]) for r in records if "valid_ce" in r],
            "train_curve": [(r["step"], r["loss"]) for r in records if "loss" in r]}
