"""Distil a student from a teacher stored as a transformers GPT-2 checkpoint directory.

    python examples/distill_from_transformers.py --make-demo-teacher /tmp/demo-teacher   # offline, no torch
    python examples/distill_from_transformers.py --teacher /tmp/demo-teacher --loss todi
    python examples/distill_from_transformers.py --fast      # seconds: demo teacher in a temp dir (tests)

The teacher directory must hold ``config.json`` (a GPT-2 config: tanh GELU, tied head), ``model.safetensors``
and ``tokenizer.json``: what ``GPT2LMHeadModel.save_pretrained(dir)`` plus ``tokenizer.save_pretrained(dir)``
of a fast tokenizer write, and also what minitodi writes for every model it trains.
``minitodi.teacher.Teacher.load`` reads it with ``minitodi.checkpoint.load`` (original GPT-2 key names
without the ``transformer.`` prefix are accepted) and ``minitodi.tokenizer.Tokenizer.load``; nothing here
imports torch or transformers. The student keeps the teacher's vocabulary and context length and is half
as wide with half the layers; it trains on the built-in synthetic suite, encoded with the teacher's
tokenizer, with (1 - 0.5) CE + 0.5 KD at temperature 2.

``--make-demo-teacher DIR`` first trains a tiny teacher with ``minitodi.train.fit`` into DIR (its output
is already in that layout) and then distils from it, so the example runs without any download; without
``--teacher`` a demo teacher is made in a temporary directory. Real GPT-2
(124M parameters, 50257 tokens) also loads, but a NumPy training step with it as teacher takes seconds on
a CPU. ``--fast`` (or MINITODI_FAST=1 in the environment) makes every run a few dozen steps.
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
from minitodi.core.model import n_params  # noqa: E402
from minitodi.evaluation import Protocol, evaluate  # noqa: E402
from minitodi.presets import PRESETS  # noqa: E402
from minitodi.teacher import Teacher  # noqa: E402
from minitodi.train import SFT, fit  # noqa: E402

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def make_demo_teacher(directory, preset):
    """Train a tiny GPT-2-shaped teacher on the synthetic suite into ``directory`` (transformers layout)."""
    tokenizer, examples = data.prepare(preset.dataset(), preset.seq_len, vocab_size=preset.vocab_size,
                                       splits=("train", "valid"))
    start = time.perf_counter()
    fit(directory, preset.models(tokenizer.vocab_size)[0], tokenizer, examples["train"], examples["valid"],
        preset.teacher_train, progress=False)
    print(f"demo teacher: {preset.teacher_train.steps} steps in {time.perf_counter() - start:.1f} s "
          f"-> {directory}")


def student_config_for(teacher_config):
    """Half the teacher's width and depth (at least 1 layer, width a multiple of the head count)."""
    n_head = max(teacher_config.n_head // 2, 1)
    width = max(teacher_config.n_embd // 2 // n_head, 1) * n_head
    return replace(teacher_config, n_embd=width, n_layer=max(teacher_config.n_layer // 2, 1), n_head=n_head)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--teacher", help="a transformers GPT-2 directory: " + " + ".join(REQUIRED))
    source.add_argument("--make-demo-teacher", metavar="DIR",
                        help="train a tiny teacher into DIR first, then use it")
    parser.add_argument("--loss", default="todi", choices=[SFT, *sorted(LOSSES)], help="the student's loss")
    parser.add_argument("--fast", action="store_true", help="a seconds-long run (also: MINITODI_FAST=1)")
    parser.add_argument("--out", help="the student's run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    parallel.reuse_freed_memory()  # as the minitodi command does: fewer page faults per training step
    preset = PRESETS["tiny-fast" if args.fast or os.environ.get("MINITODI_FAST") == "1" else "tiny"]

    with tempfile.TemporaryDirectory(prefix="minitodi-teacher-") as tmp:
        if not args.teacher and not args.make_demo_teacher:  # nothing given: a demo teacher in a temp dir
            args.make_demo_teacher = str(Path(tmp) / "demo-teacher")
        if args.make_demo_teacher:
            make_demo_teacher(Path(args.make_demo_teacher), preset)
        return distil(parser, args, Path(args.teacher or args.make_demo_teacher), preset)


def distil(parser, args, teacher_dir, preset):
    missing = [name for name in REQUIRED if not (teacher_dir / name).is_file()]
    if missing:
        parser.error(f"{teacher_dir} lacks {', '.join(missing)} (needs {', '.join(REQUIRED)})")
    teacher = Teacher.load(teacher_dir)
    tokenizer = teacher.tokenizer
    print(f"teacher: {teacher_dir}, {n_params(teacher.config):,} parameters, "
          f"vocabulary {teacher.config.vocab_size}, context {teacher.config.n_positions}")

    records = preset.dataset()
    _, split = data.prepare(records, min(preset.seq_len, teacher.config.n_positions), tokenizer=tokenizer)
    student_config = student_config_for(teacher.config)
    tcfg = replace(preset.student_train, loss=args.loss)

    with tempfile.TemporaryDirectory(prefix="minitodi-student-") as tmp:
        out = Path(args.out or Path(tmp) / "student")
        start = time.perf_counter()
        summary = fit(out, student_config, tokenizer, split["train"], split["valid"], tcfg,
                      teacher=None if args.loss == SFT else teacher, progress=False)
        print(f"student ({args.loss}): {n_params(student_config):,} parameters, {tcfg.steps} steps in "
              f"{time.perf_counter() - start:.1f} s, best validation CE {summary['best_valid_ce']:.3f}")
        params, config = checkpoint.load(out)
        test = {"records": records["test"], "examples": split["test"],
                "max_new_tokens": preset.max_new_tokens, "protocol": Protocol(decoding="greedy")}
        rows = {"teacher": evaluate(teacher.params, teacher.config, tokenizer, **test),
                args.loss: evaluate(params, config, tokenizer, teacher=teacher, **test)}
        print()
        for name, r in rows.items():  # greedy answers; KL(teacher || teacher) = 0
            print(f"{name:<8} ROUGE-L {r['rouge_l']:5.1f}   exact match {r['exact_match']:5.1f}   perplexity "
                  f"{r['perplexity']:7.3f}   KL(teacher || model) {r['divergence'] or 0.0:.4f}")
        if args.out:
            print(f"student in {out} (the same transformers layout as the teacher)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
