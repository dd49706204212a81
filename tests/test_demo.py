"""The demo's results.json: the protocol, every model's scores, paired comparisons, efficiency."""

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import exit_status, read_only

from minitodi import demo, metrics, presets, report
from minitodi.evaluation import PAPER, Protocol
from minitodi.train import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo on a micro preset, students one at a time and, with the same cached teacher, two at a time."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.MODELS, "micro", {"n_embd": 16, "n_layer": 1, "n_head": 2})
        micro = presets.Preset(
            n_train=240, n_valid=16, n_test=16, vocab_size=300, seq_len=48, n_positions=56, teacher="micro",
            student="micro", teacher_train=TrainConfig(steps=8, batch_size=8, eval_every=4),
            student_train=TrainConfig(steps=4, batch_size=8, eval_every=2), seeds=(0, 1, 2),
            max_new_tokens=8)
        mp.setitem(presets.PRESETS, "micro", micro)
        mp.setenv("MINITODI_CACHE", str(root / "cache"))
        return [demo.run(root / f"out{jobs}", preset="micro", loss_names=("fkl", "rkl", "todi"), jobs=jobs,
                         progress=False, log=lambda *_: None) for jobs in (1, 2)]


@pytest.fixture(scope="module")
def results(runs):
    return runs[0]


def test_students_in_parallel_processes_give_the_same_numbers(runs):
    serial, parallel = runs
    assert (serial["config"]["jobs"], parallel["config"]["jobs"]) == (1, 2)
    for key in ("teacher", "students", "comparisons", "curves"):  # as results.json holds them
        assert json.loads(json.dumps(parallel[key])) == json.loads(json.dumps(serial[key]))


BAD_SETTINGS = [
    ({"loss_names": ("fkl", "fkl")}, r"losses \['fkl'\] are given more than once"),
    ({"loss_names": ()}, "losses: name at least one divergence"),
    ({"loss_names": ("fkl", "nope")}, r"unknown losses \['nope'\]"),
    ({"loss_names": "todi"}, "losses must be a list of names, got the string 'todi'"),
    ({"loss_names": ("sft", "fkl")}, "sft is always trained"),
    ({"seeds": [-1]}, r"seeds must be integers in \[0, 4294967295\], got \[-1\]"),
    ({"seeds": [0, math.nan]}, r"seeds must be integers in \[0, 4294967295\], got \[nan\]"),
    ({"seeds": [1.5, True]}, r"seeds must be integers in \[0, 4294967295\], got \[1.5, True\]"),
    ({"seeds": [2**32]}, r"seeds must be integers in \[0, 4294967295\], got \[4294967296\]"),
    ({"seeds": []}, "seeds: give at least one training seed"),
    ({"seeds": [3, 0, 3]}, r"seeds \[3\] are given more than once"),
    ({"jobs": 0}, "jobs must be an integer >= 1, got 0"),
    ({"jobs": -1}, "jobs must be"),
    ({"jobs": 1.5}, "jobs must be"),
    ({"jobs": True}, "jobs must be"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"arch": "bert"}, "arch must be one of"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_bad_settings_are_refused_before_anything_is_written_or_trained(settings, message, tmp_path,
                                                                        monkeypatch):
    """Each refusal names the setting, and comes before the output directory or the teacher's cache exists."""
    monkeypatch.setenv("MINITODI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=message):
        demo.run(tmp_path / "out", **{"preset": "quick", **settings}, progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flags, words", [
    (["--losses", "fkl", "rkl", "fkl"], ["losses", "fkl", "more than once"]),
    (["--seeds", "-1"], ["--seeds", "-1"]),
    (["--seeds", "1.5"], ["--seeds", "must be an integer", "1.5"]),
    (["--seeds", "nan"], ["--seeds", "must be an integer", "nan"]),
    (["--seeds", "1e300"], ["--seeds", "must be an integer in", "1e300"]),  # a seed names directories
    (["--seeds", str(demo.MAX_SEED + 1)], ["--seeds", str(demo.MAX_SEED)]),  # the parser's bound is demo's
    (["--seeds", "2", "0", "2"], ["--seeds", "2", "more than once"]),
    (["--losses", "all", "fkl"], ["--losses all", "alone"]),
    (["--jobs", "0"], ["--jobs", "0"]),
    (["--jobs", "1.5"], ["--jobs", "must be an integer", "1.5"]),
    (["--jobs", "nan"], ["--jobs", "must be an integer", "nan"]),
])
def test_the_command_line_refuses_them_in_one_line(flags, words, tmp_path, monkeypatch, capsys):
    """Exit status 2 and one line naming the option and its value, before anything is written or trained."""
    monkeypatch.setenv("MINITODI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "fit", lambda *a, **k: pytest.fail("training started"))
    assert exit_status(["demo", *flags, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minitodi demo: error: ") and err.count("\n") == 1
    assert all(word in err for word in words), err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("mine", ["notes.txt", "results.json", "demo.png/", "students"])
def test_out_holding_what_the_demo_did_not_write_is_refused_before_anything_runs(mine, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if mine.endswith("/"):  # a directory where the demo writes a file
        (out / mine).mkdir()
    else:  # the user's own results.json (no students' scores), or a file where the demo keeps its students
        (out / mine).write_text('{"mine": [1, 2]}')
    monkeypatch.setattr(demo, "_train_once", lambda *a, **k: pytest.fail("the teacher started"))
    with pytest.raises(ValueError, match="not the demo's"):
        demo.run(out, preset="quick", progress=False, log=lambda *_: None)
    assert [p.name for p in out.iterdir()] == [mine.rstrip("/")]
    assert mine.endswith("/") or (out / mine).read_text() == '{"mine": [1, 2]}'


def test_out_that_is_a_file_is_refused_and_the_demos_own_output_is_accepted(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        demo._claim(tmp_path / "file")
    out = tmp_path / "new" / "out"
    assert demo._claim(out) == out and out.is_dir()  # created, parents too
    (out / "students").mkdir()
    (out / "demo.png").write_bytes(b"")
    demo_results = {"protocol": {}, "teacher": {}, "students": {}, "comparisons": {}, "config": {}}
    (out / "results.json").write_text(json.dumps(demo_results))
    assert demo._claim(out) == out  # a finished demo: run again into it


@pytest.mark.parametrize("files", [
    {"results.json": '{"students": "my own notes"}'},  # a user's file that mentions students
    {"demo.png": "my own picture"},  # a figure with no demo results beside it
    {"results.json": "not json at all, students"},
])
def test_a_users_results_or_figure_is_never_taken_for_the_demos(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="not the demo's"):
        demo._claim(tmp_path)
    for name, text in files.items():
        assert (tmp_path / name).read_text() == text


def test_results_carry_the_protocol_and_every_metric(results):
    assert results["protocol"] == PAPER.to_dict()
    fields = {"rouge_l", "rouge_l_se", "exact_match", "validity", "coverage", "perplexity", "divergence"}
    for row in [results["teacher"], *results["students"].values()]:
        assert fields <= set(row)
    assert results["teacher"]["divergence"] == 0.0
    assert len(results["teacher"]["rouge_l_per_eval_seed"]) == 5


def test_students_are_means_over_training_seeds_with_their_standard_error(results):
    for row in results["students"].values():
        values = [r["rouge_l"] for r in row["seeds"]]
        assert [r["seed"] for r in row["seeds"]] == [0, 1, 2]
        assert row["rouge_l"] == pytest.approx(sum(values) / 3)
        assert row["rouge_l_se"] == pytest.approx(metrics.mean_se(values)[1], nan_ok=True)
        assert row["perplexity"] == pytest.approx(sum(r["perplexity"] for r in row["seeds"]) / 3)


def test_comparisons_are_paired_by_seed(results):
    assert set(results["comparisons"]) == {"todi-sft", "todi-fkl", "todi-rkl"}
    todi = [r["rouge_l"] for r in results["students"]["todi"]["seeds"]]
    for name in ("sft", "fkl", "rkl"):
        other = [r["rouge_l"] for r in results["students"][name]["seeds"]]
        c = results["comparisons"][f"todi-{name}"]
        d = [a - b for a, b in zip(todi, other)]
        mean = sum(d) / 3
        half = metrics.t_quantile(2) * math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
        assert (c["n"], c["mean"]) == (3, pytest.approx(mean))
        assert c["ci95"] == pytest.approx([mean - half, mean + half])


def test_efficiency_per_divergence(results):
    eff = results["efficiency"]
    assert set(eff["ms_per_step"]) == {"sft", "fkl", "rkl", "todi"}
    assert set(eff["kd_peak_mb"]) == {"fkl", "rkl", "todi"}
    assert all(v > 0 for v in [*eff["ms_per_step"].values(), *eff["kd_peak_mb"].values()])
    positions, vocab = eff["kd_shape"]
    # the KD loss keeps at least its float32 gradient: counted positions * V * 4 bytes
    assert min(eff["kd_peak_mb"].values()) >= positions * vocab * 4 / 2**20


def test_table_prints_intervals(results):
    text = report.table(results)
    assert "teacher" in text and "todi-fkl" in text and "95% CI [" in text and "KD peak MB" in text


def test_the_command_line_passes_the_protocol(monkeypatch, tmp_path, capsys):
    from minitodi.cli import main

    seen = {}
    def interrupted_run(out, **settings):  # records what the command line passed, then is interrupted
        seen.update(settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted_run)
    assert main(["demo", "--decoding", "greedy", "--eval-seeds", "1", "2", "--out", str(tmp_path)]) == 130
    assert seen["protocol"] == Protocol(decoding="greedy", eval_seeds=(1, 2))
    capsys.readouterr()  # the interrupted demo's line
    assert exit_status(["demo", "--eval-seeds", "3", "3", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line


def _micro_preset(monkeypatch, tmp_path):
    """The micro preset of the runs fixture, one seed, with its own teacher cache."""
    monkeypatch.setitem(presets.MODELS, "micro", {"n_embd": 16, "n_layer": 1, "n_head": 2})
    micro = presets.Preset(
        n_train=240, n_valid=16, n_test=16, vocab_size=300, seq_len=48, n_positions=56, teacher="micro",
        student="micro", teacher_train=TrainConfig(steps=8, batch_size=8, eval_every=4),
        student_train=TrainConfig(steps=4, batch_size=8, eval_every=2), seeds=(0,), max_new_tokens=8)
    monkeypatch.setitem(presets.PRESETS, "micro", micro)
    monkeypatch.setenv("MINITODI_CACHE", str(tmp_path / "cache"))


def test_students_of_another_demo_are_never_reused(tmp_path, monkeypatch):
    """A demo into an earlier demo's directory with another architecture is refused, naming what differs.

    The check runs before the new teacher trains, and the earlier students are left as they were.
    """
    _micro_preset(monkeypatch, tmp_path)
    out = tmp_path / "out"
    demo.run(out, preset="micro", loss_names=("fkl",), progress=False, log=lambda *_: None)
    before = {p: p.read_bytes() for p in (out / "students").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"other settings .*model\..*an earlier demo with other settings"):
        demo.run(out, preset="micro", loss_names=("fkl",), arch="llama", progress=False, log=lambda *_: None)
    after = {p: p.read_bytes() for p in (out / "students").rglob("*") if p.is_file()}
    assert after == before


WORKER_SCRIPT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from minitodi import demo
if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=spawn, initializer=demo._start_worker,
                               initargs=(None, 1, os.getpid()))
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_demo_is_killed(tmp_path):
    """SIGKILL of the demo's process leaves no worker behind (one would otherwise wait forever on a pipe)."""
    script = tmp_path / "demo_parent.py"
    script.write_text(WORKER_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived the demo by 10 s"


def _alive(pid):
    """Whether process ``pid`` exists and is not a zombie waiting for its parent to read its status."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


TWO_DEMOS_SCRIPT = """
import os, sys, time
from pathlib import Path
from minitodi import demo, presets
from minitodi.train import TrainConfig

out, go, trained = (Path(arg) for arg in sys.argv[1:])
presets.MODELS["micro"] = {"n_embd": 16, "n_layer": 1, "n_head": 2}
presets.PRESETS["micro"] = presets.Preset(
    n_train=240, n_valid=16, n_test=16, vocab_size=300, seq_len=48, n_positions=56, teacher="micro",
    student="micro", teacher_train=TrainConfig(steps=8, batch_size=8, eval_every=4),
    student_train=TrainConfig(steps=4, batch_size=8, eval_every=2), seeds=(0,), max_new_tokens=8)
real_fit = demo.fit

def fit(run_dir, *args, **kwargs):  # the teacher's training notes who trains it and waits for the test
    if kwargs.get("label") == "teacher":
        with open(trained, "a") as f:
            f.write(f"{os.getpid()}\\n")
        while not go.exists():
            time.sleep(0.05)
    return real_fit(run_dir, *args, **kwargs)

demo.fit = fit
demo.run(out, preset="micro", loss_names=("fkl",), progress=False, log=lambda line: print(line, flush=True))
"""


def _line(process, seconds=60):
    """The next line ``process`` prints, or a test failure after ``seconds``."""
    ready = select.select([process.stdout], [], [], seconds)[0]
    assert ready, f"no line from pid {process.pid} in {seconds} s"
    return process.stdout.readline()


def test_a_second_demo_waits_for_the_teacher_the_first_trains_and_reuses_it(tmp_path):
    """Two demos on an empty cache: the second says whom it waits for, then reuses the first's teacher."""
    script = tmp_path / "one_demo.py"
    script.write_text(TWO_DEMOS_SCRIPT)
    go = tmp_path / "go"
    trained = tmp_path / "trained"
    env = {**os.environ, "MINITODI_CACHE": str(tmp_path / "cache")}
    demos = []
    try:
        for name in ("first", "second"):
            command = [sys.executable, str(script), str(tmp_path / name), str(go), str(trained)]
            demos.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env))
            if name == "first":  # the first holds the cache entry: its teacher is about to train
                assert _line(demos[0]).startswith("teacher: ")
        first, second = demos
        assert _line(second).startswith(f"waiting for the teacher being trained by pid {first.pid} (")
        go.touch()
        assert [demo.wait(timeout=120) for demo in demos] == [0, 0]
        later = second.stdout.read().splitlines()  # after the wait: the finished teacher, reused
        assert later[0].startswith("teacher: ") and later[0].endswith(" (cached)")
    finally:
        for process in demos:
            process.kill()
            process.wait()
    assert trained.read_text() == f"{first.pid}\n"  # the teacher was trained once, by the first
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("first", "second")]
    assert results[0]["teacher"] == results[1]["teacher"]


HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from minitodi import demo
with demo._cache_entry_lock(Path(sys.argv[1]), print):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_demo_leaves_the_teacher_cache_free(tmp_path):
    """The OS drops the lock of a demo killed with SIGKILL: the next one takes the entry at once."""
    entry = tmp_path / "cache" / "teacher-0123"
    command = [sys.executable, "-c", HOLD_SCRIPT, str(entry)]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert _line(holder) == "held\n"
    finally:
        holder.kill()
        holder.wait()
    said = []
    with demo._cache_entry_lock(entry, said.append):
        assert (tmp_path / "cache" / "teacher-0123.lock").read_text() == str(os.getpid())
    assert said == []  # nothing to wait for


def test_seeds_and_jobs_are_read_as_every_other_option_reads_integers(tmp_path, monkeypatch):
    """1e3 is 1000 for --seeds and --jobs as for --seed or --steps."""
    seen = {}

    def interrupted_run(out, **settings):  # records what the command line passed, then is interrupted
        seen.update(settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted_run)
    argv = ["demo", "--seeds", "1e3", "0", "--jobs", "2e0", "--out", str(tmp_path / "out"), "--quiet"]
    assert exit_status(argv) == 130
    assert (seen["seeds"], seen["jobs"]) == ([1000, 0], 2)


def test_an_empty_out_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """--out '' is refused as for the other commands, not read as the current directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINITODI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("the demo ran"))
    assert exit_status(["demo", "--out", "", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minitodi demo: error: argument --out: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_empty_minitodi_cache_is_the_default_cache(tmp_path, monkeypatch):
    """MINITODI_CACHE='' counts as unset: teachers and lock files never land in the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MINITODI_CACHE", "")
    assert demo.cache_dir() == tmp_path / ".cache" / "minitodi"
    monkeypatch.setenv("MINITODI_CACHE", str(tmp_path / "mine"))
    assert demo.cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("kind, reason", [
    ("file", r"cache is not a directory"),
    ("under a file", r"cache is not a directory"),
    ("read-only", r"cache is not writable"),
    ("under a read-only directory", r"cache is not writable"),
])
def test_an_unusable_cache_is_refused_before_anything_is_written(kind, reason, tmp_path, monkeypatch):
    """The cache is checked before --out is created, and the message names MINITODI_CACHE and why."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINITODI_CACHE", str(cache))
    if kind == "file":
        cache.write_text("not a directory")
    elif kind == "under a file":
        cache.write_text("not a directory")
        monkeypatch.setenv("MINITODI_CACHE", str(cache / "minitodi"))
    elif kind == "read-only":
        cache.mkdir()
        read_only(monkeypatch, cache)
    else:
        cache.mkdir()
        read_only(monkeypatch, cache)
        monkeypatch.setenv("MINITODI_CACHE", str(cache / "minitodi"))
    monkeypatch.setattr(demo, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"cannot use .*cache.* as the teacher cache \(MINITODI_CACHE\): .*"
                       + reason):
        demo.run(tmp_path / "out", preset="quick", loss_names=("fkl",), progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_numpy_integers_are_seeds(tmp_path, monkeypatch):
    _micro_preset(monkeypatch, tmp_path)
    results = demo.run(tmp_path / "out", preset="micro", loss_names=("todi",), seeds=np.arange(2, 4),
                       progress=False, log=lambda *_: None)
    assert results["config"]["seeds"] == [2, 3]
    assert [r["seed"] for r in results["students"]["todi"]["seeds"]] == [2, 3]


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_out_that_cannot_be_created_names_the_option(tmp_path, capsys, where):
    (tmp_path / "file").write_text("mine")
    out = {"under a file": tmp_path / "file" / "out", "in /proc": Path("/proc/no-such-process/out")}[where]
    assert exit_status(["demo", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}: cannot create the directory" in err, err
    assert (tmp_path / "file").read_text() == "mine"


def test_out_that_is_not_writable_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """As root no permission stops a write: the check is what is tested, with os.access saying no."""
    out = tmp_path / "out"
    out.mkdir()
    read_only(monkeypatch, out)
    with pytest.raises(ValueError, match=f"--out {out} is not writable"):
        demo._claim(out)
