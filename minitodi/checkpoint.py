"""Checkpoints in the layout Hugging Face transformers reads: ``model.safetensors`` + ``config.json``.

A checkpoint directory holds::

    config.json                 GPT-2 configuration (``GPT2LMHeadModel.from_pretrained(directory)`` works)
    model.safetensors           the parameters, named as in :mod:`minitodi.model` (the tied head omitted)
    training_state.safetensors  optional: the optimizer's moment arrays, for an exact resume
    training_state.json         optional: step, RNG state, data position and anything else JSON can hold

Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted save leaves either the old file or the new one, never a torn one. The model file and the
training state carry the same random ``save_id``: :func:`load_training_state` refuses a state whose id
differs from the model's (a save interrupted between files). :func:`save_replacing` goes further for
a directory that must never be half old, half new (a run's resumable state): it writes a complete new
directory beside the old one and swaps them with renames; :func:`recover` finishes an interrupted swap.

:func:`load` also reads original GPT-2 checkpoints, whose keys lack the ``transformer.`` prefix and carry
attention-mask buffers (``h.0.attn.bias``), and drops an ``lm_head.weight`` equal to the embedding.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .backend import to_device, to_numpy
from .model import GPTConfig, check_params, param_shapes

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.safetensors"
STATE_JSON = "training_state.json"

_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GPT-2's tanh approximation


def _atomic_write(path, write):
    """Call ``write(tmp_path)``, then rename ``tmp_path`` over ``path`` (atomic on one file system)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def hf_config(config, dtype, extra=None):
    """The ``config.json`` transformers' GPT2Config reads for ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # minitodi trains without dropout
        "tie_word_embeddings": True,
        "dtype": str(np.dtype(dtype)),
        **(extra or {}),
    }


def save(directory, params, config, *, training_state=None, config_extra=None):
    """Write a checkpoint of ``params`` (and, optionally, the training state) into ``directory``.

    Args:
        training_state: None, or a dict with an ``"optimizer"`` entry (the state of
            :func:`minitodi.optim.adamw_init`) and any JSON-serialisable entries (step, RNG state, data
            position, ...).
        config_extra: extra ``config.json`` entries, e.g. ``{"eos_token_id": 0}``.
    Returns the directory as a Path.
    """
    check_params(params, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    if training_state is not None:
        state = dict(training_state)
        optimizer = state.pop("optimizer")
        arrays = {f"{moment}.{name}": np.ascontiguousarray(to_numpy(x))
                  for moment in ("m", "v") for name, x in optimizer[moment].items()}
        _atomic_write(directory / STATE_FILE, lambda tmp: save_file(arrays, str(tmp), {"save_id": save_id}))
        write_json(directory / STATE_JSON, {"save_id": save_id, "optimizer_step": optimizer["step"], **state})
    dtype = next(iter(params.values())).dtype
    write_json(directory / CONFIG_FILE, hf_config(config, dtype, config_extra))
    tensors = {name: np.ascontiguousarray(to_numpy(x)) for name, x in params.items()}
    _atomic_write(directory / MODEL_FILE,
                  lambda tmp: save_file(tensors, str(tmp), {"format": "pt", "save_id": save_id}))
    return directory


def _aside(directory, tag):
    return directory.with_name(f"{directory.name}.{tag}")


def save_replacing(directory, params, config, **kwargs):
    """:func:`save` into ``directory`` as a whole: either the old checkpoint or the new one is there, whole.

    The new checkpoint is written to ``<directory>.new``; then ``directory`` is renamed to
    ``<directory>.old``, ``.new`` to ``directory``, and ``.old`` is removed.
    """
    directory = Path(directory)
    new, old = _aside(directory, "new"), _aside(directory, "old")
    recover(directory)
    shutil.rmtree(new, ignore_errors=True)
    save(new, params, config, **kwargs)
    had_old = directory.exists()
    if had_old:
        os.replace(directory, old)
    os.replace(new, directory)
    if had_old:
        shutil.rmtree(old)
    return directory


def recover(directory):
    """Finish a :func:`save_replacing` that was interrupted: afterwards ``directory`` is the newest whole
    checkpoint there is (or absent if there never was one)."""
    directory = Path(directory)
    new, old = _aside(directory, "new"), _aside(directory, "old")
    if old.exists():
        if directory.exists():  # interrupted after the swap: only the clean-up was left
            shutil.rmtree(old)
        else:  # interrupted between the two renames: the old one is the last whole checkpoint
            os.replace(old, directory)
    shutil.rmtree(new, ignore_errors=True)  # interrupted while writing: a partial new one
    return directory


def _require(path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")


def _read_safetensors(path):
    _require(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read {path}: {err} (the file is truncated, corrupt or in an unsupported "
                         "dtype such as bfloat16)") from err


def _read_metadata(path):
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _read_json(path):
    _require(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def config_from_hf(hf, where="config.json"):
    """A :class:`GPTConfig` from a transformers GPT-2 ``config.json`` dict; unsupported variants are errors."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf['model_type']!r}, only 'gpt2' is supported")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        raise ValueError(f"{where}: activation_function {activation!r} is not GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise ValueError(f"{where}: n_inner = {hf['n_inner']} is not 4 * n_embd")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError(f"{where}: an untied output head is not supported")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", hf.get("n_ctx")),
                         n_embd=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                         layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    except KeyError as err:
        raise ValueError(f"{where}: missing field {err.args[0]!r}") from err


def _canonical(tensors, config, where):
    """Map a state dict's keys to minitodi's names: add ``transformer.``, drop mask buffers and a tied head."""
    shapes = param_shapes(config)
    params = {}
    for key, value in tensors.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name in shapes:
            params[name] = value
        elif name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers: not parameters
        elif name == "lm_head.weight":
            wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
            if wte is None or not np.array_equal(value, wte):
                raise ValueError(f"{where}: lm_head.weight differs from the token embedding (untied head)")
        else:
            raise ValueError(f"{where}: unexpected tensor {key!r}")
    return params


def load(directory, *, dtype=None, device="cpu"):
    """Read ``(params, config)`` from a checkpoint directory (minitodi's or an original GPT-2 one).

    ``dtype``: the parameters' dtype (default: as stored; float16 is widened to float32).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config = config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    path = directory / MODEL_FILE
    if not path.is_file() and (directory / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{path} is missing; only safetensors are read (convert pytorch_model.bin "
                                "with transformers: model.save_pretrained(dir, safe_serialization=True))")
    params = _canonical(_read_safetensors(path), config, str(path))
    stored = next(iter(params.values())).dtype if params else np.dtype(np.float32)
    target = np.dtype(dtype) if dtype is not None else (np.dtype(np.float32) if stored.itemsize < 4 else stored)
    params = {name: to_device(params[name].astype(target), device) for name in param_shapes(config)
              if name in params}
    try:
        check_params(params, config)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} does not match {directory / CONFIG_FILE}: {err.args[0]}") from err
    return params, config


def has_training_state(directory):
    directory = Path(directory)
    return (directory / STATE_FILE).is_file() and (directory / STATE_JSON).is_file()


def load_training_state(directory, *, device="cpu"):
    """The training state saved by :func:`save`: ``{"optimizer": {"step", "m", "v"}, **json_entries}``."""
    directory = Path(directory)
    state = _read_json(directory / STATE_JSON)
    arrays = _read_safetensors(directory / STATE_FILE)
    model_id = _read_metadata(directory / MODEL_FILE).get("save_id")
    ids = {state.get("save_id"), _read_metadata(directory / STATE_FILE).get("save_id"), model_id}
    if len(ids) != 1:
        raise ValueError(f"{directory}: the model and the training state come from different saves "
                         "(a save was interrupted); resume from another checkpoint or start afresh")
    state.pop("save_id")
    optimizer = {"step": state.pop("optimizer_step"), "m": {}, "v": {}}
    for key, value in arrays.items():
        moment, name = key.split(".", 1)
        optimizer[moment][name] = to_device(value, device)
    return {"optimizer": optimizer, **state}
