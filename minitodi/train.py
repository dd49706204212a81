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
"""

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint, layers, losses, metrics, optim
from .backend import array_module, to_float, to_numpy
from .data import IGNORE, BatchIterator, collate, eval_batches, format_prompt
from .generate import generate
from .model import backward, forward, init_params
from .progress import Progress
from .tokenizer import Tokenizer

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
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not 0.0 <= self.kd_rate <= 1.0:
            raise ValueError(f"kd_rate must be in [0, 1], got {self.kd_rate}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")


class Teacher:
    """A frozen model whose logits distillation matches; its tokenizer must be the student's.

    **Cached logits.** The teacher never changes, so its logits for a training example are the same at
    every epoch and for every student. :meth:`precompute` runs it once over the distinct training
    examples (in a fixed order and batch size, so every process gets the same numbers, which keeps
    resume exact) and keeps the logits at their counted positions only: for instruction data that
    is a few response tokens per example. :meth:`batch_logits` then assembles a batch's teacher logits
    from that cache instead of a forward pass (zeros at uncounted positions, which no loss reads).
    Causal attention makes an example's logits independent of the padding that follows it in a batch,
    so the cache holds what a forward pass would give, up to float rounding.
    """

    CACHE_BYTES = 1 << 30  # keep no cache larger than this (language-modelling data counts every token)
    CACHE_BATCH = 64

    def __init__(self, params, config, tokenizer):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self._cache = {}  # example ids (int64 bytes) -> logits at its counted positions (n, V)

    @classmethod
    def load(cls, directory, *, dtype="float32", device="cpu"):
        params, config = checkpoint.load(directory, dtype=dtype, device=device)
        return cls(params, config, Tokenizer.load(directory))

    def logits(self, idx):
        return forward(self.params, idx, self.config)[0]

    def precompute(self, examples, device="cpu"):
        """Cache the logits at counted positions of every distinct example; False if it would not fit."""
        unique = {}
        for x, y in examples:
            unique.setdefault(np.asarray(x, dtype=np.int64).tobytes(), (x, y))
        if unique.keys() <= self._cache.keys():
            return True
        counted = sum(sum(label != IGNORE for label in y) for x, y in unique.values())
        itemsize = next(iter(self.params.values())).dtype.itemsize
        if counted * self.config.vocab_size * itemsize > self.CACHE_BYTES:
            return False
        self._cache = {}
        items = list(unique.items())
        for start in range(0, len(items), self.CACHE_BATCH):
            chunk = items[start:start + self.CACHE_BATCH]
            idx, labels = collate([example for _, example in chunk], pad_id=0, device=device)
            logits = self.logits(idx)
            for b, (key, _) in enumerate(chunk):
                self._cache[key] = logits[b][labels[b] != IGNORE]  # (n_b, V), a copy
        return True

    def batch_logits(self, idx, labels):
        """The teacher's logits for a training batch: from the cache when every row is in it (values at
        counted positions, zeros elsewhere), else a forward pass."""
        if not self._cache:
            return self.logits(idx)
        host_idx, host_counted = to_numpy(idx), to_numpy(labels) != IGNORE
        rows = []
        for b in range(host_idx.shape[0]):
            positions = np.flatnonzero(host_counted[b])
            if positions.size == 0:
                return self.logits(idx)
            length = int(positions[-1]) + 1  # an example ends with a counted token (its eos)
            cached = self._cache.get(host_idx[b, :length].tobytes())
            if cached is None:
                return self.logits(idx)
            rows.append(cached)
        xp = array_module(idx)
        out = xp.zeros((*host_idx.shape, self.config.vocab_size), dtype=rows[0].dtype)
        out[labels != IGNORE] = xp.concatenate(rows)  # row-major order: row by row, position by position
        return out


def require_same_tokenizer(teacher, tokenizer):
    """A clear error when the teacher's tokenizer is not the student's (their logits would not align)."""
    if teacher.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"teacher and student tokenizers differ ({teacher.tokenizer!r} vs {tokenizer!r}): "
                         "distillation compares distributions over the same vocabulary; use the teacher's "
                         "tokenizer.json for the student")


def step_loss(params, config, idx, labels, tcfg, teacher=None):
    """Loss of one batch and its gradient w.r.t. every parameter: ``(total, ce, kd, grads)``.

    ``kd`` is None for an SFT run. The loss's parts are floats; grads is a dict like params.
    """
    logits, cache = forward(params, idx, config)
    ce, ce_cache = layers.cross_entropy_forward(logits, labels)
    ce = to_float(ce)
    if teacher is None or tcfg.loss == SFT:
        return ce, ce, None, backward(layers.cross_entropy_backward(1.0, ce_cache), cache)
    mask = labels != IGNORE
    kd, dkd = losses.LOSSES[tcfg.loss](logits, teacher.batch_logits(idx, labels), mask,
                                       temperature=tcfg.temperature, **tcfg.loss_options)
    dlogits = layers.cross_entropy_backward(1.0 - tcfg.kd_rate, ce_cache)
    dlogits += tcfg.kd_rate * dkd
    total = (1.0 - tcfg.kd_rate) * ce + tcfg.kd_rate * kd
    return total, ce, kd, backward(dlogits, cache)


def heldout_losses(params, config, examples, batch_size, device, teacher=None):
    """Per counted token over ``examples`` (token-weighted, not batch-weighted): the cross-entropy, and
    KL(teacher || model) at T = 1 when a teacher is given (else None). Padding is causal-safe: it
    follows every counted token, so the pad id does not matter."""
    nll = kl = count = 0.0
    for idx, labels in eval_batches(examples, batch_size, pad_id=0, device=device):
        logits, _ = forward(params, idx, config)
        ce, cache = layers.cross_entropy_forward(logits, labels)
        n = cache[3]
        nll += to_float(ce) * n
        if teacher is not None:
            kl += losses.fkl(logits, teacher.logits(idx), labels != IGNORE, temperature=1.0)[0] * n
        count += n
    return nll / count, (None if teacher is None else kl / count)


def validation_loss(params, config, examples, batch_size, device):
    """Cross-entropy per counted token over ``examples``."""
    return heldout_losses(params, config, examples, batch_size, device)[0]


class _StopFlag:
    """Turns Ctrl-C into a flag the loop checks between steps (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.set = False

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def _handle(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path, step):
    """Drop log lines written after ``step`` (by a run killed before it could save)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def fit(out, model_config, tokenizer, train_examples, valid_examples, tcfg, *, teacher=None, device="cpu",
        progress=True, label=None):
    """Train a model into the run directory ``out`` (see the module docstring); resumes when it can.

    Returns a summary dict: steps, best validation CE and its step, seconds, and the validation curve.
    """
    out = Path(out)
    if tcfg.loss != SFT:
        if teacher is None:
            raise ValueError(f"loss {tcfg.loss!r} distils from a teacher: pass teacher=")
        require_same_tokenizer(teacher, tokenizer)
        if teacher.config.vocab_size != model_config.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != student {model_config.vocab_size}")
        teacher.precompute(train_examples, device)
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocabulary {model_config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
    run = {"train": asdict(tcfg), "model": model_config.to_dict(), "tokenizer": tokenizer.fingerprint(),
           "teacher": None if teacher is None else checkpoint.hf_config(teacher.config, tcfg.dtype)}
    out.mkdir(parents=True, exist_ok=True)
    run_file, log_file, last = out / "run.json", out / "metrics.jsonl", out / "last"
    if run_file.exists() and json.loads(run_file.read_text()) != json.loads(json.dumps(run)):
        raise ValueError(f"{out} holds a run with other settings ({run_file}); choose another output "
                         "directory or delete this one")
    checkpoint.write_json(run_file, run)
    tokenizer.save(out)

    batches = BatchIterator(train_examples, tcfg.batch_size, pad_id=tokenizer.eos_id, seed=tcfg.seed, device=device)
    if checkpoint.has_training_state(checkpoint.recover(last)):
        params, _ = checkpoint.load(last, dtype=tcfg.dtype, device=device)
        state = checkpoint.load_training_state(last, device=device)
        opt, step, best = state["optimizer"], state["step"], state["best"]
        batches.restore(state["data"])
        _truncate_log(log_file, step)
    else:
        params = init_params(model_config, tcfg.seed, dtype=np.dtype(tcfg.dtype), device=device)
        opt, step, best = optim.adamw_init(params), 0, {"valid_ce": math.inf, "step": None}
        log_file.unlink(missing_ok=True)

    def save_last():
        checkpoint.save_replacing(last, params, model_config, training_state={
            "optimizer": opt, "step": step, "best": best, "data": batches.state()})

    def evaluate_now():
        valid_ce = validation_loss(params, model_config, valid_examples, tcfg.eval_batch_size, device)
        record = {"step": step, "valid_ce": valid_ce}
        if valid_ce < best["valid_ce"]:
            best.update(valid_ce=valid_ce, step=step)
            checkpoint.save(out, params, model_config, config_extra=_eos_config(tokenizer))
        _append_jsonl(log_file, record)
        save_last()
        return valid_ce

    start = time.perf_counter()
    valid_ce = math.nan
    with _StopFlag() as stop, Progress(tcfg.steps - step, label or tcfg.loss, enabled=progress) as bar:
        while step < tcfg.steps and not stop.set:
            idx, labels = next(batches)
            lr = optim.lr_at(step, lr=tcfg.lr, total_steps=tcfg.steps, warmup_steps=tcfg.warmup_steps,
                             min_lr=tcfg.min_lr)
            total, ce, kd, grads = step_loss(params, model_config, idx, labels, tcfg, teacher)
            if not math.isfinite(total):
                save_last()
                raise FloatingPointError(f"loss is {total} at step {step}; the last good state is in {last}")
            norm = optim.clip_grad_norm(grads, tcfg.grad_clip)
            optim.adamw_step(params, grads, opt, lr=lr, weight_decay=tcfg.weight_decay)
            step += 1
            if step % tcfg.log_every == 0:
                _append_jsonl(log_file, {"step": step, "loss": total, "ce": ce, "kd": kd, "lr": lr,
                                         "grad_norm": norm})
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                valid_ce = evaluate_now()
            bar.update(tokens=int(idx.size), loss=total, **({} if math.isnan(valid_ce) else {"valid": valid_ce}))
        if stop.set and step < tcfg.steps:
            save_last()
            print(f"\ninterrupted at step {step}/{tcfg.steps}; state saved in {last}. "
                  "Run the same command again to resume.")
            raise KeyboardInterrupt
    curve = [json.loads(line) for line in log_file.read_text().splitlines()]
    return {"steps": step, "best_valid_ce": best["valid_ce"], "best_step": best["step"],
            "seconds": time.perf_counter() - start,
            "valid_curve": [(r["step"], r["valid_ce"]) for r in curve if "valid_ce" in r],
            "train_curve": [(r["step"], r["loss"]) for r in curve if "loss" in r]}


def _eos_config(tokenizer):
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}


# --------------------------------------------------------------------------------------------------
# evaluation


def prompt_ids(tokenizer, record, room):
    """The prompt's token ids, cut from the left to at most ``room`` tokens."""
    ids = tokenizer.encode(format_prompt(record))
    return ids[-room:]


def evaluate(params, config, tokenizer, records, examples, *, teacher=None, max_new_tokens=24,
             batch_size=64, device="cpu"):
    """Every metric of a model on held-out records (greedy generation) and their encoded examples.

    Returns ``{"rouge_l", "exact_match", "perplexity", "divergence", "per_task", "samples"}``: ROUGE-L and
    exact match (x100, max over each record's references) of greedy completions; perplexity of the
    responses (teacher-forced); ``divergence`` = KL(teacher || model) per response token at T = 1 (None
    without a teacher); ``per_task`` ROUGE-L and exact match per task family; ``samples`` a few completions.
    """
    room = config.n_positions - max_new_tokens
    prompts = [prompt_ids(tokenizer, r, room) for r in records]
    outputs = generate(params, config, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       batch_size=batch_size)
    texts = [tokenizer.decode(ids) for ids in outputs]
    rouge = [metrics.rouge_l(t, r["references"]) for t, r in zip(texts, records)]
    exact = [metrics.exact_match(t, r["references"]) for t, r in zip(texts, records)]
    per_task = {}
    for task in sorted({r["task"] for r in records}):
        rows = [i for i, r in enumerate(records) if r["task"] == task]
        per_task[task] = {"rouge_l": float(np.mean([rouge[i] for i in rows])),
                          "exact_match": float(np.mean([exact[i] for i in rows]))}
    nll, kl = heldout_losses(params, config, examples, batch_size, device, teacher)
    return {"rouge_l": float(np.mean(rouge)), "exact_match": float(np.mean(exact)),
            "perplexity": metrics.perplexity(nll), "divergence": kl,
            "per_task": per_task,
            "samples": [{"prompt": format_prompt(r), "output": t, "references": r["references"]}
                        for r, t in list(zip(records, texts))[:5]]}
