"""``minitodi demo``: the ToDi paper's experiment at laptop size, on the built-in synthetic suite.

1. Build the suite (:func:`minitodi.data.synthetic_suite`) and train a byte-level BPE on its training split.
2. Train the teacher with cross-entropy, or reuse it from the cache directory (``MINITODI_CACHE``,
   default ``~/.cache/minitodi``); its cache key hashes every setting that shapes it.
3. Train students of one size and one budget: ``sft`` (cross-entropy only) and one per divergence,
   (1 - kd_rate) CE + kd_rate KD from the frozen teacher, for each seed.
4. Evaluate every model on the test split (ROUGE-L, exact match, perplexity, KL to the teacher), print a
   table with mean and spread over seeds, write ``OUT/results.json`` and ``OUT/demo.png``.

Every run directory resumes (see :mod:`minitodi.train`), and a finished student is not trained again, so
an interrupted demo picks up where it stopped.
"""

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import checkpoint, data, metrics
from .evaluation import evaluate
from .losses import LOSSES
from .presets import PRESETS
from .teacher import Teacher
from .train import SFT, fit

DEFAULT_LOSSES = ("fkl", "rkl", "todi")


def cache_dir():
    return Path(os.environ.get("MINITODI_CACHE", Path.home() / ".cache" / "minitodi"))


def _key(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done_marker(run_dir):
    return Path(run_dir) / "summary.json"


def _train_once(run_dir, *args, **kwargs):
    """:func:`fit` unless ``run_dir`` holds a finished run; the run's summary either way."""
    done = _done_marker(run_dir)
    if done.exists():
        return json.loads(done.read_text())
    summary = fit(run_dir, *args, **kwargs)
    checkpoint.write_json(done, summary)
    return summary


def _row(evaluation):
    return {k: evaluation[k] for k in ("rouge_l", "exact_match", "perplexity", "divergence", "per_task")}


def _summarise(per_seed):
    """Mean and spread over seeds of every number metric, plus the per-seed values."""
    out = {}
    for metric in ("rouge_l", "exact_match", "perplexity", "divergence"):
        mean, std, _ = metrics.mean_and_spread([r[metric] for r in per_seed])
        out[metric], out[metric + "_std"] = mean, (None if math.isnan(std) else std)  # one seed: no spread
    out["seeds"] = per_seed
    return out


def run(out, *, preset="full", loss_names=DEFAULT_LOSSES, seeds=None, device="cpu", progress=True, log=print):
    """Run the demo into ``out``; returns the results dict also written to ``out/results.json``."""
    cfg = PRESETS[preset]
    if seeds is not None:
        cfg = replace(cfg, seeds=tuple(seeds))
    unknown = [n for n in loss_names if n not in LOSSES]
    if unknown:
        raise ValueError(f"unknown losses {unknown}: choose from {sorted(LOSSES)}")
    out = Path(out)
    start = time.perf_counter()
    suite = cfg.dataset()
    tokenizer, split = data.prepare(suite, cfg.seq_len, vocab_size=cfg.vocab_size)
    teacher_cfg, student_cfg = cfg.models(tokenizer.vocab_size)

    teacher_key = _key({"model": asdict(teacher_cfg), "train": asdict(cfg.teacher_train), "tokenizer":
                        tokenizer.fingerprint(), "suite": [cfg.n_train, cfg.n_valid, cfg.n_test, cfg.seq_len]})
    teacher_dir = cache_dir() / f"teacher-{teacher_key}"
    log(f"teacher: {teacher_dir}" + (" (cached)" if _done_marker(teacher_dir).exists() else ""))
    teacher_summary = _train_once(teacher_dir, teacher_cfg, tokenizer, split["train"], split["valid"],
                                  cfg.teacher_train, device=device, progress=progress, label="teacher")
    teacher = Teacher.load(teacher_dir, device=device)
    evaluate_on_test = dict(records=suite["test"], examples=split["test"], max_new_tokens=cfg.max_new_tokens,
                            device=device)
    results = {"teacher": _row(evaluate(teacher.params, teacher.config, tokenizer, teacher=None,
                                        **evaluate_on_test)),
               "students": {}, "curves": {"teacher": teacher_summary["valid_curve"]}}
    results["teacher"]["divergence"] = 0.0
    for name in (SFT, *loss_names):
        per_seed = []
        for seed in cfg.seeds:
            tcfg = replace(cfg.student_train, loss=name, seed=seed)
            run_dir = out / "students" / f"{name}-seed{seed}"
            summary = _train_once(run_dir, student_cfg, tokenizer, split["train"], split["valid"], tcfg,
                                  teacher=None if name == SFT else teacher, device=device, progress=progress,
                                  label=f"{name} seed {seed}")
            params, config = checkpoint.load(run_dir, device=device)
            per_seed.append({"seed": seed, **_row(evaluate(params, config, tokenizer, teacher=teacher,
                                                           **evaluate_on_test))})
            results["curves"][f"{name}-seed{seed}"] = summary["valid_curve"]
        results["students"][name] = _summarise(per_seed)
        log(f"{name:>5}: ROUGE-L {results['students'][name]['rouge_l']:.1f}")
    results["config"] = {"preset": preset, "device": device, "seeds": list(cfg.seeds),
                         "losses": [SFT, *loss_names], "demo": json.loads(json.dumps(asdict(cfg), default=str)),
                         "teacher_dir": str(teacher_dir), "seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "results.json", results)
    return results


def table(results):
    """The results as a text table: one row per model, mean +- spread over seeds (when there is one)."""
    lines = [f"{'model':<9} {'ROUGE-L':>15} {'exact match':>15} {'perplexity':>15} {'KL(teacher||model)':>19}"]

    def cell(row, metric, digits):
        if row.get(metric) is None:
            return "-"
        std = row.get(metric + "_std")
        text = f"{row[metric]:.{digits}f}"
        return text + (f" ± {std:.{digits}f}" if std is not None else "")

    rows = [("teacher", results["teacher"])] + list(results["students"].items())
    for name, row in rows:
        lines.append(f"{name:<9} {cell(row, 'rouge_l', 1):>15} {cell(row, 'exact_match', 1):>15} "
                     f"{cell(row, 'perplexity', 3):>15} {cell(row, 'divergence', 4):>19}")
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
        name = run_name.split("-seed")[0]
        if not curve:
            continue
        steps, values = zip(*curve)
        color = colors.setdefault(name, f"C{len(colors)}")
        left.plot(steps, values, color=color, label=name if run_name.endswith(("seed0", "teacher")) else None,
                  linestyle="--" if name == "teacher" else "-")
    left.set(xlabel="step", ylabel="validation cross-entropy", title="training curves")
    left.legend()
    names = ["teacher", *results["students"]]
    rows = [results["teacher"], *results["students"].values()]
    right.bar(names, [r["rouge_l"] for r in rows], yerr=[r.get("rouge_l_std") or 0 for r in rows],
              color=[colors.get(n, "gray") for n in names], capsize=4)
    right.set(ylabel="ROUGE-L (test)", title="scores, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
