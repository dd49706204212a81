"""``minitodi demo``: the ToDi paper's experiment at laptop size, on the built-in synthetic suite.

1. Build the suite and its tokenizer (:mod:`minitodi.presets` holds every size and budget).
2. Train the teacher with cross-entropy, or reuse it from the cache directory (``MINITODI_CACHE``,
   default ``~/.cache/minitodi``); its cache key hashes every setting that shapes it.
3. Train students of one size and one budget for each training seed: ``sft`` (cross-entropy only) and one
   per divergence, (1 - kd_rate) CE + kd_rate KD from the frozen teacher. Students of one seed share their
   initial weights and the order of their batches: they differ only by their loss.
4. Evaluate every model on the test split under the paper's protocol (:mod:`minitodi.evaluation`).
5. Statistics: each student's mean over training seeds with its standard error; for every other student X,
   the difference todi - X seed by seed, its mean and Student-t 95% interval. Efficiency: milliseconds per
   distillation step and the peak memory of the KD loss, per divergence. A table, ``OUT/results.json`` and
   ``OUT/demo.png``.

Every run directory resumes (see :mod:`minitodi.train`), and a finished student is not trained again, so
an interrupted demo picks up where it stopped. ``OUT`` must be new, empty or an earlier demo's (:func:`_claim`).
"""

import hashlib
import json
import math
import multiprocessing
import os
import signal
import time
import tracemalloc
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import checkpoint, data, losses, metrics, optim, parallel
from .device import to_numpy
from .evaluation import PAPER, evaluate
from .layers import IGNORE_INDEX
from .model import init_params
from .parallel import cores
from .presets import PRESETS
from .progress import Progress
from .teacher import Teacher
from .train import SFT, fit, step_loss

DEFAULT_LOSSES = ("fkl", "rkl", "todi")
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
METRICS = ("rouge_l", "exact_match", "validity", "coverage", "perplexity", "divergence")
DONE = "summary.json"  # in a run directory: the run is finished (its summary), not to be trained again
DEMO_OUTPUTS = {("students", True), ("demo.png", False), ("results.json", False)}  # (name, is a directory)


def cache_dir():
    return Path(os.environ.get("MINITODI_CACHE", Path.home() / ".cache" / "minitodi"))


def _train_once(run_dir, *args, **kwargs):
    """:func:`fit` unless ``run_dir`` holds a finished run; the run's summary either way."""
    done = Path(run_dir) / DONE
    if done.exists():
        return json.loads(done.read_text())
    summary = fit(run_dir, *args, **kwargs)
    checkpoint.write_json(done, summary)
    return summary


def _claim(out):
    """``out``, created, if it is new, empty or the demo's own (nothing but students/, demo.png and a results.json
    with students' scores); else a ValueError. Checked before anything runs: a wrong --out costs nothing.
    """
    results = out / "results.json"
    if out.exists() and not (out.is_dir() and {(p.name, p.is_dir()) for p in out.iterdir()} <= DEMO_OUTPUTS
                             and (not results.exists() or '"students"' in results.read_text(errors="replace"))):
        raise ValueError(f"{out} holds files that are not the demo's (students/, results.json, demo.png): choose a "
                         "new or empty directory for --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _row(evaluation):
    return {k: evaluation[k] for k in (*METRICS, "rouge_l_se", "rouge_l_per_eval_seed", "per_task")}


def _summarise(per_seed):
    """Means over training seeds; ``rouge_l_se`` the standard error of the mean over them (None for one)."""
    columns = {metric: [r[metric] for r in per_seed] for metric in METRICS}
    out = {metric: None if None in values else float(np.mean(values)) for metric, values in columns.items()}
    se = metrics.mean_se(columns["rouge_l"])[1]
    return {**out, "rouge_l_se": None if math.isnan(se) else se, "seeds": per_seed}


def comparisons(students):
    """todi - X in ROUGE-L for every other student X, paired by training seed (mean, 95% interval, n)."""
    if "todi" not in students:
        return {}
    todi = [r["rouge_l"] for r in students["todi"]["seeds"]]
    return {f"todi-{name}": metrics.paired_difference(todi, [r["rouge_l"] for r in row["seeds"]])
            for name, row in students.items() if name != "todi"}


def efficiency(config, tokenizer, examples, teacher, names, tcfg, device, steps=30):
    """Per loss: ms per training step (forward, CE + KD, backward, clipping, AdamW; the median of ``steps``
    after one warm-up, the same batches for every loss, the losses taking turns step by step so that a
    change of machine load reaches them all) and, per divergence, the peak memory of the KD loss and its
    gradient alone in MB (tracemalloc, on the host) at ``kd_shape``, the counted positions of a training
    batch by the vocabulary (the logits a training step computes).
    """
    teacher.precompute(examples, device)  # as training does: the teacher's logits come from its cache
    batches = data.BatchIterator(examples, tcfg.batch_size, pad_id=tokenizer.eos_id, seed=0, device=device)
    runs = {name: replace(tcfg, loss=name) for name in names}
    params = {name: init_params(config, 0, dtype=np.dtype(tcfg.dtype), device=device) for name in names}
    opts, times = {name: optim.adamw_init(params[name]) for name in names}, {name: [] for name in names}
    for _ in range(steps + 1):
        idx, labels = next(batches)
        for name, run in runs.items():
            start = time.perf_counter()
            grads = step_loss(params[name], config, idx, labels, run, None if name == SFT else teacher)[3]
            optim.clip_grad_norm(grads, run.grad_clip)
            optim.adamw_step(params[name], grads, opts[name], lr=1e-4, weight_decay=run.weight_decay)
            times[name].append(1000 * (time.perf_counter() - start))
    result = {"ms_per_step": {name: float(np.median(t[1:])) for name, t in times.items()}, "kd_peak_mb": {},
              "kd_shape": [int((to_numpy(labels) != IGNORE_INDEX).sum()), config.vocab_size]}
    for name in [n for n in names if n != SFT]:  # on the last batch
        s = to_numpy(parallel.forward_in_shards(params[name], idx, config, rows=labels != IGNORE_INDEX)[0])
        t = to_numpy(teacher.batch_logits(idx, labels))
        tracemalloc.start()
        losses.LOSSES[name](s, t, temperature=runs[name].temperature, **runs[name].loss_options)
        result["kd_peak_mb"][name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result


class _Students:
    """Trains and evaluates one student, ``(name, seed)`` -> (its scores, its validation curve): the work of
    the demo's student phase, the same in this process or in a worker of :func:`_in_workers`.
    """

    def __init__(self, out, config, tcfg, tokenizer, split, teacher, test, device, progress):
        self.__dict__.update(out=out, config=config, tcfg=tcfg, tokenizer=tokenizer, split=split, teacher=teacher,
                             test=test, device=device, progress=progress)

    def __call__(self, name, seed):
        run_dir, device = self.out / "students" / f"{name}-seed{seed}", self.device
        summary = _train_once(run_dir, self.config, self.tokenizer, self.split["train"], self.split["valid"],
                              replace(self.tcfg, loss=name, seed=seed), teacher=None if name == SFT else self.teacher,
                              device=device, progress=self.progress, label=f"{name} seed {seed}")
        params, config = checkpoint.load(run_dir, device=device)
        row = _row(evaluate(params, config, self.tokenizer, teacher=self.teacher, **self.test))
        return {"seed": seed, **row}, summary["valid_curve"]


_WORKER = {}  # a worker process's _Students


def _start_worker(students, threads):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches a worker only inside fit, which saves and stops
    parallel.THREADS = threads
    parallel.reuse_freed_memory()
    _WORKER["students"] = students


def _work(name, seed):
    return _WORKER["students"](name, seed)


def _in_workers(students, runs, jobs, progress):
    """``{run: students(*run)}`` from ``jobs`` processes, each on cores / jobs threads (BLAS and the losses);
    a run's numbers do not depend on the thread count. On Ctrl-C the runs in progress save their state.
    """
    threads = max(1, cores() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(students, threads))
    queue, running, results = iter(runs), {}, {}

    def start_next():  # one run per worker at a time: on Ctrl-C no run is left queued to start
        if (run := next(queue, None)) is not None:
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
                (name, seed), (row, curve) = running.pop(future), future.result()
                results[name, seed] = row, curve
                bar.update(**{f"{name} seed {seed}: ROUGE-L": row["rouge_l"]})
                start_next()
    return results


def run(out, *, preset="full", loss_names=DEFAULT_LOSSES, seeds=None, protocol=PAPER, device="cpu",
        arch="gpt2", jobs=1, progress=True, log=print):
    """Run the demo into ``out`` with models of ``arch`` (gpt2 or llama), training ``jobs`` students at once
    (in as many processes; 1 on a GPU); returns the results dict also written to ``out/results.json``.
    """
    cfg = replace(PRESETS[preset], arch=arch, seeds=PRESETS[preset].seeds if seeds is None else tuple(seeds))
    if unknown := [n for n in loss_names if n not in losses.LOSSES]:
        raise ValueError(f"unknown losses {unknown}: choose from {sorted(losses.LOSSES)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    out = _claim(Path(out))
    start, cpu_start = time.perf_counter(), time.process_time()
    suite = cfg.dataset()
    tokenizer, split = data.prepare(suite, cfg.seq_len, vocab_size=cfg.vocab_size)
    teacher_cfg, student_cfg = cfg.models(tokenizer.vocab_size)
    shaping = {"model": asdict(teacher_cfg), "train": asdict(cfg.teacher_train), "tokenizer": tokenizer.fingerprint(),
               "suite": [cfg.n_train, cfg.n_valid, cfg.n_test, cfg.seq_len, cfg.families]}  # every setting shaping it
    teacher_key = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]
    teacher_dir = cache_dir() / f"teacher-{teacher_key}"
    log(f"teacher: {teacher_dir}" + (" (cached)" if (teacher_dir / DONE).exists() else ""))
    teacher_summary = _train_once(teacher_dir, teacher_cfg, tokenizer, split["train"], split["valid"],
                                  cfg.teacher_train, device=device, progress=progress, label="teacher")
    teacher = Teacher.load(teacher_dir, device=device)
    test = dict(records=suite["test"], examples=split["test"], protocol=protocol,
                max_new_tokens=cfg.max_new_tokens, device=device)
    teacher_row = {**_row(evaluate(teacher.params, teacher.config, tokenizer, **test)), "divergence": 0.0}
    results = {"protocol": protocol.to_dict(), "teacher": teacher_row, "students": {},
               "curves": {"teacher": teacher_summary["valid_curve"]}}
    runs = [(name, seed) for name in (SFT, *loss_names) for seed in cfg.seeds]
    jobs = 1 if device != "cpu" else min(jobs, len(runs))
    students = _Students(out, student_cfg, cfg.student_train, tokenizer, split, teacher, test, device,
                         progress and jobs == 1)
    done = _in_workers(students, runs, jobs, progress) if jobs > 1 else {run: students(*run) for run in runs}
    for name in (SFT, *loss_names):
        results["students"][name] = _summarise([done[name, seed][0] for seed in cfg.seeds])
        results["curves"].update({f"{name}-seed{seed}": done[name, seed][1] for seed in cfg.seeds})
        log(f"{name:>5}: ROUGE-L {results['students'][name]['rouge_l']:.1f}")
    results["comparisons"] = comparisons(results["students"])
    results["efficiency"] = efficiency(student_cfg, tokenizer, split["train"], teacher, (SFT, *loss_names),
                                       cfg.student_train, device)
    results["config"] = {"preset": preset, "device": device, "seeds": list(cfg.seeds), "jobs": jobs,
                         "losses": [SFT, *loss_names], "demo": json.loads(json.dumps(asdict(cfg), default=str)),
                         "teacher_dir": str(teacher_dir), "seconds": time.perf_counter() - start,
                         "cpu_seconds": time.process_time() - cpu_start}
    checkpoint.write_json(out / "results.json", results)
    return results


def table(results):
    """The results as text: one row per model (students: mean ± standard error over training seeds), the
    paired differences todi - X with their 95% intervals, and the cost of each loss.
    """
    lines = [f"{'model':<8} {'ROUGE-L':>13} {'exact':>6} {'valid':>6} {'cover':>6} {'ppl':>6} {'KL':>6}"]

    def num(x, digits):
        return "-" if x is None else f"{x:.{digits}f}"

    for name, row in [("teacher", results["teacher"]), *results["students"].items()]:
        rouge = num(row["rouge_l"], 1) + ("" if row["rouge_l_se"] is None else f" ± {row['rouge_l_se']:.1f}")
        lines.append(f"{name:<8} {rouge:>13} {num(row['exact_match'], 1):>6} {num(row['validity'], 1):>6} "
                     f"{num(row['coverage'], 1):>6} {num(row['perplexity'], 3):>6} {num(row['divergence'], 3):>6}")
    for name, c in results["comparisons"].items():
        interval = "no interval from one seed" if c["ci95"] is None else "95% CI [{:+.2f}, {:+.2f}]".format(*c["ci95"])
        lines.append(f"{name}: {c['mean']:+.2f} ROUGE-L, {interval}, n = {c['n']}")
    eff = results["efficiency"]
    lines.append("ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in eff["ms_per_step"].items())
                 + "; KD peak MB: " + ", ".join(f"{k} {v:.2f}" for k, v in eff["kd_peak_mb"].items()))
    return "\n".join(lines)


def figure(results, path):
    """Validation curves and test scores as a PNG; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for run_name, curve in results["curves"].items():
        if curve:  # a run that never evaluated has no curve
            name = run_name.split("-seed")[0]
            color = colors.setdefault(name, f"C{len(colors)}")
            left.plot(*zip(*curve), color=color, label=name if run_name.endswith(("seed0", "teacher")) else None,
                      linestyle="--" if name == "teacher" else "-")
    left.set(xlabel="step", ylabel="validation cross-entropy", title="training curves")
    left.legend()
    names = ["teacher", *results["students"]]
    rows = [results["teacher"], *results["students"].values()]
    right.bar(names, [r["rouge_l"] for r in rows], yerr=[r["rouge_l_se"] or 0 for r in rows],
              color=[colors.get(n, "gray") for n in names], capsize=4)
    right.set(ylabel="ROUGE-L (test)", title="scores, mean ± standard error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
