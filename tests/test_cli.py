"""Every subcommand, end to end, in a tiny configuration (seconds, not minutes)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import exit_status

from minitodi import cli, presets
from minitodi.cli import main
from minitodi.core.losses import LOSSES
from minitodi.train import TrainConfig

TINY = ["--preset", "tiny", "--steps", "6", "--batch-size", "8", "--eval-every", "3", "--vocab-size", "300",
        "--seq-len", "48", "--max-new-tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "--out", str(root / "teacher"), *TINY]) == 0
    assert main(["distill", "--teacher", str(root / "teacher"), "--loss", "todi", "--option", "beta=2",
                 "--out", str(root / "student"), *TINY]) == 0
    return root


def test_train_and_distill_write_runs(runs):
    for name in ("teacher", "student"):
        assert (runs / name / "model.safetensors").is_file()
        assert (runs / name / "tokenizer.json").is_file()
        assert (runs / name / "metrics.jsonl").read_text().count("\n") >= 2
    settings = json.loads((runs / "student" / "run.json").read_text())["train"]
    assert settings["loss"] == "todi" and settings["loss_options"] == {"beta": 2.0}
    assert settings["kd_rate"] == 0.5 and settings["temperature"] == 2.0


def test_evaluate_prints_and_logs_every_metric(runs, capsys):
    assert main(["evaluate", "--model", str(runs / "student"), "--teacher", str(runs / "teacher"),
                 "--max-new-tokens", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"rouge_l", "exact_match", "perplexity", "divergence"} <= set(printed)
    assert printed["divergence"] > 0
    logged = json.loads((runs / "student" / "eval.jsonl").read_text().splitlines()[-1])
    assert logged["rouge_l"] == printed["rouge_l"]


def test_generate_is_reproducible(runs, capsys):
    args = ["generate", "--model", str(runs / "teacher"), "--instruction", "Name a fruit.",
            "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "6"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_distill_from_a_missing_teacher_is_a_clear_error(tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "s"), *TINY]) == 2
    assert "not found" in capsys.readouterr().err


def test_gradcheck_table_passes():
    done = subprocess.run([sys.executable, "-m", "minitodi", "gradcheck", "--losses", "todi", "fkl"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10/10 below 1e-06" in done.stdout  # fkl and four todi rows, T = 1 and 2


def test_demo_writes_results_for_every_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(presets.MODELS, "micro", {"n_embd": 16, "n_layer": 1, "n_head": 2})
    monkeypatch.setitem(presets.PRESETS, "quick", presets.Preset(
        n_train=240, n_valid=16, n_test=16, vocab_size=300, seq_len=48, n_positions=56, teacher="micro",
        student="micro",
        teacher_train=TrainConfig(steps=8, batch_size=8, eval_every=4),
        student_train=TrainConfig(steps=4, batch_size=8, eval_every=2), seeds=(0, 1), max_new_tokens=8))
    monkeypatch.setenv("MINITODI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--losses", "all", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {"sft", *LOSSES}
    for row in [results["teacher"], *results["students"].values()]:
        assert {"rouge_l", "exact_match", "perplexity", "divergence"} <= set(row)
    assert len(results["students"]["todi"]["seeds"]) == 2
    assert results["students"]["todi"]["rouge_l_se"] is not None
    assert "teacher" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (out / "demo.png").stat().st_size > 10_000
    # a second run reuses the cached teacher and the finished students
    assert main(["demo", "--quick", "--losses", "all", "--out", str(out), "--quiet"]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["students"] == results["students"]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "argument --lr: must be a finite number > 0"), (["--lr", "-1"], "--lr: must be"),
    (["--lr", "inf"], "--lr: must be"), (["--temperature", "0"], "--temperature: must be"),
    (["--option", "gamma=3"], "no option gamma; its options: beta"),
    (["--option", "n_counted=5"], "no option n_counted; its options: beta, detach\n"),  # the loop's to set
    (["--option", "=2"], "--option expects NAME=VALUE, got '=2'"),
    (["--option", "beta=1", "--option", "beta=2"], "--option beta given more than once"),
])
def test_bad_settings_are_one_line_and_write_nothing(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "s"
    assert exit_status(["distill", "--teacher", str(runs / "teacher"), "--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_learning_rate_that_overflows_is_one_line_and_no_numpy_warning(runs, tmp_path, capsys, command):
    """The first update goes to inf: the next step's non-finite loss is the one line, no warning before."""
    args = [command, "--out", str(tmp_path / "run"), *TINY, "--lr", "1e300"]
    if command == "distill":
        args += ["--teacher", str(runs / "teacher")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 2
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_parameters_diverged_at_the_last_step_say_no_state_was_saved(tmp_path, capsys):
    """One step at lr 1e300: the validation after it is NaN, and no last/ was ever written to point to."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--steps", "1", "--lr", "1e300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no state was saved" in err and not (out / "last").exists(), err


def test_unusable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": f"say {w}", "response": w}) + "\n" for w in "abcdefghij"]
    data.write_text("".join(lines))
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main(["train", "--out", str(out), "--data", str(data), *TINY]) == 2
        err = capsys.readouterr().err
        assert f"cannot use {out} as a run directory" in err and err.count("\n") == 1
    assert main(["train", "--out", str(tmp_path / "file"), "--data", str(data), *TINY]) == 2
    assert "run directory: it is a file" in capsys.readouterr().err  # was mkdir's "File exists"


@pytest.mark.parametrize("command", ["generate", "distill"])
def test_a_model_file_given_for_its_directory_is_said_to_be_a_file(runs, tmp_path, capsys, command):
    path = runs / "teacher" / "model.safetensors"
    commands = {"generate": ["generate", "--model", str(path), "--prompt", "hello"],
                "distill": ["distill", "--teacher", str(path), "--out", str(tmp_path / "s"), *TINY]}
    assert main(commands[command]) == 2
    err = capsys.readouterr().err
    assert f"{path} is a file, not a checkpoint directory" in err and err.count("\n") == 1, err


def test_restart_flags(runs, tmp_path, capsys):
    out = tmp_path / "t"
    shutil.copytree(runs / "teacher", out)
    shutil.rmtree(out / "last")
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "--restart" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--restart", *TINY]) == 0
    assert (out / "metrics.jsonl").read_text() == (runs / "teacher" / "metrics.jsonl").read_text()


def test_generate_refuses_bytes_that_are_not_utf8(runs, capsys):
    instruction = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    assert main(["generate", "--model", str(runs / "teacher"), "--instruction", instruction]) == 2
    assert capsys.readouterr().err.strip().endswith("--instruction is not valid UTF-8 text")


@pytest.mark.parametrize("case", ["missing parent", "a directory"])
def test_evaluate_log_is_checked_before_the_evaluation(runs, tmp_path, capsys, case, monkeypatch):
    """An unusable --log is one line and exit 2, before any model is loaded or any answer generated."""
    from minitodi import evaluation

    def never(*args, **kwargs):
        raise AssertionError("evaluated before --log was checked")

    monkeypatch.setattr(evaluation, "evaluate", never)
    log = {"missing parent": tmp_path / "no" / "eval.jsonl", "a directory": tmp_path}[case]
    assert main(["evaluate", "--model", str(runs / "student"), "--log", str(log), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--log {log}" in err


def test_a_model_whose_vocabulary_is_not_its_tokenizers_is_refused_at_load(runs, tmp_path, capsys):
    """config.json's vocabulary against tokenizer.json's: one line naming both, before any generation."""
    from minitodi import checkpoint
    from minitodi.core.model import GPTConfig, init_params

    shutil.copy(runs / "student" / "tokenizer.json", tmp_path / "tokenizer.json")
    config = GPTConfig(vocab_size=40, n_positions=56, n_embd=16, n_layer=1, n_head=2)
    checkpoint.save(tmp_path, init_params(config), config)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hello", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the model's vocabulary (40, config.json) is not its tokenizer's (300" in err


def test_ctrl_c_says_so(monkeypatch, tmp_path, capsys):
    from minitodi import demo

    def interrupted(out, **settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 130
    assert "minitodi demo: interrupted" in capsys.readouterr().err


def test_ctrl_c_with_quiet_is_one_line(monkeypatch, tmp_path, capsys):
    """No progress bar can be mid-line: no blank line before the message."""
    from minitodi import demo

    def interrupted(out, **settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d"), "--quiet"]) == 130
    assert capsys.readouterr().err == "minitodi demo: interrupted\n"


def test_sigterm_during_evaluate_is_an_interruption(runs, tmp_path, capsys, monkeypatch):
    """Like Ctrl-C: one line and 130, the handler before the command put back after it."""
    from minitodi import evaluation

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop evaluate")

    monkeypatch.setattr(evaluation, "evaluate", terminated)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        assert exit_status(["evaluate", "--model", str(runs / "teacher"), "--log",
                            str(tmp_path / "eval.jsonl"), "--quiet"]) == 130
        signal.raise_signal(signal.SIGTERM)  # after the command: the test's own handler again
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "minitodi evaluate: interrupted\n"


def test_a_closed_pipe_stops_quietly():
    """``minitodi gradcheck | head -0``: no 'Broken pipe' error, the status of a command killed by SIGPIPE."""
    child = subprocess.Popen([sys.executable, "-m", "minitodi", "gradcheck", "--losses", "fkl"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before anything is written
    err = child.stderr.read()
    assert child.wait(timeout=120) == 141 and err == b"", err


def test_evaluate_log_refuses_a_pipe_or_a_device(runs, tmp_path, capsys):
    """Appending to a FIFO waits for a reader forever (after the scores were printed)."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for path in (pipe, Path(os.devnull)):
        assert main(["evaluate", "--model", str(runs / "teacher"), "--log", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--log {path} is not a regular file" in err, err


# ---- every numeric option: 0, negative, nan, inf, huge, not a number --------------------------------
_TRAIN = ["train", "--out", "OUT"]
_DISTILL = ["distill", "--teacher", "TEACHER", "--out", "OUT"]
_EVALUATE = ["evaluate", "--model", "MODEL"]
_GENERATE = ["generate", "--model", "MODEL", "--prompt", "hi"]
_BAD_NUMBERS = [
    *[(_TRAIN, "--seed", value) for value in ("-1", "1.5", "nan", "x")],
    *[(_TRAIN, "--max-new-tokens", value) for value in ("-1", "-5", "inf")],
    *[(_TRAIN, "--vocab-size", value) for value in ("0", "-1", "1e400", "many")],
    *[(_TRAIN, "--seq-len", value) for value in ("0", "-920", "2.5", "inf", "1e8x")],
    *[(_TRAIN, "--steps", value) for value in ("0", "-3", "nan")],
    *[(_TRAIN, "--batch-size", value) for value in ("0", "-1", "nan", "1e400")],
    *[(_TRAIN, "--lr", value) for value in ("0", "-1", "nan", "inf", "-inf", "fast")],
    *[(_TRAIN, "--eval-every", value) for value in ("0", "-1")],
    *[(_DISTILL, "--kd-rate", value) for value in ("-0.1", "1.5", "nan", "inf")],
    *[(_DISTILL, "--temperature", value) for value in ("0", "-1", "nan", "inf", "1e-20")],
    *[(_EVALUATE, "--max-new-tokens", value) for value in ("0", "-1")],
    *[(_EVALUATE, "--seed", value) for value in ("-1",)],
    *[(_EVALUATE, "--eval-seeds", value) for value in ("-1", "1.5")],
    *[(_GENERATE, "--seed", value) for value in ("-1",)],
    *[(_GENERATE, "--max-new-tokens", value) for value in ("0", "-2")],
    *[(_GENERATE, "--temperature", value) for value in ("-1", "nan", "inf")],
    *[(_GENERATE, "--top-k", value) for value in ("-1", "2.5")],
    *[(_GENERATE, "--top-p", value) for value in ("0", "1.5", "nan", "-1")],
    *[(_GENERATE, "--samples", value) for value in ("0", "-1")],
    *[(["gradcheck"], "--eps", value) for value in ("0", "-1", "1e300", "nan", "inf", "1e-20")],
    *[(["gradcheck"], "--tol", value) for value in ("0", "-1", "nan", "inf", "1")],
    *[(["gradcheck"], "--seed", value) for value in ("-1",)],
]


@pytest.mark.parametrize("command, flag, value", _BAD_NUMBERS)
def test_a_bad_number_is_one_line_naming_its_option(tmp_path, capsys, command, flag, value):
    """Refused by the parser, before anything is read or written: exit 2, one line, the option named."""
    argv = [str(tmp_path / word) if word.isupper() else word for word in command]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, f"{flag}={value}"])  # "-inf" on its own would read as an option
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: must be " in err and repr(value) in err, err
    assert not (tmp_path / "OUT").exists()


def test_numbers_in_any_notation_are_read(runs, capsys):
    """1e1 is ten: an integral number may be written as a float, and a seed may be large."""
    args = ["generate", "--model", str(runs / "teacher"), "--prompt", "Name a fruit.", "--temperature", "1",
            "--max-new-tokens", "6"]
    assert main([*args, "--seed", "10", "--top-k", "20"]) == 0
    ten = capsys.readouterr().out
    assert main([*args, "--seed", "1e1", "--top-k", "2e1", "--samples", "1.0"]) == 0
    assert capsys.readouterr().out == ten
    assert main([*args, "--seed", str(2**70)]) == 0


def test_repeated_eval_seeds_are_refused(runs, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--model", str(runs / "student"), "--eval-seeds", "10", "20", "10"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --eval-seeds: 10 given more than once" in err


# ---- memory: the estimate up front, not a MemoryError or an abort in tokenizers --------------------
@pytest.mark.parametrize("flags, largest", [
    (["--batch-size", "1000000"], "activations"),
    (["--seq-len", "1e8"], "weights and AdamW"),
    (["--max-new-tokens", "1e9"], "weights and AdamW"),
])
def test_a_run_too_large_for_the_memory_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch, flags,
                                                                     largest):
    from minitodi import memory, train

    monkeypatch.setattr(memory, "available", lambda device="cpu": 16 << 30)  # this test's machine: 16 GiB

    def never(*args, **kwargs):
        raise AssertionError("training began")

    monkeypatch.setattr(train, "fit", never)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs about" in err and "16 GiB is available on the cpu" in err, err
    assert f"of memory ({largest} " in err and flags[0] in err
    assert not out.exists()


def test_a_vocabulary_larger_than_the_data_can_give_never_reaches_tokenizers(tmp_path, capsys, monkeypatch):
    """--vocab-size 1e9 aborted the process inside tokenizers (exit 134); now one line naming the bound."""
    from minitodi.tokenizer import Tokenizer

    def never(*args, **kwargs):
        raise AssertionError("tokenizers was asked")

    monkeypatch.setattr(Tokenizer, "train", never)
    out = tmp_path / "run"
    for value, words in (("1e9", "--vocab-size 1000000000 is more than the training text can give"),
                         ("100", "--vocab-size must be at least 257")):
        assert main(["train", "--out", str(out), *TINY, "--vocab-size", value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_the_tokenizers_table_is_checked_against_the_memory(tmp_path, capsys, monkeypatch):
    from minitodi import memory

    monkeypatch.setattr(memory, "available", lambda device="cpu": 1 << 20)
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "--vocab-size", "100000"]) == 2
    err = capsys.readouterr().err
    assert "training a tokenizer of --vocab-size 100000 needs about 4.13 MiB" in err
    assert "1 MiB is available" in err


def test_the_subprocess_exit_status_of_a_huge_vocabulary_is_2(tmp_path):
    """What the user saw: exit 134 and a Rust backtrace; now exit 2 and one line."""
    done = subprocess.run([sys.executable, "-m", "minitodi", "train", "--out", str(tmp_path / "run"), *TINY,
                           "--vocab-size", "1e9"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


# ---- evaluate --log: nothing of the user's is appended to -----------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl",
                                  "run.json", "last/training_state.json", "last/eval.jsonl",
                                  "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                  "link-to-weights.jsonl", "last.new", "last.old/eval.jsonl"])
def test_evaluate_log_refuses_a_file_of_a_run_directory(runs, tmp_path, capsys, monkeypatch, name):
    from minitodi import evaluation

    def never(*args, **kwargs):
        raise AssertionError("evaluated before --log was checked")

    monkeypatch.setattr(evaluation, "evaluate", never)
    run = tmp_path / "run"
    shutil.copytree(runs / "teacher", run)
    (run / "link-to-weights.jsonl").symlink_to(run / "model.safetensors")
    (run / "last.old").mkdir()  # where a run moves its state aside while it saves a new one
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["evaluate", "--model", str(run), "--log", str(run / name), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--log {run / name} is " in err and str(run) in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (run / name).exists() or (run / name) in before


def test_evaluate_log_refuses_an_existing_file_that_is_no_evaluation_log(runs, tmp_path, capsys):
    """The dataset itself, or any other file of the user's, would get a JSON line appended."""
    dataset = tmp_path / "mine.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": f"say {w}", "response": w}) + "\n" for w in "abcd"))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for path in (dataset, notes):
        content = path.read_bytes()
        assert main(["evaluate", "--model", str(runs / "teacher"), "--data", str(dataset), "--log", str(path),
                     "--decoding", "greedy"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "exists and is not an evaluation log" in err
        assert path.read_bytes() == content


def test_evaluate_prints_its_scores_before_a_log_that_fails(runs, tmp_path, capsys, monkeypatch):
    """Appending fails with ENOSPC, as on a full disk: the scores are on stdout all the same.

    The append is made to fail in cli's open: a device such as /dev/full is refused as --log up front.
    """
    log = tmp_path / "eval.jsonl"

    def full_disk(path, mode="r", *args, **kwargs):
        if Path(path) == log and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(cli, "open", full_disk, raising=False)  # a module global shadows the builtin
    assert main(["evaluate", "--model", str(runs / "teacher"), "--decoding", "greedy", "--log", str(log),
                 "--max-new-tokens", "8"]) == 2
    captured = capsys.readouterr()
    assert "rouge_l" in json.loads(captured.out)
    assert captured.err.count("\n") == 1
    assert f"--log {log}: the scores above were not logged (No space left on device)" in captured.err


def test_evaluate_appends_a_line_of_its_own_after_a_cut_short_one(runs, tmp_path, capsys):
    log = tmp_path / "eval.jsonl"
    for _ in range(2):
        assert main(["evaluate", "--model", str(runs / "teacher"), "--decoding", "greedy", "--log", str(log),
                     "--max-new-tokens", "8"]) == 0
    log.write_text(log.read_text()[:-40])  # the second write cut short: no newline at the end
    assert main(["evaluate", "--model", str(runs / "teacher"), "--decoding", "greedy", "--log", str(log),
                 "--max-new-tokens", "8"]) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == json.loads(lines[2])


def test_evaluate_max_new_tokens_must_leave_room_for_a_prompt(runs, capsys):
    """It was 'record 0 (reverse): ... but seq_len + 1 = -999999943'."""
    for value in ("1e9", "56"):
        assert main(["evaluate", "--model", str(runs / "teacher"), "--max-new-tokens", value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        words = f"--max-new-tokens {int(float(value))} leaves no room for a prompt in the model's context"
        assert f"{words} of 56 positions: give at most 55" in err


@pytest.mark.parametrize("value", ["54", "55"])
def test_evaluate_max_new_tokens_too_large_for_a_record_names_the_option(runs, capsys, value):
    """It was '... but a sequence holds 2 (seq_len 1)': a length evaluate has no option for."""
    assert main(["evaluate", "--model", str(runs / "teacher"), "--max-new-tokens", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seq_len" not in err, err
    assert f"--max-new-tokens {value} leaves {56 - int(value)} of the model's 56 positions" in err
    assert "give a smaller --max-new-tokens" in err


def test_json_lines_in_a_csv_file_are_evaluated_as_records(runs, tmp_path, capsys):
    """Read by content: JSON Lines named .csv give ROUGE-L on their prompts, not the perplexity of text."""
    data = tmp_path / "mine.csv"
    records = [{"instruction": f"say {w}", "response": w} for w in "abcdefghij"]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["evaluate", "--model", str(runs / "teacher"), "--data", str(data), "--split", "valid",
                 "--decoding", "greedy", "--max-new-tokens", "8", "--log", str(tmp_path / "eval.jsonl")]) == 0
    assert "rouge_l" in json.loads(capsys.readouterr().out)


_EMPTY_NAMES = [(["train", "--out", "OUT"], "--data"), (["train", "--out", "OUT"], "--tokenizer"),
                (["train"], "--out"), (["distill", "--out", "OUT"], "--teacher"),
                (["evaluate"], "--model"), (["evaluate", "--model", "MODEL"], "--log"),
                (["evaluate", "--model", "MODEL"], "--teacher"), (["generate", "--prompt", "hi"], "--model")]


@pytest.mark.parametrize("command, flag", _EMPTY_NAMES)
def test_an_empty_file_name_is_refused(tmp_path, capsys, command, flag):
    """--log '' logged to the default file and --tokenizer '' trained a new tokenizer, silently."""
    argv = [str(tmp_path / word) if word.isupper() else word for word in command]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, flag, ""])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: must name a file or directory" in err, err
    assert not (tmp_path / "OUT").exists()


def test_generate_with_an_empty_prompt_says_which_option(runs, capsys):
    assert main(["generate", "--model", str(runs / "teacher"), "--prompt", ""]) == 2
    assert capsys.readouterr().err.strip().endswith("--prompt is empty: give some text to continue")


def test_distill_examples_longer_than_the_teachers_context_are_refused(runs, tmp_path, capsys):
    """It was 'sequence of 100 positions exceeds n_positions = 56', from inside the teacher's forward pass."""
    out = tmp_path / "s"
    flags = ["--preset", "tiny", "--steps", "2", "--quiet", "--data", "pydoc", "--seq-len", "100"]
    assert main(["distill", "--teacher", str(runs / "teacher"), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    assert ("--seq-len 100 makes examples of up to 100 tokens, more than the teacher's context of 56 "
            f"positions ({runs / 'teacher'}): give at most --seq-len 56") in err


def test_evaluate_on_text_shorter_than_one_example_is_one_line(runs, tmp_path, capsys):
    """heldout_losses divided by zero counted tokens (a ZeroDivisionError traceback)."""
    text = tmp_path / "short.txt"
    text.write_text("a short text\nb\n")
    assert main(["evaluate", "--model", str(runs / "teacher"), "--data", str(text), "--log",
                 str(tmp_path / "eval.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{text}: its test split makes no example of 25 tokens" in err
    assert not (tmp_path / "eval.jsonl").exists()


def test_running_a_model_too_large_for_the_memory_is_refused_with_the_estimate(runs, tmp_path, capsys,
                                                                               monkeypatch):
    """The KV cache, activations and logits, estimated for the sequences at hand, before any token."""
    from minitodi import checkpoint, generate, memory
    from minitodi.core.model import GPTConfig, init_params

    shutil.copy(runs / "teacher" / "tokenizer.json", tmp_path / "tokenizer.json")
    config = GPTConfig(vocab_size=300, n_positions=4096, n_embd=16, n_layer=1, n_head=2)
    checkpoint.save(tmp_path, init_params(config), config)
    monkeypatch.setattr(memory, "available", lambda device="cpu": 1 << 20)

    def never(*args, **kwargs):
        raise AssertionError("generation began")

    monkeypatch.setattr(generate, "generate", never)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "1e4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on 1 sequence(s) of up to 4096 tokens needs about" in err
    assert main(["evaluate", "--model", str(tmp_path), "--log", str(tmp_path / "eval.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on 64 sequence(s) of up to" in err and "1 MiB is available" in err


def test_generate_refuses_an_instruction_and_a_prompt_together(tmp_path, capsys):
    """--prompt given with --instruction was silently ignored (exit 0); refused before any model loads."""
    argv = ["generate", "--model", str(tmp_path / "none"), "--instruction", "x", "--prompt", "y"]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt" in err and "--instruction" in err, err


def test_generate_refuses_an_input_without_an_instruction(tmp_path, capsys):
    """--input is the instruction's context: with --prompt alone it was silently ignored."""
    argv = ["generate", "--model", str(tmp_path / "none"), "--prompt", "y", "--input", "z"]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input" in err and "--instruction" in err, err


def test_gradcheck_refuses_a_loss_given_twice(capsys):
    """``--losses fkl fkl`` checked fkl twice (demo refuses duplicates)."""
    assert exit_status(["gradcheck", "--losses", "fkl", "rkl", "fkl"]) == 2
    err = capsys.readouterr().err
    assert "--losses" in err and "fkl given more than once" in err, err


@pytest.mark.parametrize("option", ["beta=nan", "beta=-1"])
def test_conformance_names_the_option_of_a_bad_loss_option(tmp_path, capsys, option):
    """``--option beta=nan`` said "beta must be a finite number >= 0, got nan", not naming --option."""
    path = tmp_path / "mine.py"
    path.write_text("def fn(s, t, mask, temperature, beta=1.0):\n    raise AssertionError('was run')\n")
    argv = ["conformance", f"{path}:fn", "--loss", "todi", "--framework", "numpy", "--option", option]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--option {option.split('=')[0]}" in err and "beta must be" in err, err


@pytest.mark.parametrize("case", ["too long", "link loop"])
@pytest.mark.parametrize("argv", [["train", "--out", "{}"], ["train", "--out", "o", "--tokenizer", "{}"],
                                  ["demo", "--out", "{}"], ["evaluate", "--model", "m", "--log", "{}"]])
def test_a_path_no_file_can_have_names_its_option(tmp_path, capsys, case, argv):
    """A name too long for the file system, or a loop of symbolic links: refused naming the option."""
    path = tmp_path / ("a" * 300)
    if case == "link loop":
        path = tmp_path / "loop1"
        path.symlink_to(tmp_path / "loop2")
        (tmp_path / "loop2").symlink_to(path)
    option = argv[-2]
    argv = [arg.format(path) for arg in argv]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {option}:" in err, err
    assert ("too long" if case == "too long" else "loop of symbolic links") in err, err


def test_evaluate_a_model_that_is_a_device_says_it_is_no_checkpoint_directory(tmp_path, capsys):
    """The default --log lies in --model: --model is checked first, so the error is about the model."""
    (tmp_path / "devnull").symlink_to(os.devnull)
    assert exit_status(["evaluate", "--model", str(tmp_path / "devnull"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a checkpoint directory" in err and "--log" not in err, err


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_diverged_student_says_the_step_and_the_learning_rate(runs, tmp_path, capsys, command):
    """lr 1e30: the update leaves NaN logits, which distill's divergence would refuse as bad input."""
    args = [command, "--out", str(tmp_path / "run"), *TINY, "--lr", "1e30"]
    if command == "distill":
        args += ["--teacher", str(runs / "teacher")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step " in err and "learning rate" in err, err
    assert "state was saved" in err or "holds step" in err, err


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_ctrl_c_with_stderr_not_a_terminal_is_one_line(runs, capsys, monkeypatch, command):
    """No progress line is drawn in place on a file or a pipe: no blank line before the message."""
    from minitodi import evaluation, generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    monkeypatch.setattr(generate, "generate", interrupted)
    argv = ["evaluate", "--model", str(runs / "teacher"), "--log", str(runs / "ctrl_c.jsonl")]
    if command == "generate":
        argv = ["generate", "--model", str(runs / "teacher"), "--prompt", "a"]
    assert exit_status(argv) == 130
    assert capsys.readouterr().err == f"minitodi {command}: interrupted\n"
