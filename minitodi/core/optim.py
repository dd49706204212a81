"""AdamW with decoupled weight decay, gradient clipping by global norm, warmup + cosine schedule.

The optimizer's state is a plain dict (``{"step": int, "m": {name: array}, "v": {name: array}}``), so a
checkpoint can save it and a resumed run continues bit for bit. The update of step t (1-based), for a
parameter x with gradient g, learning rate lr and decay wd (Loshchilov & Hutter; what torch.optim.AdamW
does)::

    x <- x * (1 - lr * wd)                         decoupled: the decay never enters m or v
    m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) g^2
    x <- x - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Weight decay applies only to matrices (ndim >= 2: linear weights and embeddings); biases and layer-norm
parameters are vectors and are left undecayed.
"""

import math

from .device import array_module, to_float


def adamw_init(params):
    """A fresh optimizer state for ``params``: zero moments, step 0."""
    xp = array_module(*params.values())
    return {"step": 0, "m": {k: xp.zeros_like(x) for k, x in params.items()},
            "v": {k: xp.zeros_like(x) for k, x in params.items()}}


def decays(x):
    """Whether weight decay applies to parameter ``x``: matrices yes, vectors (biases, norms) no."""
    return x.ndim >= 2


def adamw_step(params, grads, state, *, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    """One AdamW update of ``params`` in place; ``state`` is advanced in place too.

    Each parameter's update is its own (:func:`minitodi.parallel.adamw_step` runs groups of them side by
    side, to the same numbers).
    """
    b1, b2 = betas
    state["step"] += 1
    t = state["step"]
    step_size = lr / (1.0 - b1 ** t)  # lr with the first moment's bias correction
    bias2 = math.sqrt(1.0 - b2 ** t)  # the second moment's, applied to sqrt(v)
    xp = array_module(*params.values())
    for name, x in params.items():
        g = grads[name]
        m = state["m"][name]
        v = state["v"][name]
        if weight_decay and decays(x):
            x *= 1.0 - lr * weight_decay
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = xp.sqrt(v)
        denom /= bias2
        denom += eps
        x -= step_size * (m / denom)


def global_norm(grads):
    """sqrt of the sum of squares of every gradient entry (a Python float)."""
    xp = array_module(*grads.values())
    return math.sqrt(sum(to_float(xp.vdot(g.ravel(), g.ravel())) for g in grads.values()))


def clip_grad_norm(grads, max_norm):
    """Scale ``grads`` in place so their global norm is at most ``max_norm``; return the norm before."""
    norm = global_norm(grads)
    if max_norm is not None and norm > max_norm:
        for g in grads.values():
            g *= max_norm / (norm + 1e-6)
    return norm


def lr_at(step, *, lr, total_steps, warmup_steps=0, min_lr=0.0):
    """Learning rate at ``step`` (0-based): linear warmup to ``lr``, then cosine decay to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
