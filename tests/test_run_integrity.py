"""A run directory's files damaged, missing, swapped or cut short: one line, nothing of the user's lost.

Every case goes through the command line (``minitodi.cli.main``, or a subprocess where a resource limit
or a signal must reach a whole process) on a copy of one small trained run.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import read_only
from safetensors.numpy import load_file, save_file

from minitodi import checkpoint, data
from minitodi.cli import main
from minitodi.core import optim
from minitodi.tokenizer import Tokenizer

TINY = ["--preset", "tiny", "--steps", "6", "--batch-size", "8", "--eval-every", "3", "--vocab-size", "300",
        "--seq-len", "48", "--max-new-tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two small runs and a data file, made once for the module.

    ``run`` is trained on the synthetic suite, ``other`` on ``other.jsonl``, another draw of the suite:
    another tokenizer of the same vocabulary size.
    """
    root = tmp_path_factory.mktemp("integrity")
    assert main(["train", "--out", str(root / "run"), *TINY]) == 0
    suite = data.synthetic_suite(seed=1, n_train=240, n_valid=16, n_test=16)
    data.write_jsonl(suite["train"] + suite["valid"], root / "other.jsonl")
    assert main(["train", "--out", str(root / "other"), "--data", str(root / "other.jsonl"), *TINY]) == 0
    theirs = Tokenizer.load(root / "other")
    ours = Tokenizer.load(root / "run")
    assert theirs.fingerprint() != ours.fingerprint() and theirs.vocab_size == ours.vocab_size
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run, to damage."""
    return shutil.copytree(trained / "run", tmp_path / "run")


def snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line(capsys, *names):
    """The one line a user error prints on stderr; it names each of ``names``."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def run_cli(args, limit=None, timeout=300):
    """``python -m minitodi ARGS`` in a subprocess, optionally under a ``(resource, bytes)`` limit."""
    def set_limit():
        if limit is not None:
            resource.setrlimit(limit[0], (limit[1], limit[1]))

    return subprocess.run([sys.executable, "-m", "minitodi", *map(str, args)], capture_output=True,
                          text=True, preexec_fn=set_limit, timeout=timeout)


# ------------------------------------------------------------------------------------------ --from-best


def _nan_model(path):
    tensors = load_file(str(path))
    tensors["transformer.wte.weight"][3, 1] = np.nan
    save_file(tensors, str(path), {"format": "pt"})


DAMAGE = {
    "nan": _nan_model,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:5000]),
    "empty": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(b"\x00\xff" * 300),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_from_best_refuses_a_damaged_best_model_and_leaves_the_run_resumable(run, capsys, damage):
    DAMAGE[damage](run / "model.safetensors")
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--from-best", *TINY]) == 2
    one_line(capsys, "model.safetensors")
    assert snapshot(run) == before  # last/ and metrics.jsonl still there
    assert main(["train", "--out", str(run), *TINY]) == 0  # the resume it was before


def test_from_best_with_other_data_is_refused_naming_the_tokenizer(trained, run, capsys):
    before = snapshot(run)
    args = ["train", "--out", str(run), "--from-best", "--data", str(trained / "other.jsonl"), *TINY]
    assert main(args) == 2
    one_line(capsys, str(run / "tokenizer.json"), "--tokenizer")
    assert snapshot(run) == before
    assert main([*args, "--tokenizer", str(trained / "run" / "tokenizer.json")]) == 0  # as it suggests


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_from_best_with_a_file_from_another_run_says_the_files_come_from_different_runs(trained, run, capsys,
                                                                                       name):
    """No --tokenizer mends a model file or config.json copied in from another run: none is suggested."""
    shutil.copy(trained / "other" / name, run / name)
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--from-best", *TINY]) == 2
    err = one_line(capsys, str(run / "tokenizer.json"), str(run / name))
    assert "different runs" in err and "--tokenizer" not in err
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------ tokenizer.json


def test_a_resume_does_not_rewrite_tokenizer_json(run):
    tokenizer = run / "tokenizer.json"
    os.utime(tokenizer, ns=(10**18, 10**18))
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert tokenizer.stat().st_mtime_ns == 10**18


def test_a_stopped_restart_with_other_data_keeps_the_best_model_with_its_tokenizer(trained, run, capsys,
                                                                                 monkeypatch):
    """Stopped before its first evaluation, the new run has not replaced the best model nor its tokenizer."""
    best = snapshot(run)
    real = optim.clip_grad_norm

    def ctrl_c_in_the_first_step(grads, max_norm):
        signal.raise_signal(signal.SIGINT)
        return real(grads, max_norm)

    monkeypatch.setattr(optim, "clip_grad_norm", ctrl_c_in_the_first_step)
    other = ["--data", str(trained / "other.jsonl")]
    assert main(["train", "--out", str(run), "--restart", *other, *TINY]) == 130
    monkeypatch.setattr(optim, "clip_grad_norm", real)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / name).read_bytes() == best[Path(name)], name
    model = Tokenizer.load_for_model(run)
    assert model.fingerprint() == Tokenizer.load(trained / "run").fingerprint()
    assert main(["train", "--out", str(run), *other, *TINY]) == 0  # the new run goes on, then replaces both
    assert Tokenizer.load_for_model(run).fingerprint() == Tokenizer.load(trained / "other").fingerprint()
    capsys.readouterr()


@pytest.mark.parametrize("command", ["generate", "evaluate", "distill"])
def test_a_tokenizer_from_another_run_is_refused_at_load(trained, run, tmp_path, capsys, command):
    shutil.copy(trained / "other" / "tokenizer.json", run / "tokenizer.json")
    commands = {
        "generate": ["generate", "--model", str(run), "--prompt", "hello"],
        "evaluate": ["evaluate", "--model", str(run), "--log", str(tmp_path / "eval.jsonl")],
        "distill": ["distill", "--teacher", str(run), "--out", str(tmp_path / "student"), *TINY],
    }
    assert main(commands[command]) == 2
    err = one_line(capsys, str(run / "tokenizer.json"), str(run / "config.json"))
    assert "was trained with" in err
    assert not (tmp_path / "student").exists() and not (tmp_path / "eval.jsonl").exists()


def test_a_model_file_from_another_run_is_refused_at_load(trained, run, capsys):
    """The model file records its tokenizer too: copied in from a run with another one, it is refused."""
    shutil.copy(trained / "other" / "model.safetensors", run / "model.safetensors")
    assert main(["generate", "--model", str(run), "--prompt", "hello"]) == 2
    err = one_line(capsys, str(run / "tokenizer.json"), str(run / "model.safetensors"))
    assert "was trained with" in err


def _bad_merge(path):
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["merges"][0] = ["zzzq", "qqqz"]  # tokens the vocabulary does not have
    path.write_text(json.dumps(tokenizer))


def _no_eos(path):
    tokenizer = json.loads(path.read_text())
    tokenizer["added_tokens"] = []
    del tokenizer["model"]["vocab"]["<|endoftext|>"]
    path.write_text(json.dumps(tokenizer))


MALFORMED = {
    "empty": lambda path: path.write_bytes(b""),
    "bad JSON": lambda path: path.write_text('{"model": '),
    "not UTF-8": lambda path: path.write_bytes(b'{"a": "\xff\xfe"}'),
    "a JSON list": lambda path: path.write_text("[]"),
    "a bad merge": _bad_merge,
    "no end-of-text token": _no_eos,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_tokenizer_json_is_one_line_naming_it(run, tmp_path, capsys, case):
    MALFORMED[case](run / "tokenizer.json")
    assert main(["generate", "--model", str(run), "--prompt", "hello"]) == 2
    one_line(capsys, str(run / "tokenizer.json"))
    out = tmp_path / "new"
    assert main(["train", "--out", str(out), "--tokenizer", str(run / "tokenizer.json"), *TINY]) == 2
    one_line(capsys, str(run / "tokenizer.json"))
    assert not out.exists()


# ------------------------------------------------------------------------------------------ config.json


def _edit(path, **fields):
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


BAD_CONFIGS = {
    "a JSON list": (lambda path: path.write_text("[1, 2]"), "JSON list"),
    "not UTF-8": (lambda path: path.write_bytes(b'{"n_embd": "\xe9"}'), "not UTF-8"),
    "n_head true": (lambda path: _edit(path, n_head=True), "n_head is true"),
    "n_embd a string": (lambda path: _edit(path, n_embd="32"), "n_embd is"),
    "eps a string": (lambda path: _edit(path, layer_norm_epsilon="1e-5"), "layer_norm_epsilon is"),
    "eps negative": (lambda path: _edit(path, layer_norm_epsilon=-1), "layer_norm_epsilon is"),
    "heads not dividing": (lambda path: _edit(path, n_head=3), "n_head (3)"),
    "a billion layers": (lambda path: _edit(path, n_layer=10**9), "n_layer = 1000000000"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_json_is_one_line_naming_the_file_and_field(run, capsys, case):
    damage, message = BAD_CONFIGS[case]
    damage(run / "config.json")
    assert main(["generate", "--model", str(run), "--prompt", "hello"]) == 2
    one_line(capsys, str(run / "config.json"), message)


def test_a_billion_layers_are_refused_before_memory_is_filled(run):
    """Listing a billion layers' parameter names would take hundreds of GB: the header is read first."""
    _edit(run / "config.json", n_layer=10**9)
    done = run_cli(["generate", "--model", run, "--prompt", "hello"], limit=(resource.RLIMIT_AS, 2 << 30),
                   timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "n_layer = 1000000000, but" in done.stderr


# ------------------------------------------------------------------------------------------ the state


STATE_DAMAGE = {
    "a JSON list": lambda state: [state],
    "step a string": lambda state: {**state, "step": "7"},
    "no best": lambda state: {k: v for k, v in state.items() if k != "best"},
    "best a list": lambda state: {**state, "best": [1.0]},
    "data empty": lambda state: {**state, "data": {}},
    "optimizer_step negative": lambda state: {**state, "optimizer_step": -1},
}


@pytest.mark.parametrize("case", sorted(STATE_DAMAGE))
def test_a_damaged_training_state_json_is_one_line_and_changes_nothing(run, capsys, case):
    path = run / "last" / "training_state.json"
    path.write_text(json.dumps(STATE_DAMAGE[case](json.loads(path.read_text()))))
    before = snapshot(run)
    assert main(["train", "--out", str(run), *TINY]) == 2
    one_line(capsys, "training_state.json")
    assert snapshot(run) == before


def test_a_state_copied_from_another_run_is_refused(trained, run, capsys):
    """last/ of another run of the same shape (other data): whole and consistent, but not this run's."""
    shutil.rmtree(run / "last")
    shutil.copytree(trained / "other" / "last", run / "last")
    before = snapshot(run)
    assert main(["train", "--out", str(run), *TINY]) == 2
    one_line(capsys, f"{run / 'last'} holds the state of another run")
    assert snapshot(run) == before


def test_a_file_where_the_state_belongs_is_no_state(run, capsys):
    shutil.rmtree(run / "last")
    (run / "last").write_text("not a directory")
    assert main(["train", "--out", str(run), *TINY]) == 2  # a best model, and no state to resume
    one_line(capsys, "no resumable state")
    assert main(["train", "--out", str(run), "--restart", *TINY]) == 0
    assert checkpoint.load_training_state(run / "last")["step"] == 6


@pytest.mark.parametrize("name", ["last", "last.old"])
def test_a_read_only_state_is_refused_before_training(run, capsys, monkeypatch, name):
    """It trained, saved, then failed removing last.old/, left behind to fail every later resume the same way.

    os.access is faked to say the directory is read-only: these tests may run as root, whom chmod forbids
    nothing.
    """
    state = run / name
    if name == "last.old":
        shutil.copytree(run / "last", state)
    before = snapshot(run)
    read_only(monkeypatch, state)
    assert main(["train", "--out", str(run), *TINY]) == 2
    err = one_line(capsys, f"{state} is not writable")
    assert "chmod u+w" in err
    assert snapshot(run) == before


def test_a_log_line_that_is_not_a_record_is_one_line(run, capsys):
    log = run / "metrics.jsonl"
    log.write_text("[1, 2]\n" + log.read_text())
    before = snapshot(run)
    assert main(["train", "--out", str(run), *TINY]) == 2
    one_line(capsys, "metrics.jsonl, line 1")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------ the process


def test_a_full_disk_during_a_safetensors_write_is_one_line_and_keeps_the_old_file(run):
    """A file-size limit (``ulimit -f 32``) fails the model's write as a full disk would."""
    best = (run / "model.safetensors").read_bytes()
    assert len(best) > 32 << 10 > len((run / "tokenizer.json").read_bytes())
    done = run_cli(["train", "--out", run, "--restart", *TINY], limit=(resource.RLIMIT_FSIZE, 32 << 10))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot write {run / 'model.safetensors'}" in done.stderr
    assert (run / "model.safetensors").read_bytes() == best
    assert [p for p in run.rglob("*") if ".tmp" in p.name] == []


def test_sigterm_stops_at_a_step_boundary_and_saves_the_state(tmp_path):
    """``kill PID`` (SIGTERM) during step 2: that step is finished and saved, as after Ctrl-C."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from minitodi.cli import main
        from minitodi.core import optim
        real = optim.clip_grad_norm
        calls = []

        def clip(grads, max_norm):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(grads, max_norm)

        optim.clip_grad_norm = clip
        sys.exit(main({["train", "--out", str(out), *TINY]!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "interrupted at step 2/6" in done.stdout and "minitodi train: interrupted" in done.stderr
    state = checkpoint.load_training_state(out / "last")
    assert state["step"] == 2 and state["best"]["valid_ce"] == float("inf")  # before the first evaluation
    assert main(["train", "--out", str(out), *TINY]) == 0  # and it resumes from there


@pytest.mark.parametrize("start", [["--from-best"], ["--restart"], []])
def test_a_directory_in_place_of_the_log_is_refused_before_the_state_goes(run, capsys, start):
    """A new start deletes last/ before the log: a log it cannot replace must be found before that."""
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    before = snapshot(run)
    assert main(["train", "--out", str(run), *start, *TINY]) == 2
    one_line(capsys, str(run / "metrics.jsonl"))
    assert snapshot(run) == before and (run / "last").is_dir()


def test_from_best_on_a_directory_that_does_not_exist_creates_nothing(tmp_path, capsys):
    new = tmp_path / "new" / "run"
    assert main(["train", "--out", str(new), "--from-best", *TINY]) == 2
    one_line(capsys, str(new), "no best model")
    assert not (tmp_path / "new").exists()


def test_evaluate_with_a_teacher_of_another_tokenizer_names_both_tokenizer_files(trained, tmp_path, capsys):
    args = ["evaluate", "--model", str(trained / "run"), "--teacher", str(trained / "other"), "--log",
            str(tmp_path / "eval.jsonl"), "--quiet"]
    assert main(args) == 2
    err = one_line(capsys, str(trained / "run" / "tokenizer.json"), str(trained / "other" / "tokenizer.json"))
    assert "Tokenizer(" not in err and "distil" not in err
