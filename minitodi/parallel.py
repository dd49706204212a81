"""The machinery beside the math: threads, BLAS threads, a batch run as shards, malloc settings.

Nothing here changes a number. The math of :mod:`minitodi.core` stays pure functions of their arrays,
run one after another; this module runs the same functions on parts of the work side by side on the CPU,
and adds the parts up in a fixed order:

- :func:`in_order`: ``[fn(item) for item in items]`` on a shared thread pool, results in item order.
  NumPy releases the GIL inside its loops, so threads share the work of one process.
- :func:`loss_and_grad`: a divergence of :data:`minitodi.core.losses.LOSSES` on its blocks of rows
  side by side (on CuPy arrays, FKL, RKL and ToDi in the fused kernels of :mod:`minitodi.fused`).
- :func:`adamw_step`: :func:`minitodi.core.optim.adamw_step` on groups of parameters side by side.
- :func:`one_blas_thread`: BLAS (the library behind NumPy's matrix products) on one thread inside a
  block, through threadpoolctl, which finds and limits OpenBLAS, MKL, BLIS and the others portably.
- :func:`forward_in_shards` and :func:`backward_in_shards`: the pure :func:`minitodi.core.model.forward`
  and :func:`minitodi.core.model.backward` on shards of whole sequences, side by side. The training step,
  the teacher's logits and the held-out losses go through them.
- :func:`reuse_freed_memory`: glibc's malloc tuned for NumPy's temporaries. A process-wide change, so
  only the command line and the demo's workers call it; call it yourself to opt in (see README).

The thread count is :data:`THREADS` when set, else the cores this process may run on.
"""

import concurrent.futures
import contextvars
import ctypes
import functools
import os
import threading
from contextlib import contextmanager

import numpy as np

from . import fused
from .core import losses, model, optim
from .core.device import array_module

THREADS = None  # threads for the losses' blocks of rows, AdamW's groups and the shards; None: cores()


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it, as on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads(xp=np) -> int:
    """:data:`THREADS`, or the cores this process may run on; 1 on CuPy (the GPU is the parallel part)."""
    if xp is not np:
        return 1
    return THREADS or cores()


# ---- an ordered map on a shared pool -------------------------------------------------------------
_WORKER_PREFIX = "minitodi"  # the pool's thread names start with it


def in_order(fn, items, threads):
    """[fn(item) for item in items] on up to ``threads`` threads, results in item order.

    Each task runs in a copy of the caller's context, so np.errstate and the like apply in the workers
    too. Inside one of the pool's own tasks the items run in turn in that task's thread: the pool is
    shared, and a task waiting on tasks queued behind it could wait forever.
    """
    items = list(items)
    inside_a_task = threading.current_thread().name.startswith(_WORKER_PREFIX)
    if threads <= 1 or len(items) <= 1 or inside_a_task:
        return [fn(item) for item in items]
    pool = _pool(threads)
    futures = [pool.submit(contextvars.copy_context().run, fn, item) for item in items]
    return [future.result() for future in futures]


@functools.cache
def _pool(threads):
    """One pool per thread count, made at first use (never at import)."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=_WORKER_PREFIX)


# ---- the losses' blocks of rows, AdamW's groups of parameters ------------------------------------
def loss_and_grad(name, student_logits, teacher_logits, mask=None, *, temperature=1.0, **options):
    """``LOSSES[name](student_logits, teacher_logits, mask, temperature=..., **options)``, side by side.

    The counted rows are cut into pieces of :data:`PIECE_BLOCKS` whole blocks (fixed by the batch alone,
    never by the thread count), each one call of the pure function with ``n_counted=N``, run on
    :func:`threads` threads; each writes its rows of the gradient and their losses are added in piece
    order. Every row's gradient is computed from that row alone, so the gradient is the pure function's
    bit for bit; the loss is its blocks' shares added in another grouping, equal to rounding. An error in
    a piece is raised again by the pure function on the whole batch, so that it names batch positions.
    On CuPy arrays FKL, RKL and ToDi (its weight detached, not at ``stopgrad_at``) run in the fused
    kernels of :mod:`minitodi.fused` instead: the same formulas, rounded in another order.
    """
    fn = losses.LOSSES[name]
    xp, s, t, mask, temperature, w = losses.check_inputs(student_logits, teacher_logits, mask, temperature,
                                                         options.get("stopgrad_at"))
    if xp is not np:
        if fused.applies(name, options, s, t):
            return fused.mean_loss(name, s, t, mask, temperature, **options)
        return fn(s, t, mask, temperature=temperature, **options)
    if "n_counted" in options:  # already a part of a larger batch, handed out by its caller
        return fn(s, t, mask, temperature=temperature, **options)
    V = s.shape[-1]
    s2 = s.reshape(-1, V)  # (..., V) -> (M, V)
    t2 = t.reshape(-1, V)
    rows = None  # every row counts
    if mask is not None and not bool(mask.all()):
        rows = xp.flatnonzero(mask.reshape(-1))
    n = s2.shape[0] if rows is None else int(rows.size)
    step = losses.rows_per_block(V)
    pieces = losses.row_blocks(rows, n, step * PIECE_BLOCKS)
    count = min(threads(xp), len(pieces))
    if count == 1:
        return fn(s, t, mask, temperature=temperature, **options)
    # every entry, counted or not, as the pure function checks them: the pieces read only counted rows
    losses.check_values({"student_logits": s, "teacher_logits": t, "stopgrad_at": w})
    grad = xp.zeros_like(s2)

    def piece(sel):  # one piece's rows of the gradient; returns its share of the mean
        piece_options = dict(options)
        if w is not None:
            piece_options["stopgrad_at"] = w.reshape(-1, V)[sel]
        share, grad[sel] = fn(s2[sel], t2[sel], temperature=temperature, n_counted=n, **piece_options)
        return share

    try:
        shares = in_order(piece, pieces, count)
    except ValueError:  # NaN, +inf, an infinite divergence: said with its position in the whole batch
        fn(s, t, mask, temperature=temperature, **options)
        raise
    loss = 0.0
    for share in shares:
        loss += share
    return loss, grad.reshape(s.shape)


# Blocks of rows a piece of a loss: each piece's gradient is its own array until copied into the whole
# one, so the pieces in flight (one a thread) cost memory, here 8 x 256 KiB a thread whatever the batch.
# Pieces of a sixteenth of the batch made the peak of ToDi at 2048 x 32000 float32 287 MB against 258 MB
# in one call; at 8 blocks it is 260 MB. Fixed, so the loss never depends on the thread count.
PIECE_BLOCKS = 8


def adamw_step(params, grads, state, **hyper):
    """:func:`minitodi.core.optim.adamw_step` with the parameters in groups side by side.

    Each parameter's update is its own, so the groups (:data:`GROUP_ENTRIES` entries or more each, about
    equal) run on :func:`threads` threads: the same numbers bit for bit as one call on all of them. The
    step counter advances once.
    """
    xp = array_module(*params.values())
    total = sum(x.size for x in params.values())
    count = min(threads(xp), 1 + total // GROUP_ENTRIES)
    if count == 1:
        optim.adamw_step(params, grads, state, **hyper)
        return
    groups = _balanced_groups({name: x.size for name, x in params.items()}, count)
    step = state["step"] + 1

    def update(names):
        part = {"step": step - 1, "m": state["m"], "v": state["v"]}  # the step this call advances
        optim.adamw_step({k: params[k] for k in names}, {k: grads[k] for k in names}, part, **hyper)

    in_order(update, groups, count)
    state["step"] = step


# The least work worth handing to a thread: a width-32 model's update was slower on two threads than on
# one (each group's few small arrays cost more in hand-offs than they save).
GROUP_ENTRIES = 1 << 18


def _balanced_groups(sizes, count):
    """The names of ``sizes`` in at most ``count`` groups of about equal total size (none empty).

    Largest first, each to the group with the least so far.
    """
    groups = [[] for _ in range(count)]
    loads = [0] * count
    for name in sorted(sizes, key=lambda name: -sizes[name]):
        lightest = loads.index(min(loads))
        groups[lightest].append(name)
        loads[lightest] += sizes[name]
    return [group for group in groups if group]


# ---- BLAS threads --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _blas():
    """threadpoolctl's controller of the BLAS libraries loaded in this process (possibly none).

    Imported here, at the first use, not with minitodi: importing threadpoolctl sets an environment
    variable (KMP_DUPLICATE_LIB_OK), and importing minitodi changes nothing process-wide.
    """
    import threadpoolctl

    return threadpoolctl.ThreadpoolController().select(user_api="blas")


def parallel_blas_calls() -> bool:
    """Whether :func:`one_blas_thread` finds a BLAS whose thread count it can set.

    Only then do matrix products from several threads run side by side: a multithreaded OpenBLAS called
    from two threads at once runs the calls in turn.
    """
    return len(_blas().lib_controllers) > 0


_BLAS_LOCK = threading.Lock()
_blas_state = {"inside": 0, "before": None}  # one_blas_thread's, process-wide like the count it sets


def _set_blas_threads(counts):
    """Set each BLAS library's thread count (a list, in threadpoolctl's order of the libraries).

    threadpoolctl (3.8) lets only one thread set OpenBLAS's process-wide count, the last one that did,
    until it lets go. Ours is shared by every thread that enters :func:`one_blas_thread`, and the thread
    that restores it may not be the one that set it: let go at once. (Where another thread holds it, a
    ``threadpool_limits`` block of the user's, our change is skipped and the user's limit stands.)
    """
    import threadpoolctl  # loaded already: _blas() imported it

    for lib, count in zip(_blas().lib_controllers, counts):
        lib.set_num_threads(count)
    let_go = getattr(threadpoolctl.OpenBLASController, "clear_controlling_thread", None)
    if let_go is not None:  # older threadpoolctl has no owner to let go
        let_go()


@contextmanager
def one_blas_thread():
    """BLAS on one thread inside the block, for threads that each run their own matrix products.

    The count is process-wide, so blocks open in several threads at once share it: the first one in
    sets it, the last one out restores the count from before the first. Where threadpoolctl finds no
    BLAS (:func:`parallel_blas_calls` is False) the block changes nothing.
    """
    libs = _blas().lib_controllers
    with _BLAS_LOCK:
        if _blas_state["inside"] == 0:
            _blas_state["before"] = [lib.num_threads for lib in libs]
            _set_blas_threads([1] * len(libs))
        _blas_state["inside"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_state["inside"] -= 1
            if _blas_state["inside"] == 0:
                _set_blas_threads(_blas_state["before"])


def _side_by_side(fn, items):
    """[fn(item) for item in items], on several threads where BLAS allows it, each thread's BLAS on one."""
    count = 1
    if parallel_blas_calls():
        count = min(len(items), threads())
    if count == 1:
        return [fn(item) for item in items]
    with one_blas_thread():
        return in_order(fn, items, count)


# ---- a batch run as shards of the pure model -----------------------------------------------------
SHARD_WORK = 1 << 16  # tokens x width per shard (512 x 128): less gains nothing from a thread of its own


def shards(B, T, C):
    """The batch's B sequences as contiguous slices of about :data:`SHARD_WORK` tokens x width each.

    Fixed by the batch's shape alone, so the numbers never depend on the number of threads. Measured on
    2 cores (interleaved A/B of the full step): width 32 at 1920 tokens was 1.16x slower sharded (a
    shard's work too small for a thread), width 64 at 1152 tokens 0.95x, width 128 0.82-0.88x.
    """
    count = max(1, min(B, B * T * C // SHARD_WORK))
    return [slice(i * B // count, (i + 1) * B // count) for i in range(count)]


def forward_in_shards(params, idx, config, *, rows=None):
    """:func:`minitodi.core.model.forward` on shards of whole sequences, side by side: (logits, cache).

    A sequence never meets another one, so the logits are the unsharded ones; :func:`backward_in_shards`
    adds the shards' gradients in shard order. ``rows`` (a boolean (B, T) mask) is as in model.forward:
    logits (n, V) in row-major order. On CuPy the batch is one shard (the GPU is the parallel part).
    """
    xp = array_module(*params.values())
    idx = xp.asarray(idx)
    model.check_ids(idx, config)
    B, T = idx.shape
    wte = params[model.ARCHITECTURES[config.model_type].embeddings[0]]  # (V, C): the width and the dtype
    if xp is not np:
        seqs = [slice(None)]
    else:
        seqs = shards(B, T, wte.shape[1])
    if len(seqs) == 1:
        logits, cache = model.forward(params, idx, config, rows=rows)
        return logits, {"shards": [(slice(None), cache)]}
    if rows is None:
        outs = seqs  # shard i writes the logits of its sequences
        logits_shape = (B, T, config.vocab_size)
    else:
        ends = np.cumsum([0] + [int(rows[seq].sum()) for seq in seqs])  # shard i's counted rows end here
        outs = [slice(ends[i], ends[i + 1]) for i in range(len(seqs))]
        logits_shape = (int(ends[-1]), config.vocab_size)
    logits = np.empty(logits_shape, dtype=wte.dtype)

    def shard(i):  # writes its rows of the logits, returns its cache
        shard_rows = None if rows is None else rows[seqs[i]]
        logits[outs[i]], cache = model.forward(params, idx[seqs[i]], config, rows=shard_rows)
        return cache

    caches = _side_by_side(shard, range(len(seqs)))
    return logits, {"shards": list(zip(outs, caches))}


def backward_in_shards(dlogits, cache):
    """:func:`minitodi.core.model.backward` of :func:`forward_in_shards`: the gradients of the whole batch.

    The shards' gradients are added in shard order, whatever the threads.
    """

    def shard(part):
        out, shard_cache = part
        return model.backward(dlogits[out], shard_cache)

    parts = _side_by_side(shard, cache["shards"])
    grads = parts[0]
    for part in parts[1:]:
        for name, g in part.items():
            grads[name] += g
    return grads


# ---- malloc --------------------------------------------------------------------------------------
# mallopt's parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory():
    """Let glibc's malloc keep freed memory for the next allocation instead of handing it back.

    By default every block of 128 KiB or more is mapped fresh and unmapped when freed, so each of a
    training step's NumPy temporaries faults its pages in again: 1.0 million page faults in 120 steps of
    the demo's teacher, 36 thousand with these thresholds (benchmarks/README.md). The change is
    process-wide and cannot be undone, so importing minitodi never makes it: ``minitodi`` on the command
    line and the demo's worker processes call this; a script or notebook may call it too. Returns
    whether it applied (Linux with glibc only; elsewhere it does nothing).
    """
    if os.name != "posix":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # blocks below 32 MiB come from the heap, not fresh mappings
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)  # the heap keeps up to 256 MiB of freed memory
    return True
