"""Train a tiny teacher on the synthetic suite, distil it into a smaller student, print the scores.

    python examples/distill_tiny.py                      # ToDi student, about a minute on a laptop CPU
    python examples/distill_tiny.py --loss fkl           # or rkl, sft (no teacher), jsd, tvd, akl, ...
    python examples/distill_tiny.py --fast               # a few seconds (also: MINITODI_FAST=1)
    python examples/distill_tiny.py --out runs/tiny      # keep the run directories (default: a temp dir)

The teacher (2 layers, width 64) learns the suite's four multi-answer families with cross-entropy; the
student (2 layers, width 32) trains on the same data with (1 - 0.5) CE + 0.5 KD at temperature 2, KD
being the chosen divergence (sizes and budgets: ``minitodi.presets.PRESETS["tiny"]``). Both are
evaluated on held-out prompts: ROUGE-L and exact match of greedy answers, perplexity, and the student's
KL to the teacher. At this size one run says little about which loss is better;
notebooks/04_tiny_distillation.ipynb compares them side by side.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minitodi import checkpoint, data, parallel  # noqa: E402
from minitodi.core.losses import LOSSES  # noqa: E402
from minitodi.evaluation import Protocol, evaluate  # noqa: E402
from minitodi.presets import PRESETS  # noqa: E402
from minitodi.teacher import Teacher  # noqa: E402
from minitodi.train import SFT, fit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="todi", choices=[SFT, *sorted(LOSSES)], help="the student's loss")
    parser.add_argument("--fast", action="store_true", help="a seconds-long run (also: MINITODI_FAST=1)")
    parser.add_argument("--out", help="directory for the run directories (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="the student's initialisation and data order")
    args = parser.parse_args(argv)
    parallel.reuse_freed_memory()  # as the minitodi command does: fewer page faults per training step
    preset = PRESETS["tiny-fast" if args.fast or os.environ.get("MINITODI_FAST") == "1" else "tiny"]
    suite = preset.dataset()
    tokenizer, split = data.prepare(suite, preset.seq_len, vocab_size=preset.vocab_size)
    teacher_config, student_config = preset.models(tokenizer.vocab_size)
    teacher_steps, student_steps = preset.teacher_train.steps, preset.student_train.steps
    test = {"records": suite["test"], "examples": split["test"], "max_new_tokens": preset.max_new_tokens,
            "protocol": Protocol(decoding="greedy")}

    with tempfile.TemporaryDirectory(prefix="minitodi-distill-") as tmp:
        out = Path(args.out or tmp)
        start = time.perf_counter()
        fit(out / "teacher", teacher_config, tokenizer, split["train"], split["valid"], preset.teacher_train,
            progress=False)
        teacher = Teacher.load(out / "teacher")
        print(f"teacher trained: {teacher_steps} steps, {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        tcfg = replace(preset.student_train, loss=args.loss, seed=args.seed)
        summary = fit(out / f"student-{args.loss}", student_config, tokenizer, split["train"], split["valid"],
                      tcfg, teacher=None if args.loss == SFT else teacher, progress=False)
        params, config = checkpoint.load(out / f"student-{args.loss}")
        print(f"student ({args.loss}) trained: {student_steps} steps, {time.perf_counter() - start:.1f} s, "
              f"best validation CE {summary['best_valid_ce']:.3f} at step {summary['best_step']}")

        rows = {"teacher": evaluate(teacher.params, teacher.config, tokenizer, **test),
                args.loss: evaluate(params, config, tokenizer, teacher=teacher, **test)}
        print()
        for name, r in rows.items():  # greedy answers; KL(teacher || teacher) = 0
            print(f"{name:<8} ROUGE-L {r['rouge_l']:5.1f}   exact match {r['exact_match']:5.1f}   perplexity "
                  f"{r['perplexity']:7.3f}   KL(teacher || model) {r['divergence'] or 0.0:.4f}")
        sample = rows[args.loss]["samples"][0]
        prompt_lines = [line for line in sample["prompt"].splitlines() if line and not line.startswith("###")]
        question = " / ".join(prompt_lines)
        print(f"\nexample: {question!r} -> {sample['output']!r} "
              f"(accepted: {sample['references']})")
        if args.out:
            print(f"run directories in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
