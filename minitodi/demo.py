"""``minitodi demo``: the ToDi paper's experiment at laptop size, on the built-in synthetic suite.

1. Build the suite and its tokenizer (:mod:`minitodi.presets` holds every size and budget).
2. Train the teacher with cross-entropy, or reuse it from the cache directory (``MINITODI_CACHE``,
   default ``~/.cache/minitodi``); its cache key hashes every setting that shapes it. A demo that finds
   another training the same teacher waits for it (:func:`_cache_entry_lock`).
3. Train students of one size and one budget for each training seed: ``sft`` (cross-entropy only) and one
   per divergence, (1 - kd_rate) CE + kd_rate KD from the frozen teacher. Students of one seed share their
   initial weights and the order of their batches: they differ only by their loss.
4. Evaluate every model on the test split under the paper's protocol (:mod:`minitodi.evaluation`).
5. Efficiency: milliseconds per distillation step and the peak memory of the KD loss, per divergence.
6. ``OUT/results.json``: :mod:`minitodi.report` computes the statistics over training seeds and writes it
   (the command line then prints its table and draws ``OUT/demo.png``).

This module runs things (the teacher and its cache, the students, the worker processes); what the
results say, and how they are shown, is :mod:`minitodi.report`'s.

Every run directory resumes (see :mod:`minitodi.rundir`), and a finished student is not trained again,
so an interrupted demo picks up where it stopped. ``OUT`` must be new, empty or an earlier demo's
(:func:`_claim`).
"""

import fcntl
import hashlib
import json
import multiprocessing
import numbers
import os
import signal
import threading
import time
import tracemalloc
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import checkpoint, data, parallel, report, rundir
from .core import losses, optim
from .core.device import to_numpy
from .core.layers import IGNORE_INDEX
from .core.model import init_params
from .evaluation import PAPER, evaluate
from .parallel import cores
from .presets import ARCHS, PRESETS
from .progress import Progress
from .teacher import Teacher
from .train import SFT, fit, settings, step_loss

DEFAULT_LOSSES = ("fkl", "rkl", "todi")
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
DONE = "summary.json"  # in a run directory: the run is finished (its summary), not to be trained again
# what a demo writes into OUT: (name, is a directory)
DEMO_OUTPUTS = {("students", True), (report.FIGURE_FILE, False), (report.RESULTS_FILE, False)}
REUSE_HINT = "an earlier demo with other settings left it: choose another --out (or delete that run)"
# A seed names its students' run directories (students/NAME-seedN): a bound keeps those names short (a seed
# of 1e300 would make a name too long for the file system, found only after the teacher trained). 2**32 - 1
# is the largest seed NumPy's legacy generator takes, so any seed a user is likely to have is allowed.
MAX_SEED = 2**32 - 1
PARENT_CHECK_S = 0.5  # how often a worker looks whether the demo that started it is still there


def cache_dir():
    """Where trained teachers are kept between demos: ``$MINITODI_CACHE``, else ``~/.cache/minitodi``.

    An empty MINITODI_CACHE counts as unset, as an empty XDG_CACHE_HOME does: Path("") would be the current
    directory, where the demo would leave teacher directories and lock files.
    """
    chosen = os.environ.get("MINITODI_CACHE", "")
    if not chosen:
        return Path.home() / ".cache" / "minitodi"
    return Path(chosen)


def _check_cache(cache):
    """The teacher cache ``cache`` must be, or be creatable as, a directory this process can write.

    Checked before the demo writes anything (its --out directory included): the nearest part of the path
    that exists must be a directory with write and search permission. A ValueError naming MINITODI_CACHE
    otherwise. os.access answers for this process's user (root writes anywhere but a read-only mount).
    """
    existing = cache
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is not writable"
    else:
        return
    raise ValueError(f"cannot use {cache} as the teacher cache (MINITODI_CACHE): {reason}")


def _key(settings):
    """A short hash of settings (a JSON-able dict): the name of what they produce in the cache."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _done_marker(run_dir):
    """The file that says a run is finished (it holds the run's summary)."""
    return Path(run_dir) / DONE


def _train_once(run_dir, config, tokenizer, train_examples, valid_examples, tcfg, teacher=None, **kwargs):
    """:func:`fit` unless ``run_dir`` holds a finished run of the same settings; the run's summary.

    A finished run is reused only when its whole run.json matches (model, training settings, tokenizer,
    teacher weights, data); one made with other settings is a clear error naming what differs.
    """
    done = _done_marker(run_dir)
    if done.exists():
        expected = settings(config, tokenizer, tcfg, teacher, train_examples, valid_examples)
        rundir.check_same_settings(run_dir, expected, hint=REUSE_HINT)
        return json.loads(done.read_text())
    summary = fit(run_dir, config, tokenizer, train_examples, valid_examples, tcfg, teacher=teacher, **kwargs)
    checkpoint.write_json(done, summary)
    return summary


def _claim(out):
    """``out``, created, if it is new, empty or the demo's own; else a ValueError.

    The demo's own: nothing but students/, demo.png and a results.json with students' scores. Checked
    before anything runs, so a wrong --out costs nothing and never overwrites a user's file.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory: choose a new or empty directory for --out")
    if out.exists() and not _is_demo_output(out):
        raise ValueError(f"{out} holds files that are not the demo's (students/, results.json, demo.png): "
                         "choose a new or empty directory for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that cannot be created or written to; the errno alone names no option
        raise ValueError(f"--out {out}: cannot create the directory: {err.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # found here, not when the first result is written
        raise ValueError(f"--out {out} is not writable: choose another directory or make it writable")
    return out


def _is_demo_output(out):
    """Whether the directory ``out`` holds only what an earlier demo wrote.

    Nothing but students/, demo.png and results.json; a results.json only if it is a demo's (JSON with
    the demo's keys), and a demo.png only beside one (the demo writes the figure after the results).
    """
    entries = {(p.name, p.is_dir()) for p in out.iterdir()}
    if not entries <= DEMO_OUTPUTS:
        return False
    results = out / report.RESULTS_FILE
    if results.exists():
        return report.is_results(results)
    return not (out / report.FIGURE_FILE).exists()


def efficiency(config, tokenizer, examples, teacher, names, tcfg, device, steps=30):
    """Per loss, the milliseconds of a training step and the memory of the KD loss alone.

    ms per training step: forward, CE + KD, backward, clipping, AdamW; the median of ``steps`` after one
    warm-up, the same batches for every loss, the losses taking turns step by step so that a change of
    machine load reaches them all. Per divergence, the peak memory of the KD loss and its gradient alone
    in MB (tracemalloc, on the host) at ``kd_shape``, the counted positions of a training batch by the
    vocabulary (the logits a training step computes).
    """
    teacher.precompute(examples, device)  # as training does: the teacher's logits come from its cache
    batches = data.BatchIterator(examples, tcfg.batch_size, pad_id=tokenizer.eos_id, seed=0, device=device)
    runs = {name: replace(tcfg, loss=name) for name in names}
    params = {name: init_params(config, 0, dtype=np.dtype(tcfg.dtype), device=device) for name in names}
    opts = {name: optim.adamw_init(params[name]) for name in names}
    times = {name: [] for name in names}
    for _ in range(steps + 1):
        idx, labels = next(batches)
        for name, run in runs.items():
            start = time.perf_counter()
            run_teacher = None if name == SFT else teacher
            grads = step_loss(params[name], config, idx, labels, run, run_teacher)[3]
            optim.clip_grad_norm(grads, run.grad_clip)
            parallel.adamw_step(params[name], grads, opts[name], lr=1e-4, weight_decay=run.weight_decay)
            times[name].append(1000 * (time.perf_counter() - start))
    counted = labels != IGNORE_INDEX
    result = {"ms_per_step": {name: float(np.median(t[1:])) for name, t in times.items()},  # after warm-up
              "kd_peak_mb": {},
              "kd_shape": [int(to_numpy(counted).sum()), config.vocab_size]}
    for name in names:
        if name != SFT:  # on the last batch
            result["kd_peak_mb"][name] = _kd_peak_mb(runs[name], params[name], config, idx, labels, teacher)
    return result


def _kd_peak_mb(tcfg, params, config, idx, labels, teacher):
    """The peak host memory in MB of one KD loss and its gradient, on one batch's counted positions."""
    counted = labels != IGNORE_INDEX
    s = to_numpy(parallel.forward_in_shards(params, idx, config, rows=counted)[0])
    t = to_numpy(teacher.batch_logits(idx, labels))
    tracemalloc.start()
    parallel.loss_and_grad(tcfg.loss, s, t, temperature=tcfg.temperature, **tcfg.loss_options)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak


class _Students:
    """Trains and evaluates one student: ``(name, seed)`` -> (its scores, its validation curve).

    The work of the demo's student phase, the same in this process or in a worker of :func:`_in_workers`.
    """

    def __init__(self, out, config, tcfg, tokenizer, split, teacher, test, device, progress):
        self.out = out
        self.config = config
        self.tcfg = tcfg
        self.tokenizer = tokenizer
        self.split = split
        self.teacher = teacher
        self.test = test
        self.device = device
        self.progress = progress

    def __call__(self, name, seed):
        run_dir = self.out / "students" / f"{name}-seed{seed}"
        tcfg = replace(self.tcfg, loss=name, seed=seed)
        teacher = None if name == SFT else self.teacher  # an SFT student learns from the labels alone
        summary = _train_once(run_dir, self.config, self.tokenizer, self.split["train"], self.split["valid"],
                              tcfg, teacher=teacher, device=self.device, progress=self.progress,
                              label=f"{name} seed {seed}")
        params, config = checkpoint.load(run_dir, device=self.device)
        row = report.scores(evaluate(params, config, self.tokenizer, teacher=self.teacher, **self.test))
        return {"seed": seed, **row}, summary["valid_curve"]


_WORKER = {}  # a worker process's _Students


def _start_worker(students, threads, parent_pid):
    """A worker process's set-up: Ctrl-C, its threads and malloc, its _Students, a watch on its parent."""
    # Ctrl-C reaches a worker only inside fit, which saves and stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parallel.THREADS = threads
    parallel.reuse_freed_memory()  # as the command line does in the parent
    _WORKER["students"] = students
    watch = threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True)
    watch.start()


def _exit_when_orphaned(parent_pid):
    """End this worker when the demo that started it is gone (killed with SIGKILL, say).

    An orphaned worker would finish its student and then wait forever on a pipe nobody reads, holding its
    memory and its run directory's lock. Its run directory resumes from its last saved state.
    """
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _work(name, seed):
    return _WORKER["students"](name, seed)


def _in_workers(students, runs, jobs, progress):
    """``{run: students(*run)}`` from ``jobs`` processes, each on cores / jobs threads (BLAS and the losses).

    A run's numbers do not depend on the thread count. On Ctrl-C the runs in progress save their state.
    """
    threads = max(1, cores() // jobs)
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_start_worker,
                               initargs=(students, threads, os.getpid()))
    queue = iter(runs)
    running = {}  # future -> run
    results = {}

    def start_next():  # one run per worker at a time: on Ctrl-C no run is left queued to start
        run = next(queue, None)
        if run is not None:
            running[pool.submit(_work, *run)] = run

    with pool, Progress(len(runs), f"students, {jobs} at a time", every=1, enabled=progress) as bar:
        saved = dict(os.environ)
        os.environ.update(dict.fromkeys(BLAS_THREADS, str(threads)))  # read as a spawned worker imports NumPy
        try:
            for _ in range(jobs):
                start_next()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        while running:  # on Ctrl-C, leaving the block waits for the running ones to save their state
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                name, seed = running.pop(future)
                row, curve = future.result()
                results[name, seed] = row, curve
                bar.update(**{f"{name} seed {seed}: ROUGE-L": row["rouge_l"]})
                start_next()
    return results


def _check_run_arguments(preset, arch, loss_names, seeds, jobs):
    """The demo's own arguments, checked before anything is written or trained: a one-line ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    _check_losses(loss_names)
    if seeds is not None:
        _check_seeds(seeds)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")


def _check_losses(loss_names):
    """Distinct names of divergences, at least one (sft, the student without a teacher, always runs)."""
    if isinstance(loss_names, str):  # "todi" would otherwise be read as the losses t, o, d, i
        raise ValueError(f"losses must be a list of names, got the string {loss_names!r}")
    if len(loss_names) == 0:
        raise ValueError(f"losses: name at least one divergence to distil with, from {sorted(losses.LOSSES)}")
    if SFT in loss_names:
        raise ValueError(f"{SFT} is always trained (the students without a teacher): losses names only the "
                         f"divergences, from {sorted(losses.LOSSES)}")
    unknown = [n for n in loss_names if n not in losses.LOSSES]
    if unknown:
        raise ValueError(f"unknown losses {unknown}: choose from {sorted(losses.LOSSES)}")
    repeated = _given_twice(loss_names)
    if repeated:  # two students of one loss and seed would share, and fight over, one run directory
        raise ValueError(f"losses {repeated} are given more than once: each loss is one student per seed")


def _check_seeds(seeds):
    """Distinct integers in [0, MAX_SEED] (NumPy's too), at least one: each names students' directories."""
    if len(seeds) == 0:
        raise ValueError("seeds: give at least one training seed")
    bad = [s for s in seeds if not _is_seed(s)]
    if bad:
        raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {bad}")
    repeated = _given_twice(seeds)
    if repeated:  # one student counted twice would shrink the intervals to nothing
        raise ValueError(f"seeds {repeated} are given more than once: each training seed is one student")


def _is_seed(value):
    """Whether ``value`` is an integer (not a bool) in [0, MAX_SEED]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return 0 <= value <= MAX_SEED


def _given_twice(values):
    """The values that occur more than once in ``values``, sorted."""
    values = list(values)
    return sorted({v for v in values if values.count(v) > 1})


def _check_earlier_students(out, cfg, student_cfg, tokenizer, loss_names):
    """Students an earlier demo left in ``out`` must have this demo's settings: checked before the teacher.

    Their model, training settings and tokenizer here; their teacher and data when they are reused.
    """
    for name in (SFT, *loss_names):
        for seed in cfg.seeds:
            run_dir = out / "students" / f"{name}-seed{seed}"
            if (run_dir / rundir.RUN_FILE).exists():
                tcfg = replace(cfg.student_train, loss=name, seed=seed)
                expected = settings(student_cfg, tokenizer, tcfg, None, [], [])
                rundir.check_same_settings(run_dir, expected, parts=("model", "train", "tokenizer"),
                                           hint=REUSE_HINT)


def _teacher(cfg, suite, tokenizer, split, device, progress, log):
    """The trained teacher, from the cache or trained now: (Teacher, its summary, its run directory)."""
    teacher_cfg, _ = cfg.models(tokenizer.vocab_size)
    shaping = {"model": asdict(teacher_cfg), "train": asdict(cfg.teacher_train),  # every setting shaping it
               "tokenizer": tokenizer.fingerprint(),
               "suite": [cfg.n_train, cfg.n_valid, cfg.n_test, cfg.seq_len, cfg.families]}
    teacher_dir = cache_dir() / f"teacher-{_key(shaping)}"
    with _cache_entry_lock(teacher_dir, log):
        cached = ""
        if _done_marker(teacher_dir).exists():
            cached = " (cached)"
        log(f"teacher: {teacher_dir}{cached}")
        summary = _train_once(teacher_dir, teacher_cfg, tokenizer, split["train"], split["valid"],
                              cfg.teacher_train, device=device, progress=progress, label="teacher")
    return Teacher.load(teacher_dir, device=device), summary, teacher_dir


@contextmanager
def _cache_entry_lock(entry, log):
    """Hold the cache entry ``entry`` (a teacher's run directory) for this process; wait while another does.

    Two demos started at once on an empty cache would both train the teacher, and the second would find
    its run directory locked and stop. Instead the entry has a lock file beside it, ``ENTRY.lock``: the
    second demo says whom it waits for and waits, then finds the teacher finished and reuses it (or
    resumes it, if the first demo was stopped). An advisory flock, which the OS drops when its holder
    dies, so a killed demo never blocks the next; the holder writes its pid into the file for the message.
    """
    lock_file = entry.parent / f"{entry.name}.lock"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: a holder's pid stays readable
    except OSError as err:
        raise ValueError(f"cannot use {entry.parent} as the teacher cache (MINITODI_CACHE): "
                         f"{err.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for the teacher being trained by {_lock_holder(lock_file)} ({entry})")
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait
        _write_holder(fd, f"{os.getpid()}")
        try:
            yield
        finally:
            _write_holder(fd, "")  # a pid left behind would name a process that holds nothing
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_holder(fd, text):
    """Replace the content of the open lock file ``fd`` with ``text``."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _lock_holder(lock_file):
    """Who holds ``lock_file``: "pid N", or "another process" before the holder has written its pid."""
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        pid = ""
    if pid.isdigit():
        return f"pid {pid}"
    return "another process"


def run(out, *, preset="full", loss_names=DEFAULT_LOSSES, seeds=None, protocol=PAPER, device="cpu",
        arch="gpt2", jobs=1, progress=True, log=print):
    """Run the demo into ``out``; returns the results dict also written to ``out/results.json``.

    Models of ``arch`` (gpt2 or llama); ``jobs`` students trained at once, in as many processes (1 on a
    GPU).
    """
    _check_run_arguments(preset, arch, loss_names, seeds, jobs)
    cfg = replace(PRESETS[preset], arch=arch)
    if seeds is not None:
        cfg = replace(cfg, seeds=tuple(int(seed) for seed in seeds))  # NumPy's integers as Python's
    _check_cache(cache_dir())
    out = _claim(Path(out))
    start = time.perf_counter()
    cpu_start = time.process_time()
    suite = cfg.dataset()
    tokenizer, split = data.prepare(suite, cfg.seq_len, vocab_size=cfg.vocab_size)
    _, student_cfg = cfg.models(tokenizer.vocab_size)
    _check_earlier_students(out, cfg, student_cfg, tokenizer, loss_names)
    teacher, teacher_summary, teacher_dir = _teacher(cfg, suite, tokenizer, split, device, progress, log)
    test = {"records": suite["test"], "examples": split["test"], "protocol": protocol,
            "max_new_tokens": cfg.max_new_tokens, "device": device}
    teacher_scores = report.scores(evaluate(teacher.params, teacher.config, tokenizer, **test))
    names = (SFT, *loss_names)
    runs = [(name, seed) for name in names for seed in cfg.seeds]
    if device != "cpu":
        jobs = 1  # one GPU: students one after the other
    jobs = min(jobs, len(runs))
    students = _Students(out, student_cfg, cfg.student_train, tokenizer, split, teacher, test, device,
                         progress and jobs == 1)
    if jobs > 1:
        done = _in_workers(students, runs, jobs, progress)
    else:
        done = {run: students(*run) for run in runs}
    teacher_curve = teacher_summary["valid_curve"]
    results = report.assemble(protocol, teacher_scores, teacher_curve, names, cfg.seeds, done)
    for name in names:
        log(f"{name:>5}: ROUGE-L {results['students'][name]['rouge_l']:.1f}")
    results["efficiency"] = efficiency(student_cfg, tokenizer, split["train"], teacher, names,
                                       cfg.student_train, device)
    results["config"] = {"preset": preset, "device": device, "seeds": list(cfg.seeds), "jobs": jobs,
                         "losses": list(names), "demo": json.loads(json.dumps(asdict(cfg), default=str)),
                         "teacher_dir": str(teacher_dir), "seconds": time.perf_counter() - start,
                         "cpu_seconds": time.process_time() - cpu_start}
    report.write(out, results)
    return results
