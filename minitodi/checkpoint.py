"""Checkpoints in the layout Hugging Face transformers reads: ``model.safetensors`` + ``config.json``.

A checkpoint directory holds::

    config.json                 GPT-2 or Llama configuration (``GPT2LMHeadModel`` or ``LlamaForCausalLM``
                                ``.from_pretrained(directory)`` works)
    model.safetensors           the parameters, named as in :mod:`minitodi.core.model` (a tied head omitted)
    training_state.safetensors  optional: the optimizer's moment arrays, for an exact resume
    training_state.json         optional: step, RNG state, data position and anything else JSON can hold

Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted save leaves either the old file or the new one, never a torn one. The model file and the
training state carry the same random ``save_id``: :func:`load_training_state` refuses a state whose id
differs from the model's (a save interrupted between files). :func:`save_replacing` goes further for
a directory that must never be half old, half new (a run's resumable state): it writes a complete new
directory beside the old one and swaps them with renames; :func:`recover` finishes an interrupted swap.

:func:`load` also reads original GPT-2 checkpoints, whose keys lack the ``transformer.`` prefix and carry
attention-mask buffers (``h.0.attn.bias``), drops an ``lm_head.weight`` equal to a tied embedding, and
reads weights sharded as ``model.safetensors.index.json`` lists them. A config.json asking for anything
minitodi does not compute (another activation, RoPE scaling, a sliding window, ...) is an error naming
the field, never a silently different model.
"""

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .core.device import to_device, to_numpy
from .core.model import GPTConfig, LlamaConfig, check_params, param_shapes

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded weights: {"weight_map": {name: shard file}}
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.safetensors"
STATE_JSON = "training_state.json"


def _atomic_write(path, write):
    """Call ``write(tmp_path)``, then rename ``tmp_path`` over ``path`` (atomic on one file system)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is not None or err.errno is None:  # it names its file, or it is no system error
            raise
        # a full disk's "[Errno 28] No space left on device" names no file: say which
        raise OSError(err.errno, f"{err.strerror} (writing {path})") from err
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def hf_config(config, dtype, extra=None):
    """The ``config.json`` transformers reads for ``config`` (GPT-2 or Llama), plus ``extra`` entries."""
    return {**FORMATS[config.model_type].to_hf(config), "dtype": str(np.dtype(dtype)), **(extra or {})}


def _gpt2_hf_config(config):
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **asdict(config),  # vocab_size, n_positions, n_embd, n_layer, n_head, layer_norm_epsilon
        "n_inner": None,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # minitodi trains without dropout
    }


def _llama_hf_config(config):
    hs = config.hidden_size // config.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(config),
        "head_dim": hs,
        "hidden_act": "silu",
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }


def save(directory, params, config, *, training_state=None, config_extra=None):
    """Write a checkpoint of ``params`` (and, optionally, the training state) into ``directory``.

    Args:
        directory: the checkpoint directory (a str or Path); created if missing, files in it replaced.
        params: the parameters, a dict of arrays (NumPy or CuPy) named as in :mod:`minitodi.core.model`;
            checked against ``config`` before anything is written.
        config: the model's GPTConfig or LlamaConfig, written as ``config.json``.
        training_state: None, or a dict with an ``"optimizer"`` entry (the state of
            :func:`minitodi.core.optim.adamw_init`) and any JSON-serialisable entries (step, RNG state, data
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
        arrays = {}
        for moment in ("m", "v"):
            for name, x in optimizer[moment].items():
                arrays[f"{moment}.{name}"] = np.ascontiguousarray(to_numpy(x))
        _atomic_write(directory / STATE_FILE, lambda tmp: save_file(arrays, str(tmp), {"save_id": save_id}))
        write_json(directory / STATE_JSON, {"save_id": save_id, "optimizer_step": optimizer["step"], **state})
    dtype = next(iter(params.values())).dtype
    write_json(directory / CONFIG_FILE, hf_config(config, dtype, config_extra))
    tensors = {name: np.ascontiguousarray(to_numpy(x)) for name, x in params.items()}
    _atomic_write(directory / MODEL_FILE,
                  lambda tmp: save_file(tensors, str(tmp), {"format": "pt", "save_id": save_id}))
    return directory


def _aside(directory, tag):
    """The sibling ``<directory>.<tag>`` that :func:`save_replacing` writes to or moves the old one to."""
    return directory.with_name(f"{directory.name}.{tag}")


def save_replacing(directory, params, config, **kwargs):
    """:func:`save` into ``directory`` as a whole: either the old checkpoint or the new one is there, whole.

    The new checkpoint is written to ``<directory>.new``; then ``directory`` is renamed to
    ``<directory>.old``, ``.new`` to ``directory``, and ``.old`` is removed.
    """
    directory = Path(directory)
    new = _aside(directory, "new")
    old = _aside(directory, "old")
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
    """Finish a :func:`save_replacing` that was interrupted.

    Afterwards ``directory`` is the newest whole checkpoint there is (or absent if there never was one).
    """
    directory = Path(directory)
    new = _aside(directory, "new")
    old = _aside(directory, "old")
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
    """The config of a transformers ``config.json`` dict (``model_type`` "gpt2", the default, or "llama")."""
    model_type = hf.get("model_type", "gpt2")
    if model_type not in FORMATS:
        raise ValueError(f"{where}: model_type is {model_type!r}, minitodi reads {sorted(FORMATS)}")
    return FORMATS[model_type].from_hf(hf, where)


# config.json fields whose other values minitodi's GPT-2 does not compute (absent means the first value):
# transformers would load such a checkpoint and compute other logits than minitodi does.
_GPT2_ONLY = {
    "scale_attn_weights": (True,),  # scores divided by sqrt(head size)
    "scale_attn_by_inverse_layer_idx": (False,),  # and not also by the layer's index + 1
}


def _gpt2_config_from_hf(hf, where):
    for field, supported in _GPT2_ONLY.items():
        if hf.get(field, supported[0]) not in supported:
            raise ValueError(f"{where}: {field} = {hf[field]!r} is not implemented (only {supported[0]!r})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):  # both are GPT-2's tanh approximation
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


# config.json fields whose other values minitodi's Llama does not compute (absent means the first value)
_LLAMA_ONLY = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
    "sliding_window": (None,),
    "use_sliding_window": (False,),
    "rope_scaling": (None, {"rope_type": "default"}),
}
_LLAMA_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)


def _llama_config_from_hf(hf, where):
    for field, supported in _LLAMA_ONLY.items():
        if hf.get(field, supported[0]) not in supported:
            raise ValueError(f"{where}: {field} = {hf[field]!r} is not implemented (only {supported[0]!r})")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type = {rope['rope_type']!r} is not implemented")
    for name in _LLAMA_REQUIRED:
        if hf.get(name) is None:
            raise ValueError(f"{where}: missing field {name!r}")
    fields = {name: hf[name] for name in LlamaConfig.__dataclass_fields__ if hf.get(name) is not None}
    fields.setdefault("num_key_value_heads", hf["num_attention_heads"])  # transformers' default: no grouping
    fields["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    config = LlamaConfig(**fields)
    hs = config.hidden_size // config.num_attention_heads
    if hf.get("head_dim") not in (None, hs):
        raise ValueError(f"{where}: head_dim = {hf['head_dim']} is not implemented "
                         "(only hidden_size / heads)")
    return config


@dataclass(frozen=True)
class Format:
    """How one model type is stored: its config.json both ways, and the state dict's extras."""
    to_hf: Callable  # config -> config.json dict (without the dtype)
    from_hf: Callable  # (config.json dict, where) -> config
    prefix: str  # added to keys that lack it (original GPT-2 files)
    embedding: str  # the token embedding, which a tied lm_head.weight must equal
    buffers: tuple  # suffixes of stored buffers that are not parameters


FORMATS = {
    "gpt2": Format(_gpt2_hf_config, _gpt2_config_from_hf, "transformer.", "transformer.wte.weight",
                   (".attn.bias", ".attn.masked_bias")),  # GPT-2's causal-mask buffers
    "llama": Format(_llama_hf_config, _llama_config_from_hf, "model.", "model.embed_tokens.weight",
                    (".rotary_emb.inv_freq",)),  # older transformers saved RoPE's frequencies
}


def _canonical(tensors, config, where):
    """Map a state dict's keys to minitodi's names: add a missing prefix, drop buffers and a tied head."""
    fmt = FORMATS[config.model_type]
    shapes = param_shapes(config)
    prefixed = {}
    for key, value in tensors.items():
        if not key.startswith((fmt.prefix, "lm_head.")):  # e.g. an original GPT-2 file's "h.0.attn.bias"
            key = fmt.prefix + key
        prefixed[key] = value
    params = {}
    for name, value in prefixed.items():
        if name in shapes:
            params[name] = value
        elif name.endswith(fmt.buffers):
            continue
        elif name == "lm_head.weight":
            if not np.array_equal(value, prefixed.get(fmt.embedding)):
                raise ValueError(f"{where}: lm_head.weight differs from the token embedding (untied head)")
        else:
            raise ValueError(f"{where}: unexpected tensor {name!r}")
    return params


def _read_weights(directory):
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    if (directory / MODEL_FILE).is_file() or not (directory / INDEX_FILE).is_file():
        return _read_safetensors(directory / MODEL_FILE)
    weight_map = _read_json(directory / INDEX_FILE).get("weight_map", {})
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_read_safetensors(directory / shard))
    return tensors


def load_config(directory):
    """The model config of a checkpoint directory's config.json, without reading its weights."""
    directory = Path(directory)
    return config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))


def load(directory, *, dtype=None, device="cpu"):
    """Read ``(params, config)`` from a checkpoint directory.

    The directory is minitodi's, or a transformers GPT-2 or Llama one. ``dtype``: the parameters' dtype
    (default: as stored; float16 is widened to float32).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config = load_config(directory)
    path = directory / MODEL_FILE
    if not path.is_file() and (directory / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{path} is missing; only safetensors are read (convert pytorch_model.bin "
                                "with transformers: model.save_pretrained(dir, safe_serialization=True))")
    params = _canonical(_read_weights(directory), config, str(path))
    target = _load_dtype(params, dtype)
    params = {name: to_device(params[name].astype(target), device)
              for name in param_shapes(config) if name in params}
    try:
        check_params(params, config)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} does not match {directory / CONFIG_FILE}: {err.args[0]}") from err
    return params, config


def _load_dtype(params, dtype):
    """The parameters' dtype in :func:`load`: ``dtype`` if given, else as stored but at least float32."""
    if dtype is not None:
        return np.dtype(dtype)
    stored = next(iter(params.values())).dtype if params else np.dtype(np.float32)
    if stored.itemsize < 4:  # float16 is widened
        return np.dtype(np.float32)
    return stored


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
