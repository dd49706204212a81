"""Every subcommand, end to end, in a tiny configuration (seconds, not minutes)."""

import json
import shutil
import subprocess
import sys

import pytest

from minitodi import presets
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
    (["--lr", "nan"], "lr must be a finite number > 0"), (["--lr", "-1"], "lr must be"),
    (["--lr", "inf"], "lr must be"), (["--temperature", "0"], "temperature must be"),
    (["--option", "gamma=3"], "no option gamma; its options: beta"),
])
def test_bad_settings_are_one_line_and_write_nothing(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(runs / "teacher"), "--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_unusable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": f"say {w}", "response": w}) + "\n" for w in "abcdefghij"]
    data.write_text("".join(lines))
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main(["train", "--out", str(out), "--data", str(data), *TINY]) == 2
        err = capsys.readouterr().err
        assert f"cannot use {out} as a run directory" in err and err.count("\n") == 1


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
