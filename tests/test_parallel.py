"""The machinery beside the math: the ordered map, BLAS threads, the batch as shards, malloc settings."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import threadpoolctl

from minitodi import parallel
from minitodi.core import model

needs_blas = pytest.mark.skipif(not parallel.parallel_blas_calls(),
                                reason="threadpoolctl finds no BLAS whose thread count it can set")


def _blas_threads():
    """The thread count of every BLAS threadpoolctl finds, as a set (one value when they agree)."""
    return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}


@needs_blas
def test_one_blas_thread_sets_one_and_restores_the_count():
    before = _blas_threads()
    with parallel.one_blas_thread():
        assert _blas_threads() == {1}
    assert _blas_threads() == before
    with pytest.raises(RuntimeError), parallel.one_blas_thread():
        raise RuntimeError("restored on the way out of an error too")
    assert _blas_threads() == before


@needs_blas
def test_one_blas_thread_inside_a_threadpool_limits_block_of_the_same_thread():
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        with parallel.one_blas_thread():
            assert _blas_threads() == {1}
        assert _blas_threads() == {2}


@needs_blas
def test_one_blas_thread_in_two_threads_at_once_restores_the_count_when_the_last_leaves():
    """Two threads in overlapping blocks: BLAS stays on one thread until the last leaves, then is restored.

    Thread a enters, b enters, a leaves while b is still inside, then b leaves: BLAS stays on one thread
    until b is out, and is restored after, by b (each block restoring its own "before" would leave it at 1,
    and so would a restore that threadpoolctl ignores because another thread set the count).
    """
    before = _blas_threads()
    if before == {1}:
        pytest.skip("BLAS runs on one thread already: nothing to restore")
    seen = []
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with parallel.one_blas_thread():
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with parallel.one_blas_thread():
            b_in.set()
            a_out.wait()
            seen.append(_blas_threads())

    workers = [threading.Thread(target=f) for f in (a, b)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert seen == [{1}]
    assert _blas_threads() == before


def test_in_order_keeps_the_order_and_runs_nested_calls_in_the_calling_task():
    """A task's own in_order runs its items in that task's thread, and results keep their order.

    Here two of three workers are busy: without the rule the items would go to the third, and with every
    worker busy they would wait forever.
    """
    def outer(i):
        me = threading.current_thread()
        return parallel.in_order(lambda j: (i, j, threading.current_thread() is me), range(3), 3)

    assert parallel.in_order(outer, range(2), 3) == [[(i, j, True) for j in range(3)] for i in range(2)]


def test_threads_default_to_the_cores_available_and_one_on_cupy():
    assert parallel.threads(np) == (parallel.THREADS or parallel.cores())
    assert parallel.threads(object()) == 1


def test_shards_are_whole_sequences_of_about_the_set_work():
    assert parallel.shards(7, 10, 16) == [slice(0, 7)]  # 1120 tokens x width: one shard
    assert parallel.shards(64, 64, 128) == [slice(i, i + 8) for i in range(0, 64, 8)]  # 8 shards of 8
    # never below one sequence
    assert parallel.shards(3, 4096, 128) == [slice(0, 1), slice(1, 2), slice(2, 3)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shards_give_the_whole_batch_numbers(arch, request, monkeypatch):
    """A batch run as 3 shards gives the pure model's numbers on the whole batch, on 1 thread or 3.

    The logits and gradients are those of the pure model on the whole batch (float64, to rounding; a shard
    without counted rows included), and the same numbers bit for bit on 1 or 3 threads.
    """
    config, params = request.getfixturevalue(f"small_{arch}")
    rng = np.random.default_rng(2)
    idx = rng.integers(0, config.vocab_size, size=(7, 10))
    rows = rng.random((7, 10)) < 0.4
    rows[2:4] = False  # the second shard, sequences 2 and 3, has no counted position
    calls = []
    original = parallel.in_order
    monkeypatch.setattr(parallel, "in_order", lambda fn, items, n: calls.append(n) or original(fn, items, n))
    monkeypatch.setattr(parallel, "SHARD_WORK", 20 * 16)  # 70 tokens of width 16: [0, 2), [2, 4), [4, 7)
    for r in (None, rows):
        want, cache = model.forward(params, idx, config, rows=r)
        dlogits = rng.standard_normal(want.shape)
        want_grads = model.backward(dlogits, cache)
        runs = []
        for threads in (1, 3):
            monkeypatch.setattr(parallel, "THREADS", threads)
            logits, cache = parallel.forward_in_shards(params, idx, config, rows=r)
            assert [c["shape"][0] for _, c in cache["shards"]] == [2, 2, 3]
            runs.append((logits, parallel.backward_in_shards(dlogits, cache)))
        for logits, grads in runs:
            np.testing.assert_array_equal(logits, runs[0][0])
            for name in want_grads:
                np.testing.assert_array_equal(grads[name], runs[0][1][name], err_msg=name)
        np.testing.assert_allclose(runs[0][0], want, rtol=1e-13, atol=1e-13)
        for name in want_grads:
            np.testing.assert_allclose(runs[0][1][name], want_grads[name], rtol=1e-12, atol=1e-13,
                                       err_msg=name)
    if parallel.parallel_blas_calls():
        assert calls == [3, 3] * 2  # forward and backward on 3 threads, with and without rows


def test_one_shard_is_the_pure_model(small_gpt2):
    """A batch below the shard size runs model.forward and model.backward themselves: bit for bit."""
    config, params = small_gpt2
    idx = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 8))
    want, cache = model.forward(params, idx, config)
    logits, sharded = parallel.forward_in_shards(params, idx, config)
    np.testing.assert_array_equal(logits, want)
    dlogits = np.random.default_rng(4).standard_normal(want.shape)
    grads, want_grads = parallel.backward_in_shards(dlogits, sharded), model.backward(dlogits, cache)
    for name in want_grads:
        np.testing.assert_array_equal(grads[name], want_grads[name], err_msg=name)


def test_shards_check_the_ids_of_the_whole_batch(small_gpt2):
    config, params = small_gpt2
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 37\)"):
        parallel.forward_in_shards(params, np.array([[0, 37]]), config)


IMPORT_CHANGES_NOTHING = """
import ctypes, sys
calls = []
libc = ctypes.CDLL(None)
class Spy:  # stands in for glibc's mallopt wherever minitodi looks it up
    def __call__(self, *args):
        calls.append(args)
        return 1
ctypes.CDLL = lambda *a, **k: type("L", (), {"mallopt": Spy()})()
import minitodi, minitodi.cli, minitodi.demo, minitodi.train, minitodi.core.losses, minitodi.parallel
assert calls == [], calls
assert minitodi.parallel.reuse_freed_memory() is True and len(calls) == 2, calls
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt is glibc's")
def test_importing_minitodi_tunes_no_malloc_and_the_opt_in_does():
    """No import of the package calls mallopt; reuse_freed_memory() sets its two thresholds."""
    subprocess.run([sys.executable, "-c", IMPORT_CHANGES_NOTHING], check=True)
