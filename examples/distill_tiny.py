"""Train a tiny teacher on the synthetic suite, distil it into a smaller student, print the scores.

    python examples/distill_tiny.py                      # ToDi student, about a minute on a laptop CPU
    python examples/distill_tiny.py --loss fkl           # or rkl, sft (no teacher), jsd, tvd, akl, ...
    python examples/distill_tiny.py --fast               # a few seconds (also: MINITODI_FAST=1)
    python examples/distill_tiny.py --out runs/tiny      # keep the run directories (default: a temp dir)

The teacher (2 layers, width 64) learns the suite's four multi-answer families with cross-entropy; the
student (2 layers, width 32) trains on the same data with (1 - 0.5) CE + 0.5 KD at temperature 2, KD
being the chosen divergence. Both are evaluated on held-out prompts: ROUGE-L and exact match of greedy
answers, perplexity, and the student's KL to the teacher. At this size one run says little about which
loss is better; notebooks/04_tiny_distillation.ipynb compares them side by side.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minitodi import checkpoint, data, demo  # noqa: E402
from minitodi.losses import LOSSES  # noqa: E402
from minitodi.model import GPTConfig  # noqa: E402
from minitodi.tokenizer import Tokenizer  # noqa: E402
from minitodi.train import SFT, Teacher, TrainConfig, evaluate, fit  # noqa: E402

FAMILIES = ["starts_with", "number_between", "other_color", "rhyme"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="todi", choices=[SFT, *sorted(LOSSES)], help="the student's loss")
    parser.add_argument("--fast", action="store_true", help="a seconds-long run (also: MINITODI_FAST=1)")
    parser.add_argument("--out", help="directory for the run directories (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="the student's initialisation and data order")
    args = parser.parse_args(argv)
    fast = args.fast or os.environ.get("MINITODI_FAST") == "1"
    teacher_steps, student_steps, n_train = (60, 30, 400) if fast else (700, 400, 2000)

    suite = data.synthetic_suite(seed=0, n_train=n_train, n_valid=32 if fast else 64, n_test=32 if fast else 96,
                                 families=FAMILIES)
    tokenizer = Tokenizer.train([data.record_text(r) for r in suite["train"]], 320)
    split = {name: data.instruction_examples(records, tokenizer, 48) for name, records in suite.items()}
    teacher_config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    student_config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    common = dict(batch_size=16, lr=3e-3, warmup_steps=min(20, student_steps // 2))
    test = dict(records=suite["test"], examples=split["test"], max_new_tokens=12)

    with tempfile.TemporaryDirectory(prefix="minitodi-distill-") as tmp:
        out = Path(args.out or tmp)
        start = time.perf_counter()
        fit(out / "teacher", teacher_config, tokenizer, split["train"], split["valid"],
            TrainConfig(steps=teacher_steps, eval_every=max(teacher_steps // 5, 1), **common), progress=False)
        teacher = Teacher.load(out / "teacher")
        print(f"teacher trained: {teacher_steps} steps, {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        tcfg = TrainConfig(loss=args.loss, steps=student_steps, eval_every=max(student_steps // 4, 1),
                           seed=args.seed, **common)
        summary = fit(out / f"student-{args.loss}", student_config, tokenizer, split["train"], split["valid"],
                      tcfg, teacher=None if args.loss == SFT else teacher, progress=False)
        params, config = checkpoint.load(out / f"student-{args.loss}")
        print(f"student ({args.loss}) trained: {student_steps} steps, {time.perf_counter() - start:.1f} s, "
              f"best validation CE {summary['best_valid_ce']:.3f} at step {summary['best_step']}")

        rows = {"teacher": evaluate(teacher.params, teacher.config, tokenizer, **test),
                args.loss: evaluate(params, config, tokenizer, teacher=teacher, **test)}
        print("\n" + demo.table({"teacher": rows["teacher"], "students": {args.loss: rows[args.loss]}}))
        sample = rows[args.loss]["samples"][0]
        question = " / ".join(line for line in sample["prompt"].splitlines() if line and not line.startswith("###"))
        print(f"\nexample: {question!r} -> {sample['output']!r} "
              f"(accepted: {sample['references']})")
        if args.out:
            print(f"run directories in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
