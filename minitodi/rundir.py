"""A run directory: one writer at a time, atomic state, resume, the JSONL log.

What a training run (:func:`minitodi.train.fit`) keeps in its directory ``out``::

    out/model.safetensors, config.json, tokenizer.json    the best model so far (lowest validation CE) and
                                                           its tokenizer (config.json records its fingerprint)
    out/last/                                              the latest state, with the optimizer: resume
                                                           (replaced as a whole: never half old, half new)
    out/run.json                                           the settings; a resume must match them
    out/metrics.jsonl                                      one JSON object per logged step and evaluation

**One writer.** minitodi writes only into a new or empty directory or one holding its ``run.json``, one
process at a time: an advisory ``flock`` on the directory, which the OS drops when the process dies, so a
second writer is refused and a killed one never blocks. A best model without a resumable state is left
alone unless the run starts again ("restart") or from that model ("best"). A start reads and checks
everything it will use (the state, or the best model: whole, finite, of this shape and tokenizer) before
anything in ``out`` changes; a new start replaces the best model and its tokenizer only at its first
evaluation, both together.

**Resume.** ``out/last`` holds parameters, optimizer moments, step, best validation CE and data position;
:class:`RunState` restores them all, so a resumed run computes exactly the numbers of an uninterrupted
one on the CPU (no dropout, no other randomness). Log lines written after the saved step, by a run
killed before it could save, are dropped on resume. Ctrl-C or SIGTERM (:func:`ctrl_c_flag`) lets the
loop finish its step and save before it stops.
"""

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import checkpoint
from .core import optim
from .core.device import to_numpy
from .core.model import init_params
from .tokenizer import FILENAME as TOKENIZER_FILE
from .tokenizer import Tokenizer

RUN_FILE = "run.json"  # the settings of the run
LOG_FILE = "metrics.jsonl"  # one JSON object per logged step and evaluation
LAST = "last"  # the latest state, to resume from
STARTS = ("resume", "restart", "best")


# ---- one writer ----------------------------------------------------------------------------------
@contextmanager
def claim(out, start):
    """Hold ``out`` for this process alone: created, or empty, or a run of minitodi's.

    Yields whether ``out/last`` is a state to resume (after finishing an interrupted replacement of it).
    Every refusal is a ValueError raised before anything in ``out`` is changed.
    """
    if out.exists() and not out.is_dir():  # mkdir would say only "File exists"
        raise ValueError(f"cannot use {out} as a run directory: it is a file; give a directory")
    if start == "best" and not (out / checkpoint.MODEL_FILE).exists():  # refused before mkdir creates it
        raise ValueError(f"{out} holds no best model to continue from")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    except OSError as err:
        raise ValueError(f"cannot use {out} as a run directory: {err.strerror}") from None
    try:
        _lock(fd, out)
        _check_usable(out, start)
        resumable = False
        if start == "resume":
            resumable = checkpoint.has_training_state(checkpoint.recover(out / LAST))
        _check_start(out, start, resumable)
        yield resumable
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock(fd, out):
    """An exclusive advisory lock on the directory, or a clear error if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"{out} is in use by another minitodi process; wait for it or choose another "
                         "directory") from None


def _check_usable(out, start):
    """Writable, and new, empty or a run of minitodi's (never a directory of the user's own files)."""
    if not os.access(out, os.W_OK):
        raise ValueError(f"cannot use {out} as a run directory: it is not writable")
    if any(out.iterdir()) and not is_run(out / RUN_FILE):
        raise ValueError(f"{out} holds files that are not a minitodi run (no run.json of minitodi): "
                         "choose a new or empty directory")
    _check_state_replaceable(out)
    _check_log_replaceable(out)


def _check_log_replaceable(out):
    """``out/metrics.jsonl`` must be absent or a file the run can replace, checked before ``last/`` goes.

    A new start removes the old state and then the log; a resume rewrites the log. A directory (or another
    thing that is no file) in the log's place would be found only after ``last/`` was deleted.
    """
    log = out / LOG_FILE
    if log.exists() and not log.is_file():  # exists() and is_file() follow a link to what it names
        raise ValueError(f"cannot use {out} as a run directory: {log} is not a file, and the run replaces "
                         "its log there; move it away and run again; nothing was changed")


def _check_state_replaceable(out):
    """``out/last`` (and what an interrupted replacement left beside it) must be a directory files can leave.

    A run replaces its state as a whole and removes the old one (:func:`minitodi.checkpoint.save_replacing`):
    a read-only ``last/`` would be found only after the training, at the first save, and its ``last.old/``
    would stop every later resume the same way.
    """
    for path in (out / LAST, out / f"{LAST}.old", out / f"{LAST}.new"):
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cannot use {out} as a run directory: {path} is not writable, and the run "
                             f"replaces it; make it writable (chmod u+w {path}) and run again")


def check_best_model(out, model_config, tokenizer_fingerprint):
    """A clear error, before anything in ``out`` changes, when its best model is not this run's to continue.

    It must have this run's shape, and have been trained with this run's tokenizer (the fingerprint its
    config.json records, else that of the tokenizer.json beside it): a new tokenizer, trained on other
    data, would give the old weights ids that mean other text.
    """
    best_config = checkpoint.load_config(out)
    if best_config != model_config:
        differences = _differences(dataclasses.asdict(best_config), dataclasses.asdict(model_config))
        raise ValueError(f"{out} holds a best model of another shape ({type(best_config).__name__}; "
                         f"{differences}): --from-best needs this run's model; nothing was changed")
    tokenizer_file = out / TOKENIZER_FILE
    if tokenizer_file.is_file():
        # a model file or config.json copied in from another run: no --tokenizer mends that, so it is said
        # as generate says it (the files come from different runs), not as a tokenizer to pass
        try:
            Tokenizer.load_for_model(out)
        except ValueError as err:
            reason = f"{err}; --from-best needs the best model's own files: nothing was changed"
            raise ValueError(reason) from None
    recorded = set(checkpoint.recorded_tokenizers(out).values())
    if not recorded and tokenizer_file.is_file():  # a best model saved before fingerprints were recorded
        recorded = {Tokenizer.load(tokenizer_file).fingerprint()}
    if recorded - {tokenizer_fingerprint}:
        raise ValueError(f"the best model in {out} was trained with the tokenizer {tokenizer_file}, and "
                         "this run's tokenizer is another (trained on other data or with another vocabulary "
                         "size); "
                         f"--from-best keeps the model's tokenizer: pass --tokenizer {tokenizer_file}; "
                         "nothing was changed")


def _check_start(out, start, resumable):
    """A best model is never replaced by a resume that has no state to resume from.

    (--from-best without a best model is refused by :func:`claim` before it creates ``out``.)
    """
    has_best_model = (out / checkpoint.MODEL_FILE).exists()
    if start == "resume" and not resumable and has_best_model:
        raise ValueError(f"{out} holds a best model but no resumable state ({out / LAST} is missing or "
                         "incomplete); nothing was changed: --restart starts over (replacing the best "
                         "model), --from-best continues from the best model")


def is_run(run_file):
    """Whether ``run_file`` is a run.json that minitodi wrote (its train, model and tokenizer settings)."""
    try:
        settings = json.loads(Path(run_file).read_text())
        return {"train", "model", "tokenizer"} <= settings.keys()
    except (OSError, ValueError, AttributeError):
        return False


# ---- the settings --------------------------------------------------------------------------------
RESTART_HINT = "choose another output directory, or --restart / --from-best to replace that run"


def check_same_settings(out, settings, parts=None, hint=RESTART_HINT):
    """A clear error, naming what differs, when the run in ``out`` was made with other settings.

    ``parts``: compare only these top-level entries (None: all of them); ``hint``: what the user can do.
    """
    run_file = Path(out) / RUN_FILE
    as_saved = json.loads(json.dumps(settings))  # tuples become lists, as they are in the file
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{run_file} cannot be read ({err}); {hint}") from None
    if parts is not None:
        saved = {key: saved.get(key) for key in parts}
        as_saved = {key: as_saved.get(key) for key in parts}
    if saved != as_saved:
        raise ValueError(f"{out} holds a run with other settings ({run_file}: "
                         f"{_differences(saved, as_saved)}); {hint}")


def _differences(old, new, limit=4):
    """What differs between two settings dicts, as "path: old -> new" phrases (the first ``limit``)."""
    old_flat = _flatten(old)
    new_flat = _flatten(new)
    keys = sorted(old_flat.keys() | new_flat.keys())
    changed = [key for key in keys if old_flat.get(key) != new_flat.get(key)]
    phrases = []
    for key in changed[:limit]:
        phrases.append(f"{key}: {_short(old_flat.get(key))} -> {_short(new_flat.get(key))}")
    if len(changed) > limit:
        phrases.append(f"and {len(changed) - limit} more")
    return "; ".join(phrases)


def _flatten(settings, prefix=""):
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value):
    """A setting's value for a one-line message: its JSON, cut at 40 characters; (none) when absent."""
    if value is None:
        return "(none)"
    text = json.dumps(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return text


def digest(arrays):
    """A short SHA-256 of arrays' shapes, dtypes and bytes, in order: the identity of weights or data."""
    h = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(to_numpy(array))
        h.update(f"{array.shape}{array.dtype}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def settings_id(settings):
    """A short SHA-256 of a run's settings (as run.json holds them): the identity of the run."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_settings(out, settings):
    """Write the run's settings to ``out/run.json`` (atomically)."""
    checkpoint.write_json(out / RUN_FILE, settings)


# ---- the log -------------------------------------------------------------------------------------
def append_log(path, record):
    """One JSON object as one line at the end of the log."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        if err.filename is not None or err.errno is None:  # it names its file, or it is no system error
            raise
        # a full disk's "[Errno 28] No space left on device" names no file: say which
        raise OSError(err.errno, f"{err.strerror} (appending to {path})") from err


def read_log(path):
    """Every record of the log, in order; a torn last line is dropped (see :func:`_parse_log`)."""
    return _parse_log(Path(path))


def truncate_log(path, step):
    """Drop log lines written after ``step`` (by a run killed before it could save), and a torn last line.

    The log is rewritten atomically (cut short, the write leaves the old log), and only if a line goes.
    """
    if path.exists():
        kept = [record for record in _parse_log(path) if record["step"] <= step]
        checkpoint.write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def _parse_log(path):
    """The log's records, each an object with its integer step; a torn last line is dropped with a warning.

    A last line cut short (the disk filled, or the process was killed mid-write) is what a crash leaves;
    an unreadable line anywhere else is an error naming the file and the line. A missing log (deleted by
    hand) has no records.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (at byte {err.start}): not a log of minitodi's") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                print(f"warning: {path}: dropped its torn last line ({err.msg})", file=sys.stderr)
                break
            raise ValueError(f"{path}, line {number}: not a log record ({err.msg})") from None
        if not _is_record(record):
            raise ValueError(f"{path}, line {number}: not a log record (an object with an integer step)")
        records.append(record)
    return records


def _is_record(record):
    """Whether ``record`` is a JSON object with an integer ``step``, as every line minitodi logs is."""
    if not isinstance(record, dict):
        return False
    step = record.get("step")
    return isinstance(step, int) and not isinstance(step, bool)


# ---- the state of a run --------------------------------------------------------------------------
class RunState:
    """The live state of a run directory: parameters, optimizer, step, best model, data position.

    From ``out/last`` when ``start`` is "resume" and there is a state; else at step 0, from
    ``init_params`` or, for ``start`` "best", from the best model in ``out`` (whose validation CE, given
    by ``valid_ce(params)``, is then the one to beat). Making one only reads: a damaged state or best
    model is refused before anything in ``out`` changes, and :meth:`begin` then makes ``out`` this run's.
    ``settings`` (run.json's) give the run its id, saved with every state: a state copied from another
    run is refused.
    """

    def __init__(self, out, model_config, tcfg, batches, start, device, valid_ce, settings):
        self.out = out
        self.config = model_config
        self.run_id = settings_id(settings)  # which run a state in out/last belongs to
        self.batches = batches
        self.last = out / LAST
        self.log = out / LOG_FILE
        self.resuming = start == "resume" and checkpoint.has_training_state(self.last)  # recovered by claim()
        if self.resuming:
            self._restore(tcfg.dtype, device)
            return
        self.step = 0
        self.saved = None  # the step out/last holds (None: no state saved yet)
        self.best = {"valid_ce": math.inf, "step": None}
        if start == "best":
            self._load_best(tcfg.dtype, device, valid_ce)
        else:
            self.params = init_params(model_config, tcfg.seed, dtype=np.dtype(tcfg.dtype), device=device)
        self.opt = optim.adamw_init(self.params)

    def begin(self):
        """Make ``out`` this run's: a resume drops log lines after its step, a new start the old state, log.

        The best model and its tokenizer stay until this run's first evaluation replaces them, together:
        a new start stopped before then leaves a best model and the tokenizer it was trained with.
        """
        if self.resuming:
            truncate_log(self.log, self.step)
            return
        if self.last.is_dir():
            shutil.rmtree(self.last)
        else:  # a file where the state belongs (put there by hand) is no state either
            self.last.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)

    def _load_best(self, dtype, device, valid_ce):
        """The best model in ``out`` (checked whole and finite by the loader) and its validation CE."""
        self.params, _ = checkpoint.load(self.out, dtype=dtype, device=device)
        score = valid_ce(self.params)
        if not math.isfinite(score):
            raise ValueError(f"the best model in {self.out} has a validation loss of {score}: there is "
                             "nothing to continue from; nothing was changed")
        self.best = {"valid_ce": score, "step": 0}

    def _restore(self, dtype, device):
        """The state in ``out/last``, every part checked against this run before it is used."""
        self.params, config = checkpoint.load(self.last, dtype=dtype, device=device)
        if config != self.config:
            differences = _differences(dataclasses.asdict(config), dataclasses.asdict(self.config))
            raise ValueError(f"{self.last / checkpoint.CONFIG_FILE} is a model of another shape than "
                             f"{self.out / RUN_FILE} records ({differences}); --restart or --from-best")
        state = checkpoint.load_training_state(self.last, device=device)
        _check_moments(state["optimizer"], self.params, self.last / checkpoint.STATE_FILE)
        where = self.last / checkpoint.STATE_JSON
        if state.get("run") not in (None, self.run_id):  # None: a state saved before runs had an id
            raise ValueError(f"{self.last} holds the state of another run than {self.out / RUN_FILE} "
                             "describes (copied from elsewhere?); --restart or --from-best")
        self.step = _entry(state, "step", where, _is_count)
        self.best = _entry(state, "best", where, _is_best)
        data = _entry(state, "data", where, lambda v: isinstance(v, dict))
        try:
            self.batches.restore(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: data {json.dumps(data)[:60]} is not this run's data position "
                             f"({err})") from None
        self.opt = state["optimizer"]
        self.saved = self.step

    def save_last(self):
        """Replace ``out/last`` with the state now (as a whole: never half old, half new)."""
        self.saved = self.step
        training_state = {"optimizer": self.opt, "step": self.step, "best": self.best,
                          "data": self.batches.state(), "run": self.run_id}
        checkpoint.save_replacing(self.last, self.params, self.config, training_state=training_state)

    def save_best(self, valid_ce, tokenizer):
        """Record a new best validation CE and write the model, with its tokenizer, as the run's best.

        config.json records the tokenizer's fingerprint, which every load of the model checks
        (:meth:`minitodi.tokenizer.Tokenizer.load_for_model`): a write cut short between the files is
        found there, not used.
        """
        self.best.update(valid_ce=valid_ce, step=self.step)
        extra = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
                 checkpoint.TOKENIZER_KEY: tokenizer.fingerprint()}
        tokenizer.save(self.out)
        checkpoint.save(self.out, self.params, self.config, config_extra=extra)

    def params_finite(self):
        """Whether every parameter is finite (only a finite state is ever saved)."""
        return all(np.isfinite(to_numpy(p)).all() for p in self.params.values())


def _entry(state, key, where, valid):
    """``state[key]`` if ``valid`` accepts it, else a clear error naming the file and the entry."""
    value = state.get(key)
    if not valid(value):
        raise ValueError(f"{where}: {key} is {json.dumps(value)[:60]}, not a state minitodi saved; "
                         "--restart or --from-best")
    return value


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_best(value):
    """``{"valid_ce": a number, "step": a count or None}``, as :meth:`RunState.save_best` keeps it."""
    if not isinstance(value, dict):
        return False
    ce = value.get("valid_ce")
    step = value.get("step")
    ce_ok = isinstance(ce, (int, float)) and not isinstance(ce, bool) and not math.isnan(ce)
    return ce_ok and (step is None or _is_count(step))


def _check_moments(optimizer, params, where):
    """AdamW's moments must have exactly the parameters' names and shapes (else a step fails midway)."""
    for moment in ("m", "v"):
        arrays = optimizer[moment]
        if arrays.keys() != params.keys():
            missing = sorted(params.keys() - arrays.keys())[:3]
            extra = sorted(arrays.keys() - params.keys())[:3]
            raise ValueError(f"{where}: its moments {moment} do not match the model's parameters "
                             f"(missing {missing}, unexpected {extra})")
        for name, value in arrays.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"{where}: {moment}.{name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(params[name].shape)}")


# ---- Ctrl-C and SIGTERM --------------------------------------------------------------------------
@contextmanager
def ctrl_c_flag():
    """A list that Ctrl-C (SIGINT) or SIGTERM makes non-empty, for the loop to check between steps.

    SIGTERM, what ``kill`` and job schedulers send, is a request to stop like Ctrl-C: the step under way
    is finished and the state saved. A second signal stops at once (KeyboardInterrupt). Outside the main
    thread the signals are left alone (Python delivers signals to the main thread only, and only it may
    set a handler).
    """
    pressed = []

    def handle(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handle)
    try:
        yield pressed
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(signum, handler)
