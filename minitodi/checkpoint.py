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
reads weights sharded as ``model.safetensors.index.json`` lists them (shards inside the directory only).
A config.json asking for anything minitodi does not compute (another activation, RoPE scaling, a sliding
window, ...) or holding a field of the wrong JSON type is an error naming the field, never a silently
different model; its number of layers is checked against the weights' headers before anything is
allocated, and a parameter holding NaN or infinity is refused. A best model saved by a training run
records its tokenizer's fingerprint (:func:`recorded_tokenizers`), so a tokenizer.json from another run
is never used with it unnoticed.
"""

import json
import math
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

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
# the fingerprint of the model's tokenizer, in config.json and the model file (see recorded_tokenizers)
TOKENIZER_KEY = "minitodi_tokenizer_sha256"


def _atomic_write(path, write):
    """Call ``write(tmp_path)``, then rename ``tmp_path`` over ``path`` (atomic on one file system).

    A failed write (a full disk, a file-size limit) is an OSError naming ``path``, and leaves ``path`` as it
    was. The file gets the mode a plain ``open`` gives (0644 under the usual umask 022), which
    safetensors, writing 0600, would not: the temporary file is created with ``open`` first, its mode read
    back and set again after ``write`` (no process-wide umask is touched).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb"):
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except SafetensorError as err:  # safetensors reports its I/O errors as its own kind, naming no file
        raise OSError(f"cannot write {path}: {err}") from None
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
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically; a file already holding exactly that is left alone."""
    path = Path(path)
    content = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == content:
        return
    _atomic_write(path, lambda tmp: tmp.write_bytes(content))


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
    metadata = {"format": "pt", "save_id": save_id}
    tokenizer = (config_extra or {}).get(TOKENIZER_KEY)
    if tokenizer is not None:  # the model file names its tokenizer too (see recorded_tokenizers)
        metadata[TOKENIZER_KEY] = tokenizer
    _atomic_write(directory / MODEL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata))
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
    try:
        save(new, params, config, **kwargs)
    except BaseException:  # a full disk, say: the partial new one goes, the old one stays as it was
        shutil.rmtree(new, ignore_errors=True)
        raise
    had_old = directory.exists()
    if had_old:
        os.replace(directory, old)
    os.replace(new, directory)
    if had_old:
        _remove_tree(old)
    return directory


def _remove_tree(directory):
    """shutil.rmtree, its error naming the file by its full path (rmtree names it relative to its directory).

    A checkpoint directory is flat, so the name is the file's in ``directory``.
    """
    try:
        shutil.rmtree(directory)
    except OSError as err:
        where = directory
        if err.filename:
            where = directory / err.filename
        raise OSError(f"cannot remove {where}: {err.strerror}; the new checkpoint is in place, remove "
                      f"{directory} to go on") from None


def recover(directory):
    """Finish a :func:`save_replacing` that was interrupted.

    Afterwards ``directory`` is the newest whole checkpoint there is (or absent if there never was one).
    """
    directory = Path(directory)
    new = _aside(directory, "new")
    old = _aside(directory, "old")
    if old.exists():
        if directory.exists():  # interrupted after the swap: only the clean-up was left
            _remove_tree(old)
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
    """The JSON object in ``path``: a clear error naming the file when it is not UTF-8, JSON or an object."""
    _require(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (a JSON file was expected)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object expected")
    return obj


def config_from_hf(hf, where="config.json"):
    """The config of a transformers ``config.json`` dict (``model_type`` "gpt2", the default, or "llama")."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} holds a JSON {type(hf).__name__}, not an object")
    model_type = hf.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in FORMATS:
        raise ValueError(f"{where}: model_type is {model_type!r}, minitodi reads {sorted(FORMATS)}")
    fmt = FORMATS[model_type]
    _check_types(hf, fmt.field_types, where)
    return fmt.from_hf(hf, where)


def _check_types(hf, field_types, where):
    """A clear error naming the field when a config.json entry has the wrong JSON type.

    ``field_types``: {field: "int" | "number" | "bool" | "object"}; an absent or null field is left to the
    format's defaults. JSON's true and false are no numbers here (Python would take true for 1).
    """
    for field, kind in field_types.items():
        value = hf.get(field)
        if value is None:
            continue
        is_bool = isinstance(value, bool)
        if kind == "int":
            ok = isinstance(value, int) and not is_bool and value >= 1
            wanted = "a positive integer"
        elif kind == "number":
            ok = isinstance(value, (int, float)) and not is_bool and math.isfinite(value) and value > 0
            wanted = "a finite number > 0"
        elif kind == "bool":
            ok = is_bool
            wanted = "true or false"
        else:
            ok = isinstance(value, dict)
            wanted = "a JSON object"
        if not ok:
            raise ValueError(f"{where}: {field} is {json.dumps(value)[:40]}, expected {wanted}")


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
    for name in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if hf.get(name) is None:
            raise ValueError(f"{where}: missing field {name!r}")
    n_positions = hf.get("n_positions", hf.get("n_ctx"))
    if n_positions is None:
        raise ValueError(f"{where}: missing field 'n_positions'")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], n_positions=n_positions, n_embd=hf["n_embd"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"],
                         layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    except ValueError as err:  # sizes that do not fit together, e.g. n_embd not divisible by n_head
        raise ValueError(f"{where}: {err}") from None


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
    _check_types(rope, {"rope_theta": "number"}, f"{where}: rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type = {rope['rope_type']!r} is not implemented")
    for name in _LLAMA_REQUIRED:
        if hf.get(name) is None:
            raise ValueError(f"{where}: missing field {name!r}")
    fields = {name: hf[name] for name in LlamaConfig.__dataclass_fields__ if hf.get(name) is not None}
    fields.setdefault("num_key_value_heads", hf["num_attention_heads"])  # transformers' default: no grouping
    fields["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        config = LlamaConfig(**fields)
    except ValueError as err:  # sizes that do not fit together, e.g. heads that do not divide the width
        raise ValueError(f"{where}: {err}") from None
    hs = config.hidden_size // config.num_attention_heads
    if hf.get("head_dim") not in (None, hs):
        raise ValueError(f"{where}: head_dim = {hf['head_dim']} is not implemented "
                         "(only hidden_size / heads)")
    return config


_GPT2_TYPES = {
    "vocab_size": "int", "n_positions": "int", "n_ctx": "int", "n_embd": "int", "n_layer": "int",
    "n_head": "int", "n_inner": "int", "layer_norm_epsilon": "number", "tie_word_embeddings": "bool",
}
_LLAMA_TYPES = {
    "vocab_size": "int", "hidden_size": "int", "intermediate_size": "int", "num_hidden_layers": "int",
    "num_attention_heads": "int", "num_key_value_heads": "int", "max_position_embeddings": "int",
    "head_dim": "int", "rms_norm_eps": "number", "rope_theta": "number", "attention_bias": "bool",
    "tie_word_embeddings": "bool", "rope_parameters": "object",
}


@dataclass(frozen=True)
class Format:
    """How one model type is stored: its config.json both ways, and the state dict's extras."""
    to_hf: Callable  # config -> config.json dict (without the dtype)
    from_hf: Callable  # (config.json dict, where) -> config
    prefix: str  # added to keys that lack it (original GPT-2 files)
    embedding: str  # the token embedding, which a tied lm_head.weight must equal
    buffers: tuple  # suffixes of stored buffers that are not parameters
    field_types: dict  # config.json's fields and their JSON types (see _check_types)
    layers_field: str  # config.json's number of layers


FORMATS = {
    "gpt2": Format(_gpt2_hf_config, _gpt2_config_from_hf, "transformer.", "transformer.wte.weight",
                   (".attn.bias", ".attn.masked_bias"),  # GPT-2's causal-mask buffers
                   _GPT2_TYPES, "n_layer"),
    "llama": Format(_llama_hf_config, _llama_config_from_hf, "model.", "model.embed_tokens.weight",
                    (".rotary_emb.inv_freq",),  # older transformers saved RoPE's frequencies
                    _LLAMA_TYPES, "num_hidden_layers"),
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


def _weight_files(directory):
    """model.safetensors, or the shards that model.safetensors.index.json lists, each inside ``directory``.

    A shard named by an absolute path or one through ``..`` is refused: an index file must not make
    minitodi read files outside the checkpoint. (Symbolic links inside it, as in Hugging Face's cache,
    are followed.)
    """
    if (directory / MODEL_FILE).is_file() or not (directory / INDEX_FILE).is_file():
        _require(directory / MODEL_FILE)
        return [directory / MODEL_FILE]
    index = directory / INDEX_FILE
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: weight_map is {json.dumps(weight_map)[:40]}, expected an object "
                         "mapping tensor names to shard files")
    shards = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.strip():
            raise ValueError(f"{index}: weight_map[{name!r}] is {json.dumps(shard)[:40]}, expected a "
                             "file name")
        relative = PurePosixPath(shard)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{index}: weight_map[{name!r}] is {shard!r}, a file outside {directory}; "
                             "shards must lie in the checkpoint directory")
        shards.add(shard)
    files = [directory / shard for shard in sorted(shards)]
    for path in files:
        _require(path)
    return files


def _read_header(path):
    """{tensor name: shape} of a safetensors file, from its header alone (no tensor is read).

    safetensors checks that the header's offsets and byte sizes agree with the dtypes, shapes and the
    file's length, so a truncated or corrupt file fails here.
    """
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = f.keys()  # a list (the handle itself is not iterable)
            return {name: tuple(f.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read {path}: {err} (the file is truncated, corrupt or in an unsupported "
                         "dtype such as bfloat16)") from err


# a layer's index in a tensor's name: transformer.h.3.attn..., h.3.attn... (original GPT-2), model.layers.3...
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


def _check_layer_count(header, config, config_path, weights_path):
    """config.json's number of layers against the layers the weights' headers hold.

    Run before anything lists the config's parameters (:func:`param_shapes` makes a dozen names per
    layer): a config.json asking for a billion layers is refused here, in a line, not after filling memory.
    """
    found = set()
    for name in header:
        match = _LAYER_INDEX.search(name)
        if match is not None:
            found.add(int(match.group(1)))
    if config.n_layer != len(found):
        field = FORMATS[config.model_type].layers_field
        raise ValueError(f"{config_path}: {field} = {config.n_layer}, but {weights_path} holds {len(found)} "
                         "layers: the two files are not one model's")


def _check_finite(params, path):
    """A clear error when a parameter holds NaN or infinity: no training run saves such a model."""
    for name, value in params.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values; the file is damaged or not "
                             "a trained model's")


def load_config(directory):
    """The model config of a checkpoint directory's config.json, without reading its weights."""
    directory = Path(directory)
    return config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))


def recorded_tokenizers(directory):
    """{file: fingerprint} of the tokenizer a checkpoint's config.json and model file record, where they do.

    minitodi records it in both with every best model it saves (``TOKENIZER_KEY``): a model and a
    tokenizer.json from different runs then cannot be used together unnoticed, nor a model file copied
    in from another run. A transformers checkpoint records none.
    """
    directory = Path(directory)
    recorded = {directory / CONFIG_FILE: _read_json(directory / CONFIG_FILE).get(TOKENIZER_KEY)}
    if (directory / MODEL_FILE).is_file():
        recorded[directory / MODEL_FILE] = _read_metadata(directory / MODEL_FILE).get(TOKENIZER_KEY)
    for path, value in recorded.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: {TOKENIZER_KEY} is {json.dumps(value)[:40]}, expected a hex digest")
    return {path: value for path, value in recorded.items() if value is not None}


def check_directory(directory):
    """A clear error unless ``directory`` is a directory (what it holds is :func:`load`'s to check)."""
    directory = Path(directory)
    if directory.is_file():  # a model file given for its directory, say
        raise NotADirectoryError(f"{directory} is a file, not a checkpoint directory: give the directory "
                                 "that holds it")
    if directory.exists() and not directory.is_dir():  # a device such as /dev/null, a pipe
        raise NotADirectoryError(f"{directory} is not a checkpoint directory (nor a file): give the "
                                 "directory that holds the model")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")


def load(directory, *, dtype=None, device="cpu"):
    """Read ``(params, config)`` from a checkpoint directory.

    The directory is minitodi's, or a transformers GPT-2 or Llama one. ``dtype``: the parameters' dtype
    (default: as stored; float16 is widened to float32). config.json is checked against the weights'
    headers before any tensor is read, and every parameter must be finite.
    """
    directory = Path(directory)
    check_directory(directory)
    config = load_config(directory)
    path = directory / MODEL_FILE
    if not path.is_file() and (directory / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{path} is missing; only safetensors are read (convert pytorch_model.bin "
                                "with transformers: model.save_pretrained(dir, safe_serialization=True))")
    files = _weight_files(directory)
    header = {}
    for file in files:
        header.update(_read_header(file))
    _check_layer_count(header, config, directory / CONFIG_FILE, files[0])
    tensors = {}
    for file in files:
        tensors.update(_read_safetensors(file))
    params = _canonical(tensors, config, str(path))
    target = _load_dtype(params, dtype)
    params = {name: params[name].astype(target) for name in param_shapes(config) if name in params}
    try:
        check_params(params, config)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} does not match {directory / CONFIG_FILE}: {err.args[0]}") from err
    _check_finite(params, path)
    return {name: to_device(x, device) for name, x in params.items()}, config


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
    step = state.pop("optimizer_step", None)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{directory / STATE_JSON}: optimizer_step is {json.dumps(step)[:40]}, expected an "
                         "integer >= 0")
    optimizer = {"step": step, "m": {}, "v": {}}
    for key, value in arrays.items():
        moment, _, name = key.partition(".")
        if moment not in ("m", "v") or not name:
            raise ValueError(f"{directory / STATE_FILE}: unexpected tensor {key!r} (the optimizer's moments "
                             "are named m.<parameter> and v.<parameter>)")
        optimizer[moment][name] = to_device(value, device)
    return {"optimizer": optimizer, **state}
