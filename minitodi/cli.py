"""The ``minitodi`` command line (also ``python -m minitodi``)."""

import argparse
import errno
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from . import parallel
from .conformance import TIMEOUT_MAX
from .core import gradcheck, losses
from .core.device import resolve_device
from .parallel import cores
from .presets import ARCHS, MIN_TEMPERATURE, MODELS, model_config


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, as minitodi's own: ``minitodi train: error: argument ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integral(text):
    """The integer ``text`` writes ("64", or "1e3" for 1000), or None when it writes no integer."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    if math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _integer(low, high=None):
    """An argparse type: an integer >= ``low`` (and <= ``high``), refused in one line naming the option."""
    requirement = f"an integer >= {low}"
    if high is not None:
        requirement = f"an integer in [{low}, {high}]"

    def parse(text):
        value = _integral(text)
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


def _path(text):
    """An argparse type: a file or directory name, never empty (Path("") would be the current directory).

    A name no file can have (too long) or one that runs into a loop of symbolic links is refused here, so
    that the error names the option: found later, the system's error names only the path.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file or directory, got an empty string")
    try:
        os.stat(text)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise argparse.ArgumentTypeError(f"the name {text[:40]}... ({len(text)} characters) is too long "
                                             "for the file system") from None
        if err.errno == errno.ELOOP:
            raise argparse.ArgumentTypeError(f"{text} runs into a loop of symbolic links (each names "
                                             "another, none a file or directory)") from None
        # a file that does not exist (yet) is each command's to judge: an output is made, an input refused
    return text


def _real(low, high=math.inf, *, low_included=False, high_included=True):
    """An argparse type: a finite number between ``low`` and ``high`` (each included or not)."""
    if high == math.inf:
        symbol = ">"
        if low_included:
            symbol = ">="
        requirement = f"a finite number {symbol} {low:g}"
    else:
        left = "("
        if low_included:
            left = "["
        right = ")"
        if high_included:
            right = "]"
        requirement = f"a number in {left}{low:g}, {high:g}{right}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low or (low_included and value == low)
        below = value < high or (high_included and value == high)
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


class _Distinct(argparse.Action):
    """Values of a ``nargs="+"`` option that must all differ (a repeated seed would count one pass twice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            parser.error(f"argument {option_string}: {', '.join(map(str, repeated))} given more than once")
        setattr(namespace, self.dest, values)


def cmd_gradcheck(args):
    rows = gradcheck.gradcheck_table(seed=args.seed, names=args.losses, eps=args.eps)
    print(f"{'loss':<6} {'options':<18} {'T':>4} {'entries':>8} {'max rel err':>12}")
    failed = 0
    for name, options, temperature, n, err in rows:
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        verdict = "ok"
        if not err < args.tol:
            verdict = "FAIL"
            failed += 1
        print(f"{name:<6} {opts:<18} {temperature:>4g} {n:>8d} {err:>12.2e}  {verdict}")
    passed = len(rows) - failed
    print(f"\nfloat64 central differences, eps={args.eps:g}; {passed}/{len(rows)} below {args.tol:g}")
    if failed:
        return 1
    return 0


def _parse_options(pairs):
    """``["beta=2", "detach=false"]`` -> ``{"beta": 2.0, "detach": False}``."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep or not key:
            raise ValueError(f"--option expects NAME=VALUE, got {pair!r}")
        if key in options:  # the last would win unseen: which one the user meant is theirs to say
            raise ValueError(f"--option {key} given more than once; give each option once")
        options[key] = _option_value(key, value)
    return options


def _option_value(key, value):
    """A loss option's value from the command line: true or false, else a number."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--option {key}: {value!r} is not a number or true/false") from None


def _fit(args, teacher=None):
    """``minitodi train`` (``args.loss`` is "sft") and, given the teacher, ``minitodi distill``."""
    from .data import load_dataset, prepare
    from .tokenizer import Tokenizer
    from .train import TrainConfig, fit

    fields = {name: getattr(args, name) for name in ("steps", "batch_size", "lr", "seed", "eval_every")}
    if args.loss != "sft":
        fields.update(loss=args.loss, kd_rate=args.kd_rate, temperature=args.temperature,
                      loss_options=_parse_options(args.option))
    tcfg = TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    device = resolve_device(args.device)
    dataset = load_dataset(args.data)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else getattr(teacher, "tokenizer", None)
    if tokenizer is None:  # one is trained: --vocab-size is read
        _check_vocab_size(args.vocab_size, dataset)
    tokenizer, examples = prepare(dataset, args.seq_len, tokenizer=tokenizer, vocab_size=args.vocab_size,
                                  splits=("train", "valid"))
    config = model_config(args.preset, tokenizer.vocab_size, args.seq_len + args.max_new_tokens, args.arch)
    if teacher is not None:
        _check_teacher_context(args, examples["train"] + examples["valid"], teacher)
    _check_training_memory(args, config, examples["train"] + examples["valid"], tcfg, teacher, device)
    summary = fit(args.out, config, tokenizer, examples["train"], examples["valid"], tcfg, teacher=teacher,
                  device=device, progress=not args.quiet, start=args.start)
    print(f"{args.loss}: {summary['steps']} steps, best validation CE {summary['best_valid_ce']:.4f} at step "
          f"{summary['best_step']}; model in {args.out}, log in {args.out}/metrics.jsonl")
    return 0


def _check_vocab_size(vocab_size, dataset):
    """--vocab-size from the tokenizer's least to the most the data can give, its table within memory."""
    from . import data, memory
    from .tokenizer import MIN_VOCAB_SIZE

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (the 256 bytes and the end-of-text "
                         f"token), got {vocab_size}")
    data.check_vocab_size(data.training_texts(dataset), vocab_size, name="--vocab-size")
    table = {"the trainer's table": memory.tokenizer_bytes(vocab_size)}  # tokenizers runs on the CPU
    memory.check_fits(f"training a tokenizer of --vocab-size {vocab_size}", table)


def _check_teacher_context(args, examples, teacher):
    """Every example must fit the teacher's context: its logits are read at every position."""
    longest = max(len(idx) for idx, _ in examples)
    if longest > teacher.config.n_positions:
        context = teacher.config.n_positions
        raise ValueError(f"--seq-len {args.seq_len} makes examples of up to {longest} tokens, more than the "
                         f"teacher's context of {context} positions ({args.teacher}): give at most --seq-len "
                         f"{context}")


def _check_training_memory(args, config, examples, tcfg, teacher, device):
    """A run too large for the memory free is refused with the estimate, before anything is written."""
    from . import memory

    itemsize = {"float32": 4, "float64": 8}[tcfg.dtype]
    teacher_config = None
    if teacher is not None:
        teacher_config = teacher.config
    parts = memory.training_bytes(config, examples, tcfg.batch_size, itemsize=itemsize,
                                  teacher_config=teacher_config, eval_batch_size=tcfg.eval_batch_size)
    what = (f"training with --batch-size {tcfg.batch_size}, --seq-len {args.seq_len} and --max-new-tokens "
            f"{args.max_new_tokens} ({config.n_positions} positions, a vocabulary of {config.vocab_size})")
    memory.check_fits(what, parts, device)


def cmd_distill(args):
    from .teacher import Teacher

    return _fit(args, Teacher.load(args.teacher, device=resolve_device(args.device)))


def _load_model(directory, device):
    """``(params, config, tokenizer)`` of a run directory, its model's vocabulary the tokenizer's."""
    from . import checkpoint
    from .tokenizer import Tokenizer

    params, config = checkpoint.load(directory, device=device)
    tokenizer = Tokenizer.load_for_model(directory)  # the tokenizer the model was trained with
    if config.vocab_size != tokenizer.vocab_size:  # ids the other side cannot read, found mid-generation
        raise ValueError(f"{directory}: the model's vocabulary ({config.vocab_size}, config.json) is not its "
                         f"tokenizer's ({tokenizer.vocab_size}, tokenizer.json): they are not one model's")
    return params, config, tokenizer


EVAL_BATCH = 64  # evaluate's batches: minitodi.evaluation.evaluate's and heldout_losses' default


def _check_model_memory(directory, params, config, rows, length, device):
    """Running a model on ``rows`` sequences of ``length`` tokens is refused, with the estimate, if too large.

    The length is at most the model's context (generation stops at its end).
    """
    from . import memory

    length = min(length, config.n_positions)
    itemsize = next(iter(params.values())).dtype.itemsize
    what = (f"running {directory} (a vocabulary of {config.vocab_size}) on {rows} sequence(s) of up to "
            f"{length} tokens")
    memory.check_fits(what, memory.evaluation_bytes(config, rows, length, itemsize=itemsize), device)


def _check_log_path(path):
    """A JSONL file the result can be appended to, checked before the evaluation; nothing else is touched.

    Refused, besides a directory, a missing parent or no permission: a file of a model or run directory
    (:func:`_run_file_reason`), and an existing file that is not an earlier evaluation log (a dataset, a
    training log, any other file of the user's), which the appended line would change.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--log {path} is a directory; give a file to append to")
    if path.exists() and not path.is_file():  # opening a FIFO to append waits for a reader forever
        raise ValueError(f"--log {path} is not a regular file (a pipe, socket or device); give a file to "
                         "append to")
    if not path.parent.is_dir():
        raise ValueError(f"--log {path}: the directory {path.parent} does not exist")
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise ValueError(f"--log {path}: {target} is not writable")
    reason = _run_file_reason(path.resolve())  # resolved: a link to a model's file is that file
    if reason:
        raise ValueError(f"--log {path} is {reason}: give another file (default: MODEL/eval.jsonl)")
    if path.is_file():
        _check_earlier_log(path)
    return path


def _run_file_reason(path):
    """What ``path`` is to the model or run directory that holds it ("" when nothing): a file it owns.

    A model or run directory holds a weights file, config.json, tokenizer.json or run.json. Its own
    names are refused even before the run writes them, and so is anything in its state ``last/``, which
    a run replaces as a whole (through ``last.new/`` and ``last.old/``).
    """
    from . import checkpoint, rundir
    from .tokenizer import FILENAME as TOKENIZER_FILE

    markers = (checkpoint.MODEL_FILE, checkpoint.INDEX_FILE, checkpoint.CONFIG_FILE, TOKENIZER_FILE,
               rundir.RUN_FILE, checkpoint.STATE_FILE)
    own = (*markers, checkpoint.STATE_JSON, rundir.LOG_FILE)

    def is_run(directory):
        return any((directory / name).exists() for name in markers)

    def is_state(name):
        return name == rundir.LAST or name.startswith(f"{rundir.LAST}.")

    if is_state(path.parent.name) and is_run(path.parent.parent):
        return f"inside the saved state of the run {path.parent.parent}"
    if is_run(path.parent) and (path.name in own or is_state(path.name) or path.suffix == ".safetensors"):
        return f"a file of the model or run directory {path.parent}"
    return ""


def _check_earlier_log(path):
    """An existing --log must be empty or an evaluation log: its first line a result of ``evaluate``."""
    import json

    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return
    try:
        record = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not (isinstance(record, dict) and {"model", "data", "split"} <= record.keys()):
        raise ValueError(f"--log {path} exists and is not an evaluation log (its first line is no result of "
                         "evaluate): give a new file or an earlier --log")


def _append_log(path, record):
    """Append ``record`` to the JSONL file ``path`` as one line; an OSError names the file."""
    import json

    line = json.dumps(record) + "\n"
    try:
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by an earlier crash must not swallow this one
                    line = "\n" + line
        with open(path, "ab") as f:
            f.write(line.encode("utf-8"))
    except OSError as err:
        raise OSError(f"--log {path}: the scores above were not logged ({err.strerror or err})") from None


def _evaluation_examples(args, dataset, tokenizer, config):
    """The examples of ``args.split``, each within the context less --max-new-tokens.

    A record that does not fit is the user's --max-new-tokens, said so: data's own message speaks of
    sequence lengths, which evaluate has no option for.
    """
    from .data import examples_for

    room = config.n_positions - args.max_new_tokens
    try:
        return examples_for(dataset, args.split, tokenizer, room)
    except ValueError:
        if dataset["kind"] != "instructions":
            raise
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves {room} of the model's "
                         f"{config.n_positions} positions ({args.model}) for a prompt and its response, too "
                         f"few for a record of the {args.split} split of {args.data}: give a smaller "
                         "--max-new-tokens") from None


def cmd_evaluate(args):
    import json

    from . import checkpoint
    from .data import load_dataset
    from .evaluation import Protocol, evaluate, heldout_losses
    from .metrics import perplexity
    from .teacher import Teacher, require_same_tokenizer

    protocol = Protocol(decoding=args.decoding, eval_seeds=tuple(args.eval_seeds))
    device = resolve_device(args.device)
    checkpoint.check_directory(args.model)  # first: the default --log is a file in --model
    log = _check_log_path(args.log or Path(args.model) / "eval.jsonl")
    params, config, tokenizer = _load_model(args.model, device)
    teacher = None
    if args.teacher:
        teacher = Teacher.load(args.teacher, device=device)
        require_same_tokenizer(teacher, tokenizer)
        if teacher.config.vocab_size != config.vocab_size:
            raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}, {args.teacher}) is not "
                             f"the model's ({config.vocab_size}, {args.model})")
    if args.max_new_tokens >= config.n_positions:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {config.n_positions} positions: give at most {config.n_positions - 1}")
    dataset = load_dataset(args.data)
    examples = _evaluation_examples(args, dataset, tokenizer, config)
    if not examples:  # text shorter than one example of the model's context less --max-new-tokens
        raise ValueError(f"{args.data}: its {args.split} split makes no example of "
                         f"{config.n_positions - args.max_new_tokens + 1} tokens for {args.model}; give more "
                         "text or a larger --max-new-tokens")
    longest = max(len(idx) for idx, _ in examples) + args.max_new_tokens  # a prompt and its answer
    _check_model_memory(args.model, params, config, EVAL_BATCH, longest, device)
    if dataset["kind"] == "instructions":
        result = evaluate(params, config, tokenizer, dataset[args.split], examples, teacher=teacher,
                          max_new_tokens=args.max_new_tokens, device=device, protocol=protocol)
    else:  # plain text: no prompts to complete, so perplexity only
        nll, _ = heldout_losses(params, config, examples, tokenizer.eos_id, device=device)
        result = {"perplexity": perplexity(nll)}
    record = {"model": str(args.model), "data": args.data, "split": args.split, **result}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2), flush=True)
    _append_log(log, record)  # after the scores are shown: a log that cannot be written loses none of them
    return 0


def cmd_generate(args):
    from .data import format_prompt
    from .generate import check_settings, generate

    check_settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, samples=args.samples)
    if args.input is not None and args.instruction is None:  # it would be ignored unseen
        raise ValueError("--input is the context of an --instruction: give it with --instruction")
    for name in ("instruction", "input", "prompt"):
        try:
            (getattr(args, name) or "").encode("utf-8")  # undecodable bytes of argv arrive as lone surrogates
        except UnicodeEncodeError:
            raise ValueError(f"--{name} is not valid UTF-8 text") from None
    device = resolve_device(args.device)
    params, config, tokenizer = _load_model(args.model, device)
    if args.instruction is not None:
        text = format_prompt({"instruction": args.instruction, "context": args.input or ""})
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise ValueError("generate needs --instruction (and optionally --input) or --prompt")
    ids = tokenizer.encode(text)  # generate cuts a long prompt from the left and says so
    if not ids:
        raise ValueError("--prompt is empty: give some text to continue")
    _check_model_memory(args.model, params, config, 1, len(ids) + args.max_new_tokens, device)
    for n in range(args.samples):
        outs = generate(params, config, [ids], max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + n)
        print(tokenizer.decode(outs[0]))
    return 0


def cmd_demo(args):
    from . import demo, report
    from .evaluation import Protocol

    names = args.losses
    if "all" in names:
        if names != ["all"]:
            raise ValueError("--losses all names every divergence: give it alone")
        names = sorted(losses.LOSSES)
    protocol = Protocol(decoding=args.decoding, eval_seeds=tuple(args.eval_seeds))
    results = demo.run(args.out, preset="quick" if args.quick else "full", loss_names=names, seeds=args.seeds,
                       protocol=protocol, device=resolve_device(args.device), progress=not args.quiet,
                       arch=args.arch, jobs=args.jobs)
    print("\n" + report.table(results))
    if report.figure(results, f"{args.out}/demo.png"):
        figure = f", figure: {args.out}/demo.png"
    else:
        figure = " (install matplotlib, e.g. pip install 'minitodi[plot]', for the figure)"
    print(f"\nresults: {args.out}/results.json{figure}; {results['config']['seconds']:.0f} s")
    return 0


def cmd_conformance(args):
    from .conformance import check_options, run_target

    options = _parse_options(args.option)
    for name, value in options.items():  # run_target checks them too, not knowing they came from --option
        try:
            check_options(args.loss, {name: value})
        except ValueError as err:
            raise ValueError(f"--option {name}: {err}") from None
    return run_target(args.target, args.loss, framework=args.framework, reduction=args.reduction,
                      t_squared=args.t_squared, tol=args.tol, neginf=args.neginf, timeout=args.timeout,
                      **options)


def _common(p, *, training=False, generation=True):
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default=None,
                   help="where to compute (default: $MINITODI_DEVICE, else auto)")
    if generation:  # every command but the demo, which has its own seeds and budgets
        p.add_argument("--seed", type=_integer(0), default=0)
        least_new_tokens = 1
        if training:  # a model may keep no room for generation beyond its training length
            least_new_tokens = 0
        p.add_argument("--max-new-tokens", type=_integer(least_new_tokens), default=32,
                       help="tokens to generate (train, distill: the room kept for them in the context)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if training:
        p.add_argument("--out", required=True, type=_path,
                       help="run directory: new, empty, or a run to resume")
        p.add_argument("--data", default="synthetic", type=_path,
                       help="synthetic | pydoc | FILE.jsonl | FILE.txt | DIR")
        p.add_argument("--preset", choices=sorted(MODELS), default="teacher", help="model size")
        p.add_argument("--arch", choices=ARCHS, default="gpt2", help="gpt2, or llama of the same size")
        p.add_argument("--tokenizer", type=_path,
                       help="an existing tokenizer.json (default: train one on the data)")
        p.add_argument("--vocab-size", type=_integer(1), default=1024)
        p.add_argument("--seq-len", type=_integer(1), default=64)
        for flag, kind in (("--steps", _integer(1)), ("--batch-size", _integer(1)), ("--lr", _real(0)),
                           ("--eval-every", _integer(1))):
            p.add_argument(flag, type=kind)  # default: TrainConfig's
        start = p.add_mutually_exclusive_group()
        start.add_argument("--restart", dest="start", action="store_const", const="restart", default="resume",
                           help="begin the run in --out again (its best model is replaced)")
        start.add_argument("--from-best", dest="start", action="store_const", const="best",
                           help="begin again from the best model in --out (a fresh optimizer)")


def _add_training_commands(sub):
    p = sub.add_parser("train", help="train a model (a teacher) with cross-entropy")
    _common(p, training=True)
    p.set_defaults(func=_fit, loss="sft")

    p = sub.add_parser("distill", help="distil a student from a teacher with a divergence")
    _common(p, training=True)
    p.add_argument("--teacher", required=True, type=_path, help="the teacher's run directory")
    p.add_argument("--loss", default="todi", choices=sorted(losses.LOSSES))
    p.add_argument("--kd-rate", type=_real(0, 1, low_included=True), default=0.5,
                   help="weight of the divergence against CE")
    p.add_argument("--temperature", type=_real(MIN_TEMPERATURE, low_included=True), default=2.0)
    p.add_argument("--option", action="append", metavar="NAME=VALUE", help="a loss option, e.g. beta=2")
    p.set_defaults(func=cmd_distill, preset="student")


def _protocol_arguments(p):
    p.add_argument("--decoding", choices=["sample", "greedy"], default="sample",
                   help="how answers are generated (default: sampled, as the paper evaluates)")
    p.add_argument("--eval-seeds", type=_integer(0), nargs="+", action=_Distinct,
                   default=[10, 20, 30, 40, 50],
                   help="generation seeds of the sampled passes, scores averaged (default: 10 20 30 40 50)")


def _add_model_commands(sub):
    """``evaluate`` and ``generate``: what a trained model can be asked."""
    p = sub.add_parser("evaluate", help="score a model on held-out data")
    _common(p)
    p.add_argument("--model", required=True, type=_path)
    p.add_argument("--teacher", type=_path, help="also report KL(teacher || model) per response token")
    p.add_argument("--data", default="synthetic", type=_path)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--log", type=_path,
                   help="JSONL file the result is appended to (default MODEL/eval.jsonl)")
    _protocol_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="complete a prompt")
    _common(p)
    p.add_argument("--model", required=True, type=_path)
    given = p.add_mutually_exclusive_group()  # one text to continue: the other would be ignored unseen
    given.add_argument("--instruction", help="an instruction, formatted with the training prompt template")
    p.add_argument("--input", help="the instruction's context")
    given.add_argument("--prompt", help="raw text to continue instead of an instruction")
    p.add_argument("--temperature", type=_real(0, low_included=True), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_integer(0), help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_real(0, 1), help="sample among the most likely tokens of this mass")
    p.add_argument("--samples", type=_integer(1), default=1)
    p.set_defaults(func=cmd_generate)


def _add_gradcheck_command(sub):
    p = sub.add_parser("gradcheck", help="check every loss gradient against finite differences")
    p.add_argument("--losses", nargs="+", choices=sorted(losses.LOSSES), action=_Distinct,
                   help="only these losses")
    # A step outside [1e-12, 0.1] checks rounding or a secant, not the gradient: on logits ~ N(0, 1) the
    # worst relative error of correct gradients (fkl, todi, tvd; T = 1, 2) is 0.28 at 1e-12 and 0.20 at
    # 0.1, and 1.0 (nothing agrees) at 1e-14 and at 0.3.
    p.add_argument("--eps", type=_real(1e-12, 0.1, low_included=True), default=gradcheck.LOSS_CHECK_EPS,
                   help="finite-difference step, in [1e-12, 0.1]")
    # a relative error |a - n| / (|a| + |n|) is at most 1: a tolerance of 1 would pass all but sign flips
    p.add_argument("--tol", type=_real(0, 1, high_included=False), default=1e-6,
                   help="largest relative error that passes, in (0, 1)")
    p.add_argument("--seed", type=_integer(0), default=0)
    p.set_defaults(func=cmd_gradcheck)


def _add_conformance_command(sub):
    p = sub.add_parser("conformance",
                       help="check your own loss function against minitodi's (value and gradient)")
    p.add_argument("target", metavar="FILE.py:FUNCTION", help="fn(student_logits, teacher_logits, mask, "
                   "temperature, **options); torch: returns a scalar tensor, numpy: (loss, grad)")
    p.add_argument("--loss", required=True, choices=sorted(losses.LOSSES))
    p.add_argument("--framework", choices=["torch", "numpy"], default="torch")
    p.add_argument("--option", action="append", metavar="NAME=VALUE", help="a loss option, e.g. beta=2")
    p.add_argument("--reduction", choices=["mean", "sum"], default="mean", help="over counted positions")
    p.add_argument("--t-squared", action="store_true", help="FUNCTION multiplies the loss by T^2")
    p.add_argument("--tol", type=_real(0, 1, high_included=False),
                   help="largest relative error that passes (default 1e-3)")
    p.add_argument("--no-neginf", dest="neginf", action="store_false",
                   help="leave out the case with -inf logits (for code that never sees them)")
    p.add_argument("--timeout", type=_real(0, TIMEOUT_MAX), metavar="SECONDS",
                   help="give up (exit 3) if FUNCTION has not returned by then")
    p.set_defaults(func=cmd_conformance)


def _add_demo_command(sub):
    p = sub.add_parser("demo", help="teacher, then students with each loss, compared on the built-in suite")
    _common(p, generation=False)
    p.add_argument("--quick", action="store_true", help="a smaller budget (minutes on a laptop)")
    p.add_argument("--arch", choices=ARCHS, default="gpt2", help="teacher and students: gpt2 or llama")
    p.add_argument("--losses", nargs="+", default=["fkl", "rkl", "todi"],
                   help="divergences to distil with besides sft, or 'all'")
    # the bound is demo.MAX_SEED's (a seed names run directories), not imported: demo loads the trainer
    p.add_argument("--seeds", type=_integer(0, 2**32 - 1), nargs="+", action=_Distinct,
                   help="student seeds (default: 0-15, quick: 0)")
    p.add_argument("--out", default="minitodi-demo", type=_path,
                   help="its output directory: new, empty, or an earlier demo's")
    p.add_argument("--jobs", type=_integer(1), default=cores(),
                   help="students trained at once, each in its own process (default: the cores available)")
    _protocol_arguments(p)
    p.set_defaults(func=cmd_demo)


def build_parser():
    parser = _Parser(prog="minitodi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_gradcheck_command(sub)
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_demo_command(sub)
    _add_conformance_command(sub)
    return parser


# Commands without a stop of their own: SIGTERM interrupts them as Ctrl-C does. train and distill finish
# their step on either (minitodi.rundir.ctrl_c_flag); the demo's workers are stopped with SIGTERM.
SIGTERM_AS_CTRL_C = ("evaluate", "generate", "gradcheck")


@contextmanager
def _sigterm_as_ctrl_c(command):
    """SIGTERM raises KeyboardInterrupt during ``command`` if it is one of :data:`SIGTERM_AS_CTRL_C`."""
    if command not in SIGTERM_AS_CTRL_C or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def _stop_quietly_on_a_closed_pipe():
    """Exit status 141 (128 + SIGPIPE), no message: the reader (``| head``) has all it wanted.

    stdout goes to /dev/null so that the interpreter's last flush at exit fails no more.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def main(argv=None):
    args = build_parser().parse_args(argv)
    parallel.reuse_freed_memory()  # a process-wide malloc setting: the command line opts in, never an import
    try:
        with _sigterm_as_ctrl_c(args.command):
            return args.func(args)
    except KeyboardInterrupt:
        newline = ""
        # a progress bar may be mid-line, on a terminal only (elsewhere it writes whole lines): a new line
        if not getattr(args, "quiet", True) and sys.stderr.isatty():
            newline = "\n"
        print(f"{newline}minitodi {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stop_quietly_on_a_closed_pipe()
    except MemoryError as err:  # an allocation the estimates up front did not foresee
        print(f"minitodi {args.command}: error: out of memory: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:  # the clear errors minitodi raises
        print(f"minitodi {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
