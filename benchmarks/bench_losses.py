"""Loss + gradient for every divergence: minitodi against the PyTorch formulation, side by side.

    python benchmarks/bench_losses.py                      # 2048 x 32000 float32, every loss, CPU
    python benchmarks/bench_losses.py --losses todi fkl --device gpu
    python benchmarks/bench_losses.py --roofline            # exp and copy rates, the ToDi roofline

Each measurement runs in a fresh child process, so peak memory is that run's alone: the child makes
its inputs, notes its peak resident memory (CPU) or allocator peak (GPU), runs the loss + gradient
once to warm up and ``--repeat`` times more, and reports the best wall time and the peak extra
memory over the inputs. Throughput counts the two logit arrays read: 2 * positions * V * itemsize.
"x FKL" is each loss's time and peak memory over FKL's at the same shape (the paper's efficiency
question: what ToDi costs over FKL). minitodi runs its blocks of rows on ``--threads`` threads
(default: the cores available, as the library does).

``--roofline`` measures, on blocks of the library's size, how fast this machine evaluates exp and
makes a copy pass over float32 (one thread, then ``--threads``), and turns them into a lower bound
for ToDi: per entry about five transcendental passes (exp of the two log-softmaxes' shifted logits,
exp of log p and log q, tanh of the weight) and six memory passes (read s and t, the log-softmax
outputs, the gradient write), so time >= entries * (5 / exp rate + 6 / copy rate) / threads.

On a GPU (``--device gpu``) the script also times the fused CuPy kernels of ``minitodi.fused`` (FKL,
RKL, ToDi) against the plain CuPy array path and reports their achieved memory bandwidth against the
GPU's peak.

The PyTorch side (run only when torch is installed) writes each loss the way the official ToDi code
does: full (positions, V) tensors for the softmaxes, log-softmaxes, weights and terms, kept for
autograd, then ``loss.backward()``.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LOSS_NAMES = ["fkl", "rkl", "todi", "jsd", "tvd", "sfkl", "srkl", "akl"]


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------- PyTorch side


def torch_loss(name, s, t, temperature, torch):
    """The divergence written as the official code writes it (autograd keeps every temporary)."""
    s, t = s / temperature, t / temperature
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    inf = s.isinf() | t.isinf()
    if name == "fkl":
        d = p * (lp - lq)
    elif name == "rkl":
        d = q * (lq - lp)
    elif name == "todi":
        wp, wq = torch.sigmoid(lp - lq).detach(), torch.sigmoid(lq - lp).detach()
        d = wp * p * (lp - lq) + wq * q * (lq - lp)
    elif name == "jsd":
        m = (p + q) / 2
        d = (0.5 * p * (torch.log(p + 1e-9) - torch.log(m + 1e-9))
             + 0.5 * q * (torch.log(q + 1e-9) - torch.log(m + 1e-9)))
    elif name == "tvd":
        d = 0.5 * (p - q).abs()
    elif name == "sfkl":
        d = p * (lp - torch.log(0.1 * p + 0.9 * q))
    elif name == "srkl":
        d = q * (lq - torch.log(0.9 * p + 0.1 * q))
    elif name == "akl":
        sp, order = p.sort(-1)
        gap = (sp - q.gather(-1, order)).abs()
        tail = (torch.cumsum(sp, -1) <= 0.5).float()
        g_head, g_tail = (gap * (1 - tail)).sum(-1).detach(), (gap * tail).sum(-1).detach()
        fkl = (p * (lp - lq)).masked_fill(inf, 0).sum(-1)
        rkl = (q * (lq - lp)).masked_fill(inf, 0).sum(-1)
        return ((g_head * fkl + g_tail * rkl) / (g_head + g_tail)).mean()
    return d.masked_fill(inf, 0).sum(-1).mean()


# ------------------------------------------------------------------------------------------- child


def child(args):
    """One measurement, in this fresh process: make the inputs, warm up, time, print one JSON line."""
    import numpy as np

    rng = np.random.default_rng(0)
    s = rng.standard_normal((args.positions, args.vocab), dtype=np.float32)
    t = rng.standard_normal((args.positions, args.vocab), dtype=np.float32)
    if args.impl in ("minitodi", "minitodi-plain"):
        run = minitodi_run(args, s, t)
    else:
        run = torch_run(args, s, t)
    sync, peak = sync_and_peak(args)

    run()
    sync()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    nbytes = 2 * args.positions * args.vocab * 4
    print(json.dumps({"seconds": best, "gbps": nbytes / best / 1e9, "peak_mb": peak() / 2**20}))


def minitodi_run(args, s, t):
    """minitodi's loss + gradient on s and t moved to ``--device``, as a function of no arguments."""
    from minitodi import parallel
    from minitodi.core import device
    from minitodi.core.losses import LOSSES

    parallel.reuse_freed_memory()  # as the command line runs minitodi
    parallel.THREADS = args.threads
    xp = device.get_xp(args.device)
    s, t = xp.asarray(s), xp.asarray(t)

    def run():
        if args.impl == "minitodi":  # as training runs it: blocks on threads, or the fused CuPy kernels
            parallel.loss_and_grad(args.loss, s, t, temperature=2.0)
        else:  # plain: the pure function, its blocks one after another, the array path also on CuPy
            LOSSES[args.loss](s, t, temperature=2.0)
    return run


def torch_run(args, s, t):
    """The official formulation's loss + backward on s and t moved to ``--device``, no arguments."""
    import torch

    dev = "cuda" if args.device == "gpu" else "cpu"
    s, t = torch.from_numpy(s).to(dev), torch.from_numpy(t).to(dev)

    def run():
        x = s.clone().requires_grad_(True)
        torch_loss(args.loss, x, t, 2.0, torch).backward()
        return x.grad
    return run


def sync_and_peak(args):
    """(sync, peak): wait for the device; the peak memory in bytes above what is in use now (the inputs).

    On the CPU that is the process's peak resident memory; on the GPU, the allocator's high-water mark
    (CuPy's memory pool for minitodi, torch.cuda's statistics for PyTorch).
    """
    gpu = args.device == "gpu"
    sync = lambda: None  # noqa: E731
    if gpu and args.impl != "torch":
        import cupy

        sync = cupy.cuda.Device().synchronize
        pool = cupy.get_default_memory_pool()
        base = pool.used_bytes()
        peak = lambda: pool.total_bytes() - base  # noqa: E731  (pool high-water over the inputs)
    elif gpu:
        import torch

        sync = torch.cuda.synchronize
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        peak = lambda: torch.cuda.max_memory_allocated() - base  # noqa: E731
    else:
        base = peak_rss_bytes()
        peak = lambda: peak_rss_bytes() - base  # noqa: E731
    return sync, peak


def measure(args, impl, loss):
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--loss", loss,
           "--positions", str(args.positions), "--vocab", str(args.vocab),
           "--repeat", str(args.repeat), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {loss} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a, b):
    """a / b, or nan when b is 0 (a peak below the resolution of the RSS measure, at small shapes)."""
    return a / b if b else math.nan


def parse_args():
    from minitodi.parallel import cores

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--losses", nargs="+", default=LOSS_NAMES, choices=LOSS_NAMES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--threads", type=int, default=cores(),
                        help="threads for minitodi's blocks of rows (default: the cores available)")
    parser.add_argument("--roofline", action="store_true", help="measure exp and copy rates instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="minitodi", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="todi", help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_args()
    if args.child:
        return child(args)
    if args.roofline:
        return roofline(args)
    losses_table(args)
    if args.device == "gpu":
        fused_report(args)


def losses_table(args):
    """One row per loss: minitodi's time, throughput and peak memory, over FKL's, and against PyTorch's."""
    try:
        import torch
        have_torch = True
        torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        have_torch = False
        torch_note = "torch not installed: minitodi only"
    print(f"loss + gradient, {args.positions} x {args.vocab} float32, T=2, {args.device}, "
          f"best of {args.repeat}; minitodi on {args.threads} threads; {torch_note}")
    header = f"{'loss':<6} {'minitodi s':>10} {'GB/s':>6} {'peak MB':>8} {'x FKL s':>8} {'x FKL MB':>8}"
    if have_torch:
        header += f" {'torch s':>8} {'peak MB':>8} {'time x':>7} {'mem x':>6}"
    print(header)
    fkl = measure(args, "minitodi", "fkl")
    for loss in args.losses:
        ours = fkl if loss == "fkl" else measure(args, "minitodi", loss)
        line = (f"{loss:<6} {ours['seconds']:>10.3f} {ours['gbps']:>6.2f} {ours['peak_mb']:>8.0f} "
                f"{ratio(ours['seconds'], fkl['seconds']):>8.2f} "
                f"{ratio(ours['peak_mb'], fkl['peak_mb']):>8.2f}")
        if have_torch:
            ref = measure(args, "torch", loss)
            line += (f" {ref['seconds']:>8.3f} {ref['peak_mb']:>8.0f} "
                     f"{ratio(ours['seconds'], ref['seconds']):>7.2f} "
                     f"{ratio(ours['peak_mb'], ref['peak_mb']):>6.2f}")
        print(line, flush=True)


def roofline(args):
    """Rates of exp and of a copy pass on float32 blocks of the library's size, 1 and --threads threads."""
    import concurrent.futures

    import numpy as np

    from minitodi.core.losses import BLOCK_ELEMENTS

    entries = args.positions * args.vocab
    blocks = [np.random.default_rng(i).standard_normal(BLOCK_ELEMENTS, dtype=np.float32)
              for i in range(2 * args.threads)]
    outs = [np.empty_like(b) for b in blocks]

    def rate(op, threads):  # entries per second, best of --repeat, every block done `rounds` times
        rounds = 8
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            best = math.inf
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                list(pool.map(lambda i: [op(blocks[i], outs[i]) for _ in range(rounds)], range(len(blocks))))
                best = min(best, time.perf_counter() - t0)
        return rounds * len(blocks) * BLOCK_ELEMENTS / best

    print(f"float32 blocks of {BLOCK_ELEMENTS} entries; ToDi at {args.positions} x {args.vocab}")
    for threads in sorted({1, args.threads}):
        exp_rate = rate(lambda x, out: np.exp(x, out=out), threads)
        copy_rate = rate(lambda x, out: np.copyto(out, x), threads)
        bound = entries * (5 / exp_rate + 6 / copy_rate)
        print(f"{threads} thread(s): exp {exp_rate / 1e9:.2f} Gelem/s, copy {copy_rate / 1e9:.2f} Gelem/s "
              f"({copy_rate * 8 / 1e9:.1f} GB/s read + write); ToDi roofline {bound:.3f} s")


def gpu_peak_gbps():
    """Theoretical memory bandwidth of GPU 0 from its memory clock and bus width (None if not reported)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    clock_khz, bus_bits = props.get("memoryClockRate"), props.get("memoryBusWidth")
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def fused_report(args):
    """The fused CuPy kernels against the plain CuPy path, and their achieved bandwidth.

    The fused path reads each logit array 5 times (max, sum-exp, divergence, sum of g, gradient) and
    writes the gradient once: 11 arrays of positions x V float32 cross the memory bus.
    """
    peak = gpu_peak_gbps()
    peak_note = "unknown"
    if peak is not None:
        peak_note = f"{peak:.0f} GB/s"
    print(f"\nfused CuPy kernels vs the plain CuPy path; GPU peak memory bandwidth {peak_note}")
    print(f"{'loss':<6} {'fused s':>9} {'plain s':>9} {'speed-up':>9} {'achieved GB/s':>14} {'of peak':>8}")
    traffic = 11 * args.positions * args.vocab * 4
    for loss in [name for name in ("fkl", "rkl", "todi") if name in args.losses]:
        fused = measure(args, "minitodi", loss)
        plain = measure(args, "minitodi-plain", loss)
        achieved = traffic / fused["seconds"] / 1e9
        share = "" if peak is None else f"{achieved / peak:>8.0%}"
        print(f"{loss:<6} {fused['seconds']:>9.4f} {plain['seconds']:>9.4f} "
              f"{plain['seconds'] / fused['seconds']:>8.1f}x {achieved:>14.0f} {share}", flush=True)


if __name__ == "__main__":
    main()
