"""Training loops: the combined loss and its gradient, learning, exact resume, the teacher's tokenizer."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from minitodi import checkpoint, data, evaluation, rundir
from minitodi.core import layers, losses, optim
from minitodi.core.gradcheck import directional_check
from minitodi.core.layers import IGNORE_INDEX
from minitodi.core.model import GPTConfig, backward, forward, init_params
from minitodi.evaluation import evaluate, heldout_losses
from minitodi.teacher import Teacher
from minitodi.tokenizer import Tokenizer
from minitodi.train import TrainConfig, fit, step_loss

SEQ = 48


@pytest.fixture(scope="module")
def run_inputs(small_suite, small_suite_tokenizer):
    """(suite, tokenizer, a one-layer GPT-2 config, the suite's examples by split) for short runs."""
    suite = small_suite
    tok = small_suite_tokenizer
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=SEQ + 16, n_embd=16, n_layer=1, n_head=2)
    ex = {k: data.instruction_examples(suite[k], tok, SEQ) for k in ("train", "valid", "test")}
    return suite, tok, cfg, ex


@pytest.fixture(scope="module")
def teacher(run_inputs, tmp_path_factory):
    _, tok, cfg, ex = run_inputs
    out = tmp_path_factory.mktemp("teacher")
    fit(out, cfg, tok, ex["train"], ex["valid"], TrainConfig(steps=30, batch_size=8, eval_every=15),
        progress=False)
    return Teacher.load(out, dtype="float64")


def tiny(**overrides):
    return TrainConfig(**{"steps": 12, "batch_size": 8, "eval_every": 4, "log_every": 2, **overrides})


def test_sft_lowers_the_validation_loss_and_keeps_the_best(run_inputs, tmp_path):
    _, tok, cfg, ex = run_inputs
    summary = fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=40, eval_every=10), progress=False)
    curve = [ce for _, ce in summary["valid_curve"]]
    assert curve[-1] < curve[0] - 0.5
    assert summary["best_valid_ce"] == min(curve)
    best, _ = checkpoint.load(tmp_path)
    assert heldout_losses(best, cfg, ex["valid"], tok.eos_id)[0] == pytest.approx(min(curve), rel=1e-6)
    assert Tokenizer.load(tmp_path).fingerprint() == tok.fingerprint()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(2, 41, 2))


def test_distillation_step_is_the_weighted_sum_and_its_gradient_is_right(run_inputs, teacher):
    _, tok, cfg, ex = run_inputs
    params = init_params(cfg, seed=1, dtype=np.float64)
    idx, labels = data.collate(ex["train"][:4], tok.eos_id)
    tcfg = tiny(loss="fkl", kd_rate=0.3, temperature=2.0)
    total, ce, kd, grads = step_loss(params, cfg, idx, labels, tcfg, teacher)
    assert total == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-14)
    mask = labels != IGNORE_INDEX
    assert kd == pytest.approx(losses.fkl(forward(params, idx, cfg)[0], teacher.logits(idx), mask,
                                          temperature=2.0)[0], rel=1e-14)

    def total_loss():
        return step_loss(params, cfg, idx, labels, tcfg, teacher)[0]

    analytic, numeric, err = directional_check(total_loss, params, grads, eps=1e-5)
    assert err < 1e-6, (analytic, numeric)


def test_distillation_gradient_counts_response_tokens_only(run_inputs, teacher):
    _, tok, cfg, ex = run_inputs
    params = init_params(cfg, seed=1, dtype=np.float64)
    idx, labels = data.collate(ex["train"][:4], tok.eos_id)
    logits, cache = forward(params, idx, cfg)
    _, dkd = losses.todi(logits, teacher.logits(idx), labels != IGNORE_INDEX, temperature=2.0)
    assert np.all(dkd[labels == IGNORE_INDEX] == 0)
    _, ce_cache = layers.cross_entropy_forward(logits, labels)
    expected = backward(0.5 * layers.cross_entropy_backward(1.0, ce_cache) + 0.5 * dkd, cache)
    grads = step_loss(params, cfg, idx, labels, tiny(loss="todi"), teacher)[3]
    for name in params:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-12, atol=1e-15)


def _run_until(out, run_inputs, tcfg, teacher, interrupt_at, monkeypatch):
    """Run ``fit`` and press Ctrl-C (a real SIGINT) during step ``interrupt_at``."""
    _, tok, cfg, ex = run_inputs
    calls = {"n": 0}
    real = optim.clip_grad_norm

    def clip_and_maybe_interrupt(grads, max_norm):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return real(grads, max_norm)

    monkeypatch.setattr(optim, "clip_grad_norm", clip_and_maybe_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(out, cfg, tok, ex["train"], ex["valid"], tcfg, teacher=teacher, progress=False)
    monkeypatch.setattr(optim, "clip_grad_norm", real)


@pytest.mark.parametrize("loss", ["sft", "todi"])
def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(run_inputs, teacher, tmp_path, monkeypatch,
                                                               loss):
    _, tok, cfg, ex = run_inputs
    t = None if loss == "sft" else Teacher(teacher.params, teacher.config, teacher.tokenizer)
    tcfg = tiny(loss=loss, dtype="float64" if t is not None else "float32")
    fit(tmp_path / "straight", cfg, tok, ex["train"], ex["valid"], tcfg, teacher=t, progress=False)
    _run_until(tmp_path / "resumed", run_inputs, tcfg, t, interrupt_at=7, monkeypatch=monkeypatch)
    state = checkpoint.load_training_state(tmp_path / "resumed" / "last")
    assert state["step"] == 7  # the step under way was finished, then saved
    fit(tmp_path / "resumed", cfg, tok, ex["train"], ex["valid"], tcfg, teacher=t, progress=False)
    for kind in ("", "last"):
        a, _ = checkpoint.load(tmp_path / "straight" / kind)
        b, _ = checkpoint.load(tmp_path / "resumed" / kind)
        for name in a:
            assert np.array_equal(a[name], b[name]), name
    assert ((tmp_path / "straight" / "metrics.jsonl").read_text()
            == (tmp_path / "resumed" / "metrics.jsonl").read_text())


def test_resume_after_a_crash_restarts_from_the_last_evaluation(run_inputs, tmp_path, monkeypatch):
    _, tok, cfg, ex = run_inputs
    tcfg = tiny()
    fit(tmp_path / "straight", cfg, tok, ex["train"], ex["valid"], tcfg, progress=False)
    calls = {"n": 0}
    real = optim.adamw_step

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(optim, "adamw_step", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(tmp_path / "crashed", cfg, tok, ex["train"], ex["valid"], tcfg, progress=False)
    monkeypatch.setattr(optim, "adamw_step", real)
    assert checkpoint.load_training_state(tmp_path / "crashed" / "last")["step"] == 4
    fit(tmp_path / "crashed", cfg, tok, ex["train"], ex["valid"], tcfg, progress=False)
    a, _ = checkpoint.load(tmp_path / "straight")
    b, _ = checkpoint.load(tmp_path / "crashed")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert ((tmp_path / "straight" / "metrics.jsonl").read_text()
            == (tmp_path / "crashed" / "metrics.jsonl").read_text())


def test_an_interrupted_swap_of_the_last_state_is_recovered(run_inputs, tmp_path):
    _, tok, cfg, ex = run_inputs
    fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)
    last = tmp_path / "last"
    last.rename(tmp_path / "last.old")  # as if killed between the two renames
    (tmp_path / "last.new").mkdir()  # and a partial new one left behind
    checkpoint.recover(last)
    assert checkpoint.load_training_state(last)["step"] == 4
    assert not (tmp_path / "last.old").exists() and not (tmp_path / "last.new").exists()


def test_other_settings_in_the_same_directory_are_refused(run_inputs, tmp_path):
    _, tok, cfg, ex = run_inputs
    fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)
    with pytest.raises(ValueError, match=r"other settings .*train\.lr: 0\.002 -> 0\.0001"):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4, lr=1e-4), progress=False)
    with pytest.raises(ValueError, match=r"other settings .*data\.train: "):  # other data, same settings
        fit(tmp_path, cfg, tok, ex["train"][1:], ex["valid"], tiny(steps=4), progress=False)
    shutil.rmtree(tmp_path / "last")  # as if stopped before its first evaluation: the retry may differ
    (tmp_path / "model.safetensors").unlink()
    retried = fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4, lr=1e-4), progress=False)
    assert retried["steps"] == 4


def test_a_resume_with_another_teacher_of_the_same_shape_is_refused(run_inputs, teacher, tmp_path):
    """The teacher is recorded by a digest of its weights: another teacher of the same config is named."""
    _, tok, cfg, ex = run_inputs
    fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(loss="fkl", steps=4), teacher=teacher,
        progress=False)
    other_params = {name: p + 0.01 for name, p in teacher.params.items()}
    other = Teacher(other_params, teacher.config, teacher.tokenizer)
    log = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"teacher\.weights: "):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(loss="fkl", steps=8), teacher=other,
            progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == log


def test_from_best_with_a_model_of_another_shape_loses_nothing(run_inputs, tmp_path):
    """--from-best on a run of another size is refused before last/, the log or run.json change."""
    _, tok, cfg, ex = run_inputs
    fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    wider = GPTConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match=r"best model of another shape .*n_embd: 16 -> 32"):
        fit(tmp_path, wider, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False, start="best")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_a_torn_last_log_line_is_dropped_on_resume(run_inputs, tmp_path, capsys):
    """A disk that filled during an append leaves half a line: the resume drops it and says so."""
    _, tok, cfg, ex = run_inputs
    fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=8), progress=False)
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 9, "loss": 1.2')  # torn: no closing brace, no newline
    summary = fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=8), progress=False)
    assert summary["steps"] == 8
    assert "dropped its torn last line" in capsys.readouterr().err
    assert all(line.endswith("}") for line in log.read_text().splitlines())


def test_an_unreadable_log_line_in_the_middle_names_the_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a log record"):
        rundir.read_log(log)


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError, match=r"No space left on device \(appending to .*metrics.jsonl\)"):
        rundir.append_log(tmp_path / "metrics.jsonl", {"step": 1})


def test_teacher_with_another_tokenizer_is_refused(run_inputs, teacher, tmp_path):
    suite, tok, cfg, ex = run_inputs
    other = Tokenizer.train([data.record_text(r) for r in suite["train"]], 290)
    with pytest.raises(ValueError, match=r"is not the student's \(one trained from the data\)"):
        fit(tmp_path, cfg, other, ex["train"], ex["valid"], tiny(loss="fkl"), teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="teacher="):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(loss="fkl"), progress=False)


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="unknown loss"):
        TrainConfig(loss="kl")
    with pytest.raises(ValueError, match="kd_rate"):
        TrainConfig(kd_rate=1.5)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_evaluate_reports_every_metric(run_inputs, teacher):
    suite, tok, cfg, ex = run_inputs
    result = evaluate(teacher.params, teacher.config, tok, suite["test"], ex["test"], teacher=teacher,
                      max_new_tokens=8)
    assert result["divergence"] == pytest.approx(0.0, abs=1e-12)  # a model against itself
    nll = heldout_losses(teacher.params, teacher.config, ex["test"], tok.eos_id)[0]
    assert result["perplexity"] == pytest.approx(np.exp(nll), rel=1e-12)
    assert set(result["per_task"]) == {r["task"] for r in suite["test"]}


def test_evaluate_scores_the_generated_answers_against_the_references(run_inputs, monkeypatch):
    """Every answer is "cat": ROUGE-L and exact match take the best reference, then the mean over records."""
    suite, tok, cfg, ex = run_inputs

    def always_cat(params, config, prompts, **settings):
        return [tok.encode("cat")] * len(prompts)

    monkeypatch.setattr(evaluation, "generate", always_cat)
    references = [["dog", "cat"], ["black cat"], ["dog"]]  # ROUGE-L F 100, 2 * (1 * 1/2) / (1 + 1/2), 0
    records = [{**r, "references": refs, "task": "t"} for r, refs in zip(suite["test"], references)]
    result = evaluate(init_params(cfg, seed=3), cfg, tok, records, ex["test"][:3], max_new_tokens=8)
    assert result["rouge_l"] == pytest.approx((100 + 200 / 3) / 3, rel=1e-12)
    assert result["exact_match"] == pytest.approx(100 / 3, rel=1e-12)
    assert result["per_task"] == {"t": {"rouge_l": result["rouge_l"], "exact_match": result["exact_match"]}}


def test_cached_teacher_logits_equal_a_forward_pass_where_they_count(run_inputs, teacher, monkeypatch):
    _, tok, cfg, ex = run_inputs
    cached = Teacher(teacher.params, teacher.config, teacher.tokenizer)
    assert cached.precompute(ex["train"])
    idx, labels = data.collate(ex["train"][5:13], tok.eos_id)
    counted = labels != IGNORE_INDEX
    fresh = teacher.logits(idx)
    np.testing.assert_allclose(cached.batch_logits(idx, labels), fresh[counted], rtol=1e-12, atol=1e-12)
    unseen, unseen_labels = data.collate(ex["valid"][:3], tok.eos_id)  # not cached: a forward pass
    unseen_counted = unseen_labels != IGNORE_INDEX
    want = teacher.logits(unseen)[unseen_counted]
    np.testing.assert_allclose(cached.batch_logits(unseen, unseen_labels), want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(Teacher, "CACHE_BYTES", 1)  # too big to cache: precompute declines
    assert not Teacher(teacher.params, teacher.config, teacher.tokenizer).precompute(ex["train"])


def test_ctrl_c_while_the_teacher_logits_are_computed_stops_before_the_run_changes(
        run_inputs, teacher, tmp_path, monkeypatch):
    """The teacher's cache is built in batches that look at the Ctrl-C flag: a demo worker stops there."""
    _, tok, cfg, ex = run_inputs
    stop = []
    real_logits = Teacher.logits
    calls = []

    def press_ctrl_c_after_the_first_batch(self, idx, rows=None):
        calls.append(1)
        stop.append(True)
        return real_logits(self, idx, rows)

    monkeypatch.setattr(Teacher, "logits", press_ctrl_c_after_the_first_batch)
    monkeypatch.setattr(Teacher, "CACHE_BATCH", 16)
    fresh = Teacher(teacher.params, teacher.config, teacher.tokenizer)
    assert not fresh.precompute(ex["train"], stop=stop)
    assert len(calls) == 1 and fresh._cache == {}
    monkeypatch.setattr(rundir, "ctrl_c_flag", lambda: _pressed())
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", cfg, tok, ex["train"], ex["valid"], tiny(loss="fkl"), teacher=fresh,
            progress=False)
    assert list((tmp_path / "run").iterdir()) == []  # nothing written


@contextlib.contextmanager
def _pressed():
    yield [True]  # Ctrl-C already pressed

# ------------------------------------------------------------------------- bad settings and run directories


@pytest.mark.parametrize("settings, message", [
    ({"lr": float("nan")}, "lr must be a finite number > 0"), ({"lr": float("inf")}, "lr must be"),
    ({"lr": -1.0}, "lr must be"), ({"loss": "todi", "temperature": 0.0}, "temperature must be"),
    ({"seed": -1}, "seed must be an int >= 0"), ({"weight_decay": float("nan")}, "weight_decay"),
    ({"loss": "todi", "loss_options": {"gamma": 3.0}}, "no option gamma; its options: beta"),
    ({"loss": "sfkl", "loss_options": {"lam": 3.0}}, "lam"),
])
def test_settings_are_checked_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_a_best_model_without_resumable_state_is_never_restarted_silently(run_inputs, tmp_path):
    _, tok, cfg, ex = run_inputs
    first = fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=8), progress=False)
    best = (tmp_path / "model.safetensors").read_bytes()
    log = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "last" / "training_state.json").unlink()
    with pytest.raises(ValueError, match="best model but no resumable state.*--restart.*--from-best"):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=8), progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == best
    assert (tmp_path / "metrics.jsonl").read_text() == log
    again = fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=8, lr=1e-9), progress=False,
                start="best")
    # the best model's validation CE, not a fresh initialisation's
    assert again["best_valid_ce"] == pytest.approx(first["best_valid_ce"], rel=1e-5)
    restarted = fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=8), progress=False,
                    start="restart")
    assert restarted["valid_curve"] == first["valid_curve"]


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(run_inputs, tmp_path):
    _, tok, cfg, ex = run_inputs
    (tmp_path / "config.json").write_text("mine")
    with pytest.raises(ValueError, match="not a minitodi run"):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "mine"


@pytest.mark.parametrize("case", ["file", "under a file", "unwritable"])
def test_unusable_run_directories_are_one_line_errors(run_inputs, tmp_path, monkeypatch, case):
    _, tok, cfg, ex = run_inputs
    (tmp_path / "f").write_text("x")
    paths = {"file": tmp_path / "f", "under a file": tmp_path / "f" / "run", "unwritable": tmp_path / "ro"}
    out = paths[case]
    if case == "unwritable":  # also as root, who may write anywhere
        monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=f"cannot use {out} as a run directory: "):
        fit(out, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)
    assert (tmp_path / "f").read_text() == "x"


def test_one_writer_per_run_directory_and_a_dead_one_never_blocks(run_inputs, tmp_path):
    _, tok, cfg, ex = run_inputs
    hold_the_lock = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                     "fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold_the_lock, str(tmp_path)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"1\n"
    with pytest.raises(ValueError, match="in use by another minitodi process"):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)
    assert list(tmp_path.iterdir()) == []
    holder.kill()  # killed while holding the lock: the OS releases it
    holder.wait()
    assert fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(steps=4), progress=False)["steps"] == 4


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_state(run_inputs, tmp_path, monkeypatch):
    _, tok, cfg, ex = run_inputs
    real, calls = optim.adamw_step, {"n": 0}

    def poison_at_step_6(params, *args, **kwargs):
        real(params, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            params["transformer.wte.weight"][0, 0] = np.nan

    monkeypatch.setattr(optim, "adamw_step", poison_at_step_6)
    message = r"step 6: the loss is nan.* last finite loss was \d.*Likely cause"
    with pytest.raises(FloatingPointError, match=message):
        fit(tmp_path, cfg, tok, ex["train"], ex["valid"], tiny(), progress=False)
    state = checkpoint.load_training_state(tmp_path / "last")
    params, _ = checkpoint.load(tmp_path / "last")
    assert state["step"] == 4 and all(np.isfinite(p).all() for p in params.values())
