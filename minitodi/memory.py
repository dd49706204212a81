"""The memory a training run will need, estimated before it starts, against what the machine has free.

Settings such as ``--batch-size 1000000``, ``--seq-len 1e8`` or ``--vocab-size 1e9`` otherwise fail late
and badly: NumPy's MemoryError after minutes of work, or an abort inside ``tokenizers`` (exit 134, no
Python exception at all). The command line compares these estimates with :func:`available` first and
refuses in one line, with the estimate, before anything is written.

A training run's peak, in array elements of the parameters' dtype (B the batch, T its longest row, n
its counted positions, V the vocabulary, L layers of width C, MLP width I (4C in GPT-2), H heads):

- weights, gradients, AdamW's two moments and one temporary of the update: 5 x the parameters;
- activations kept for the backward, per token: L (10 C + 2 I + 1.5 H T) in the layers (H T: the
  attention weights, and half again for the backward's temporaries), 32 C around them (embeddings, the
  final norm, the gradients of the residual stream);
- logits at the counted positions, their softmax and their gradient: 3.2 n V, and a distillation's
  teacher logits and divergence temporaries 3 n V more;
- a teacher: its weights, the activations of its forward pass, and its cache of logits.

The coefficients were fitted to NumPy's allocations (tracemalloc's peak) over init, one training step
and AdamW's update, on a grid of 48 runs: GPT-2 and Llama, widths 32 to 128, 1 to 4 layers, B 8 and 32,
T 32 and 128, V 512 and 2048. Over the grid the peak is 0.82 to 0.99 times the estimate: the estimate
errs high, so a refusal means the run would not have fitted. Distilling from the teacher preset
(todi, akl; the same grid, widths 32 and 64) the peak is 0.50 to 0.70 times the estimate: the teacher's
activations are counted beside the student's backward, though they are freed before it. (The resident
memory of a whole run is about 70 MB more: the interpreter, the libraries and the data.)
"""

import math
import os

from .core.layers import IGNORE_INDEX
from .core.model import n_params

TEACHER_CACHE_BYTES = 1 << 30  # minitodi.teacher.Teacher.CACHE_BYTES: the largest logit cache it keeps


def available(device="cpu"):
    """Bytes free for a run on ``device`` ("cpu" or "gpu"), or None when the system does not say.

    The CPU's is the kernel's MemAvailable (free memory and caches it can drop), else free pages times
    the page size; the GPU's is what CUDA reports free on the current device.
    """
    if device == "gpu":
        from .core.device import get_xp

        free, _ = get_xp("gpu").cuda.runtime.memGetInfo()
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or the name is unknown
        return None


def tokenizer_bytes(vocab_size):
    """What the ``tokenizers`` BPE trainer reserves for ``vocab_size`` tokens before it reads any text.

    It sizes a hash table for vocab_size entries: the next power of two above vocab_size * 8 / 7
    buckets of 32 bytes and a control byte each, and 16 control bytes more (its failed allocations:
    35,433,480,208 bytes = 2^30 x 33 + 16 for vocab_size 5e8, 70,866,960,400 = 2^31 x 33 + 16 for 1e9).
    A reservation the system refuses aborts the process.
    """
    buckets = 2 ** math.ceil(math.log2(max(vocab_size * 8 / 7, 1.0)))
    return 33 * buckets + 16


def _shape(config):
    """(L, C, I, H) of a GPT-2 or Llama configuration: layers, width, MLP width, query heads."""
    if config.model_type == "llama":
        return (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                config.num_attention_heads)
    return config.n_layer, config.n_embd, 4 * config.n_embd, config.n_head


def _activations(config, rows, length):
    """Elements a forward pass over ``rows`` sequences of ``length`` tokens keeps for its backward."""
    L, C, I, H = _shape(config)
    per_token = L * (10 * C + 2 * I + 1.5 * H * length) + 32 * C
    return int(rows * length * per_token)


def training_bytes(config, examples, batch_size, *, itemsize=4, teacher_config=None, eval_batch_size=64):
    """The peak memory of training ``config`` on ``examples`` (``(idx, labels)`` rows), by part.

    Returns ``{part: bytes}`` for "weights and AdamW", "activations", "logits" and, given
    ``teacher_config`` (a distillation), "teacher". A batch is taken at its worst: ``batch_size`` rows as
    long as the longest example, each with as many counted positions as the most counted example.
    Evaluation runs batches of ``eval_batch_size`` through the same forward pass.
    """
    length = max(len(idx) for idx, _ in examples)
    counted = [sum(int(label) != IGNORE_INDEX for label in labels) for _, labels in examples]
    n = batch_size * max(counted)  # counted positions of the worst batch
    rows = max(batch_size, eval_batch_size)
    logit_copies = 3.2
    if teacher_config is not None:
        logit_copies += 3
    parts = {
        "weights and AdamW": 5 * n_params(config) * itemsize,
        "activations": _activations(config, rows, length) * itemsize,
        "logits": int(logit_copies * n * config.vocab_size) * itemsize,
    }
    if teacher_config is not None:
        cache = sum(counted) * teacher_config.vocab_size * itemsize
        if cache > TEACHER_CACHE_BYTES:  # the teacher then keeps no cache and runs on every batch
            cache = 0
        parts["teacher"] = (n_params(teacher_config) + _activations(teacher_config, rows, length)) * itemsize
        parts["teacher"] += cache
    return parts


def evaluation_bytes(config, rows, length, *, itemsize=4):
    """The peak of running ``config`` on ``rows`` sequences of up to ``length`` tokens, by part.

    What evaluation and generation allocate besides the loaded weights: a forward pass keeps what a
    training step's does (the KV cache among it), and generation's pass over the prompts computes the
    logits at every position. Measured as for training (generation with n-gram bans, then the
    teacher-forced losses; GPT-2 and Llama, 1 and 64 rows, 136 to 256 tokens): the peak is 0.57 to 0.74
    times the estimate.
    """
    return {"activations and KV cache": _activations(config, rows, length) * itemsize,
            "logits": int(3.2 * rows * length * config.vocab_size) * itemsize}


def size(nbytes):
    """``nbytes`` for a person: "512 MiB", "1.2 TiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            break
        nbytes /= 1024
    if unit == "B":
        return f"{nbytes:.0f} B"
    return f"{nbytes:.3g} {unit}"


def check_fits(what, parts, device="cpu"):
    """Raise ValueError, one line with the estimate by part, when ``parts`` exceed what is available.

    ``what`` names the work and the settings that size it, e.g. "training with --batch-size 1000000".
    Nothing is refused when the system does not say what is free.
    """
    free = available(device)
    needed = sum(parts.values())
    if free is None or needed <= free:
        return
    largest = sorted(parts.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{name} {size(nbytes)}" for name, nbytes in largest)
    raise ValueError(f"{what} needs about {size(needed)} of memory ({shown}); {size(free)} is available "
                      f"on the {device}")
