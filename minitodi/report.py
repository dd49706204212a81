"""The demo's report: the statistics over training seeds, ``results.json``, the table and ``demo.png``.

:mod:`minitodi.demo` trains and evaluates; this module turns its evaluations into what a reader sees:

- per student loss, the mean of every metric over training seeds and the standard error of its ROUGE-L;
- for every other student X, the difference todi - X seed by seed, its mean and Student-t 95% interval
  (:func:`minitodi.metrics.paired_difference`);
- ``results.json`` (the protocol, every model's scores, the validation curves, the comparisons, and what
  the demo adds: the efficiency and its settings), the text table, and the figure.
"""

import json
import math

import numpy as np

from . import checkpoint, metrics

METRICS = ("rouge_l", "exact_match", "validity", "coverage", "perplexity", "divergence")
RESULTS_FILE = "results.json"
FIGURE_FILE = "demo.png"
RESULTS_KEYS = ("protocol", "teacher", "students", "comparisons", "config")  # in every demo's results.json


def scores(evaluation):
    """The scores of one evaluation (:func:`minitodi.evaluation.evaluate`) that the demo keeps."""
    return {k: evaluation[k] for k in (*METRICS, "rouge_l_se", "rouge_l_per_eval_seed", "per_task")}


def summarise(per_seed):
    """Means over training seeds; ``rouge_l_se`` the standard error of the mean over them (None for one)."""
    out = {}
    for metric in METRICS:
        values = [r[metric] for r in per_seed]
        if None in values:
            out[metric] = None
        else:
            out[metric] = float(np.mean(values))
    se = metrics.mean_se([r["rouge_l"] for r in per_seed])[1]
    if math.isnan(se):  # one seed: no standard error
        se = None
    return {**out, "rouge_l_se": se, "seeds": per_seed}


def comparisons(students):
    """todi - X in ROUGE-L for every other student X, paired by training seed (mean, 95% interval, n)."""
    if "todi" not in students:
        return {}
    todi = [r["rouge_l"] for r in students["todi"]["seeds"]]
    result = {}
    for name, row in students.items():
        if name != "todi":
            other = [r["rouge_l"] for r in row["seeds"]]
            result[f"todi-{name}"] = metrics.paired_difference(todi, other)
    return result


def assemble(protocol, teacher_scores, teacher_curve, names, seeds, students):
    """The demo's results without its efficiency and settings (:mod:`minitodi.demo` adds those).

    ``students`` maps ``(loss, seed)`` to (the student's scores with its seed, its validation curve) for
    every loss in ``names`` and every seed in ``seeds``; the report shows them in that order.
    """
    teacher = {**teacher_scores, "divergence": 0.0}  # KL(teacher || teacher)
    curves = {"teacher": teacher_curve}
    summaries = {}
    for name in names:
        summaries[name] = summarise([students[name, seed][0] for seed in seeds])
        curves.update({f"{name}-seed{seed}": students[name, seed][1] for seed in seeds})
    return {"protocol": protocol.to_dict(), "teacher": teacher, "students": summaries, "curves": curves,
            "comparisons": comparisons(summaries)}


def write(out, results):
    """``out/results.json``, written atomically."""
    checkpoint.write_json(out / RESULTS_FILE, results)


def is_results(path):
    """Whether ``path`` is a results.json that the demo wrote (JSON holding the demo's keys)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and set(RESULTS_KEYS) <= found.keys()


def _number(x, digits):
    """``x`` with ``digits`` decimals, or "-" for a score that does not exist."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def table(results):
    """The results as text: a row per model, the paired differences todi - X, and each loss's cost.

    Students show their mean ± standard error over training seeds; each difference its 95% interval.
    """
    lines = [f"{'model':<8} {'ROUGE-L':>13} {'exact':>6} {'valid':>6} {'cover':>6} {'ppl':>6} {'KL':>6}"]
    for name, row in [("teacher", results["teacher"]), *results["students"].items()]:
        rouge = _number(row["rouge_l"], 1)
        if row["rouge_l_se"] is not None:
            rouge += f" ± {row['rouge_l_se']:.1f}"
        cells = [_number(row["exact_match"], 1), _number(row["validity"], 1), _number(row["coverage"], 1),
                 _number(row["perplexity"], 3), _number(row["divergence"], 3)]
        lines.append(f"{name:<8} {rouge:>13} " + " ".join(f"{cell:>6}" for cell in cells))
    for name, c in results["comparisons"].items():
        if c["ci95"] is None:
            interval = "no interval from one seed"
        else:
            low, high = c["ci95"]
            interval = f"95% CI [{low:+.2f}, {high:+.2f}]"
        lines.append(f"{name}: {c['mean']:+.2f} ROUGE-L, {interval}, n = {c['n']}")
    eff = results["efficiency"]
    step_times = ", ".join(f"{k} {v:.1f}" for k, v in eff["ms_per_step"].items())
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in eff["kd_peak_mb"].items())
    lines.append(f"ms/step: {step_times}; KD peak MB: {peaks}")
    return "\n".join(lines)


def figure(results, path):
    """The demo's conclusion as a PNG; returns False when matplotlib is missing.

    Left: each loss's validation curve, the mean over training seeds with a band from the lowest to the
    highest seed, and the teacher's best validation CE as a line. Right: the paired differences
    todi - X in test ROUGE-L, one point per training seed, their mean and 95% interval.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = _plot_curves(left, results["curves"])
    _plot_differences(right, results, colors)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_curves(ax, curves):
    """Per student loss, the mean validation curve over seeds and its min-max band; returns the colors."""
    colors = {}
    by_name = {}  # loss -> the seeds' curves
    for run_name, curve in curves.items():
        if run_name == "teacher" or not curve:  # a run that never evaluated has no curve
            continue
        name = run_name.split("-seed")[0]
        by_name.setdefault(name, []).append(curve)
    for name, seed_curves in by_name.items():
        colors[name] = f"C{len(colors)}"
        length = min(len(curve) for curve in seed_curves)  # every seed of a loss evaluates at the same steps
        steps = [step for step, _ in seed_curves[0][:length]]
        values = np.array([[ce for _, ce in curve[:length]] for curve in seed_curves])  # (seeds, evaluations)
        ax.plot(steps, values.mean(axis=0), color=colors[name], label=f"{name} (mean of {len(seed_curves)})")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colors[name], alpha=0.2)
    teacher_curve = curves.get("teacher")
    if teacher_curve:
        best = min(ce for _, ce in teacher_curve)
        ax.axhline(best, color="k", linestyle="--", label="teacher's best")
    ax.set(xlabel="step", ylabel="validation cross-entropy", title="students: mean over seeds, min-max band")
    ax.legend()
    return colors


def _plot_differences(ax, results, colors):
    """todi - X per training seed (points), with the mean and its 95% interval, for every other student X."""
    students = results["students"]
    names = [name for name in students if name != "todi"]
    if "todi" not in students or not names:
        ax.set_axis_off()
        return
    todi = {r["seed"]: r["rouge_l"] for r in students["todi"]["seeds"]}
    for i, name in enumerate(names):
        per_seed = [todi[r["seed"]] - r["rouge_l"] for r in students[name]["seeds"] if r["seed"] in todi]
        offsets = np.linspace(-0.15, 0.15, len(per_seed)) if len(per_seed) > 1 else np.zeros(1)
        ax.scatter(i + offsets, per_seed, color=colors.get(name, "gray"), s=12, alpha=0.6)
        comparison = results["comparisons"][f"todi-{name}"]
        mean = comparison["mean"]
        if comparison["ci95"] is not None:
            low, high = comparison["ci95"]
            ax.errorbar(i + 0.3, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="k", capsize=4)
        else:  # one seed: no interval
            ax.plot(i + 0.3, mean, "o", color="k")
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_xticks(range(len(names)), [f"todi - {name}" for name in names])
    ax.set(ylabel="ROUGE-L difference (test)", title="paired by seed: points, mean and 95% interval")
