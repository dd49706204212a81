"""Checkpoints: exact round trips, atomic saves, clear errors, original GPT-2 files, transformers."""

import functools
import json
import re
import stat

import numpy as np
import pytest
from helpers import (
    cross_entropy_both,
    perturbed_params,
    random_hf_model,
    small_gpt2_config,
    small_llama_config,
)
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from minitodi import checkpoint
from minitodi.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, STATE_JSON
from minitodi.core import optim

make_params = functools.partial(perturbed_params, dtype=np.float32)


def make_training_state(params, seed=0):
    """An optimizer after two real steps, an advanced RNG and a data position."""
    state = optim.adamw_init(params)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        grads = {k: rng.standard_normal(x.shape).astype(x.dtype) for k, x in params.items()}
        optim.adamw_step(params, grads, state, lr=1e-3)
    data_rng = np.random.default_rng(0)
    data_rng.random(5)  # advance it, so the state is not the seed's
    return {"optimizer": state, "rng": data_rng.bit_generator.state,
            "data_position": {"epoch": 1, "batch": 17}, "step": 2}


def _assert_params_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_exact(tmp_path, dtype):
    config = small_gpt2_config()
    params = make_params(config, dtype=dtype)
    assert checkpoint.save(tmp_path / "ck", params, config) == tmp_path / "ck"
    loaded, loaded_config = checkpoint.load(tmp_path / "ck")
    assert loaded_config == config
    _assert_params_equal(loaded, params)
    assert not checkpoint.has_training_state(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CONFIG_FILE, MODEL_FILE]
    assert json.loads((tmp_path / "ck" / CONFIG_FILE).read_text())["dtype"] == np.dtype(dtype).name
    # loading into another dtype converts
    as64, _ = checkpoint.load(tmp_path / "ck", dtype=np.float64)
    assert all(x.dtype == np.float64 for x in as64.values())
    np.testing.assert_array_equal(as64["transformer.wte.weight"],
                                  params["transformer.wte.weight"].astype(np.float64))


def test_training_state_round_trip(tmp_path):
    config = small_gpt2_config()
    params = make_params(config)
    state = make_training_state(params)
    checkpoint.save(tmp_path, params, config, training_state=state, config_extra={"eos_token_id": 0})
    assert checkpoint.has_training_state(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["eos_token_id"] == 0
    loaded = checkpoint.load_training_state(tmp_path)
    assert set(loaded) == {"optimizer", "rng", "data_position", "step"}
    assert loaded["step"] == 2 and loaded["data_position"] == {"epoch": 1, "batch": 17}
    assert loaded["rng"] == state["rng"]  # a 128-bit integer state survives JSON exactly
    assert loaded["optimizer"]["step"] == state["optimizer"]["step"] == 2
    for moment in ("m", "v"):
        _assert_params_equal(dict(sorted(loaded["optimizer"][moment].items())),
                             dict(sorted(state["optimizer"][moment].items())))
    # the restored RNG continues the same stream
    original = np.random.default_rng()
    original.bit_generator.state = state["rng"]
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["rng"]
    np.testing.assert_array_equal(restored.random(8), original.random(8))
    # and a resumed optimizer step is bit for bit the uninterrupted one
    grads = {k: np.full_like(x, 0.3) for k, x in params.items()}
    resumed, _ = checkpoint.load(tmp_path)
    optim.adamw_step(resumed, grads, loaded["optimizer"], lr=1e-3)
    optim.adamw_step(params, grads, state["optimizer"], lr=1e-3)
    _assert_params_equal(resumed, params)


def test_save_overwrites_previous_checkpoint(tmp_path):
    config = small_gpt2_config()
    checkpoint.save(tmp_path, make_params(config, seed=0), config,
                    training_state=make_training_state(make_params(config)))
    newer = make_params(config, seed=5)
    checkpoint.save(tmp_path, newer, config, training_state=make_training_state(make_params(config), seed=3))
    _assert_params_equal(checkpoint.load(tmp_path)[0], newer)
    checkpoint.load_training_state(tmp_path)  # ids agree
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ atomicity


def _fail_on(monkeypatch, filename, partial):
    """Make checkpoint's save_file raise when it writes ``filename``, optionally after writing garbage."""
    real = checkpoint.save_file

    def failing(tensors, path, metadata=None):
        if f".{filename}.tmp" in str(path):
            if partial:
                with open(path, "wb") as f:
                    f.write(b"\x00" * 100)  # a torn file under the temporary name
            raise OSError("disk full (simulated)")
        return real(tensors, path, metadata)
    monkeypatch.setattr(checkpoint, "save_file", failing)


@pytest.mark.parametrize("partial", [False, True])
def test_interrupted_model_write_keeps_previous_model(tmp_path, monkeypatch, partial):
    config = small_gpt2_config()
    old = make_params(config, seed=0)
    checkpoint.save(tmp_path, old, config, training_state=make_training_state(make_params(config)))
    _fail_on(monkeypatch, MODEL_FILE, partial)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(tmp_path, make_params(config, seed=9), config,
                        training_state=make_training_state(make_params(config), seed=4))
    assert _leftovers(tmp_path) == []
    _assert_params_equal(checkpoint.load(tmp_path)[0], old)  # the previous model, intact
    # the training state was already replaced by the new save's: its id no longer matches the model's
    with pytest.raises(ValueError, match="different saves"):
        checkpoint.load_training_state(tmp_path)


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    config = small_gpt2_config()

    def full_disk(tensors, path, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match=r"No space left on device \(writing .*model\.safetensors\)"):
        checkpoint.save(tmp_path, make_params(config), config)


def test_interrupted_state_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    config = small_gpt2_config()
    old = make_params(config, seed=0)
    old_state = make_training_state(make_params(config))
    checkpoint.save(tmp_path, old, config, training_state=old_state)
    _fail_on(monkeypatch, STATE_FILE, partial=True)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(tmp_path, make_params(config, seed=9), config,
                        training_state=make_training_state(make_params(config), seed=4))
    assert _leftovers(tmp_path) == []
    _assert_params_equal(checkpoint.load(tmp_path)[0], old)
    state = checkpoint.load_training_state(tmp_path)  # the old state, consistent with the old model
    assert state["rng"] == old_state["rng"]
    np.testing.assert_array_equal(state["optimizer"]["v"]["transformer.wpe.weight"],
                                  old_state["optimizer"]["v"]["transformer.wpe.weight"])


def test_a_failed_save_replacing_leaves_the_old_directory_and_no_partial_new_one(tmp_path, monkeypatch):
    config = small_gpt2_config()
    old = make_params(config, seed=0)
    checkpoint.save_replacing(tmp_path / "last", old, config, training_state=make_training_state(old))
    _fail_on(monkeypatch, MODEL_FILE, partial=True)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_replacing(tmp_path / "last", make_params(config, seed=9), config,
                                  training_state=make_training_state(make_params(config)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    _assert_params_equal(checkpoint.load(tmp_path / "last")[0], old)
    checkpoint.load_training_state(tmp_path / "last")  # the old state, consistent with the old model


def test_an_old_checkpoint_that_cannot_be_removed_is_named_by_its_full_path(tmp_path, monkeypatch):
    """rmtree names the file relative to its directory ('training_state.json'): the error names the path."""
    config = small_gpt2_config()
    params = make_params(config)
    checkpoint.save_replacing(tmp_path / "last", params, config, training_state=make_training_state(params))
    real_rmtree = checkpoint.shutil.rmtree

    def read_only_rmtree(path, ignore_errors=False):
        if ignore_errors:
            return real_rmtree(path, ignore_errors=True)
        raise PermissionError(13, "Permission denied", STATE_JSON)  # as rmtree raises it

    monkeypatch.setattr(checkpoint.shutil, "rmtree", read_only_rmtree)
    named = re.escape(f"cannot remove {tmp_path / 'last.old' / STATE_JSON}: Permission denied")
    state = make_training_state(params)
    with pytest.raises(OSError, match=named):
        checkpoint.save_replacing(tmp_path / "last", params, config, training_state=state)


def test_mismatched_save_ids(tmp_path):
    config = small_gpt2_config()
    for name in ("a", "b"):
        checkpoint.save(tmp_path / name, make_params(config), config,
                        training_state=make_training_state(make_params(config)))
    (tmp_path / "a" / MODEL_FILE).write_bytes((tmp_path / "b" / MODEL_FILE).read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        checkpoint.load_training_state(tmp_path / "a")
    # the state's two files disagreeing is caught too
    checkpoint.save(tmp_path / "c", make_params(config), config,
                    training_state=make_training_state(make_params(config)))
    (tmp_path / "c" / STATE_JSON).write_text((tmp_path / "b" / STATE_JSON).read_text())
    with pytest.raises(ValueError, match="different saves"):
        checkpoint.load_training_state(tmp_path / "c")


# ------------------------------------------------------------------------------------------ damaged files


@pytest.fixture
def saved(tmp_path):
    config = small_gpt2_config()
    params = make_params(config)
    checkpoint.save(tmp_path, params, config, training_state=make_training_state(make_params(config)))
    return tmp_path, params, config


@pytest.mark.parametrize("name", [CONFIG_FILE, MODEL_FILE])
def test_missing_file(saved, name):
    directory = saved[0]
    (directory / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        checkpoint.load(directory)


def test_a_file_given_for_the_directory_is_said_to_be_a_file(saved):
    """--model DIR/model.safetensors was 'checkpoint directory not found', though it exists."""
    path = saved[0] / MODEL_FILE
    with pytest.raises(NotADirectoryError, match=f"{path} is a file, not a checkpoint directory"):
        checkpoint.load(path)


@pytest.mark.parametrize("name", [STATE_FILE, STATE_JSON])
def test_missing_training_state_file(saved, name):
    directory = saved[0]
    (directory / name).unlink()
    assert not checkpoint.has_training_state(directory)
    with pytest.raises(FileNotFoundError, match=name):
        checkpoint.load_training_state(directory)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.load(tmp_path / "nowhere")


def test_pytorch_bin_only_is_explained(saved):
    directory = saved[0]
    (directory / MODEL_FILE).rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        checkpoint.load(directory)


@pytest.mark.parametrize("name", [MODEL_FILE, STATE_FILE])
def test_truncated_file(saved, name):
    directory = saved[0]
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=name):
        checkpoint.load_training_state(directory) if name == STATE_FILE else checkpoint.load(directory)


def test_corrupt_config_json(saved):
    directory = saved[0]
    (directory / CONFIG_FILE).write_text('{"n_embd": 16,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        checkpoint.load(directory)


MISMATCH = f"{MODEL_FILE} does not match .*{CONFIG_FILE}: "


def _edit_config(directory, field, value):
    config_json = json.loads((directory / CONFIG_FILE).read_text())
    config_json[field] = value
    (directory / CONFIG_FILE).write_text(json.dumps(config_json))


WTE_SHAPE = MISMATCH + r"parameter transformer.wte.weight has shape \(37, 16\), "


@pytest.mark.parametrize("field,value,message", [
    ("n_embd", 32, WTE_SHAPE + r"the config says \(37, 32\)"),
    ("vocab_size", 40, WTE_SHAPE + r"the config says \(40, 16\)"),
    # the layers are counted in the weights' header, before the config's parameters are listed
    ("n_layer", 3, f"{CONFIG_FILE}: n_layer = 3, but .*{MODEL_FILE} holds 2 layers"),
    ("n_layer", 1, f"{CONFIG_FILE}: n_layer = 1, but .*{MODEL_FILE} holds 2 layers"),
])
def test_config_disagreeing_with_tensors(saved, field, value, message):
    _edit_config(saved[0], field, value)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(saved[0])


@pytest.mark.parametrize("field,value,message", [
    ("activation_function", "relu", "activation_function"),
    ("n_inner", 100, "n_inner"),
    ("tie_word_embeddings", False, "untied"),
    ("model_type", "mamba", "model_type"),  # neither GPT-2 nor Llama
    # attention scaled otherwise: transformers would compute other logits (0.25 apart on a small model)
    ("scale_attn_weights", False, "scale_attn_weights = False is not implemented"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx = True is not implemented"),
])
def test_unsupported_config(saved, field, value, message):
    _edit_config(saved[0], field, value)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(saved[0])


def test_save_refuses_bad_params(tmp_path):
    config = small_gpt2_config()
    params = make_params(config)
    del params["transformer.ln_f.bias"]
    with pytest.raises(KeyError, match="ln_f.bias"):
        checkpoint.save(tmp_path, params, config)
    assert not (tmp_path / MODEL_FILE).exists()


def test_files_get_the_mode_a_plain_open_gives(tmp_path):
    """safetensors writes 0600; a checkpoint's files get what the umask gives every other file (0644)."""
    config = small_gpt2_config()
    checkpoint.save(tmp_path / "ck", make_params(config), config,
                    training_state=make_training_state(make_params(config)))
    (tmp_path / "plain").write_text("x")
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()}
    assert modes == dict.fromkeys([CONFIG_FILE, MODEL_FILE, STATE_FILE, STATE_JSON], plain)


def test_a_safetensors_write_error_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, which names no file."""
    config = small_gpt2_config()
    checkpoint.save(tmp_path, make_params(config), config)
    good = (tmp_path / MODEL_FILE).read_bytes()

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match=f"cannot write .*{MODEL_FILE}: .*No space left"):
        checkpoint.save(tmp_path, make_params(config, seed=3), config)
    assert (tmp_path / MODEL_FILE).read_bytes() == good and _leftovers(tmp_path) == []


def test_a_non_finite_parameter_is_refused_at_load(saved):
    directory, params, _ = saved
    tensors = load_file(str(directory / MODEL_FILE))
    tensors["transformer.h.1.mlp.c_fc.bias"][2] = np.inf
    save_file(tensors, str(directory / MODEL_FILE))
    message = f"{MODEL_FILE}: transformer.h.1.mlp.c_fc.bias holds NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        checkpoint.load(directory)


@pytest.mark.parametrize("field,value,message", [
    ("n_head", True, "n_head is true, expected a positive integer"),
    ("n_embd", "16", 'n_embd is "16", expected a positive integer'),
    ("n_layer", 2.0, "n_layer is 2.0, expected a positive integer"),
    ("layer_norm_epsilon", "1e-5", 'layer_norm_epsilon is "1e-5", expected a finite number > 0'),
    ("tie_word_embeddings", "yes", 'tie_word_embeddings is "yes", expected true or false'),
    ("model_type", ["gpt2"], r"model_type is \['gpt2'\]"),
    ("n_positions", None, "missing field 'n_positions'"),
])
def test_config_fields_of_the_wrong_type_are_named(saved, field, value, message):
    _edit_config(saved[0], field, value)
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: {message}"):
        checkpoint.load(saved[0])


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "holds a JSON list, not the object expected"),
    (b'{"n_embd": "\xe9"}', "is not UTF-8 text"),
    (b"", "is not valid JSON"),
])
def test_a_config_json_that_is_no_json_object_is_named(saved, content, message):
    (saved[0] / CONFIG_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=f"{CONFIG_FILE} {message}"):
        checkpoint.load(saved[0])


@pytest.mark.parametrize("field,value,message", [
    ("rope_parameters", [10000.0], "rope_parameters is \\[10000.0\\], expected a JSON object"),
    ("rope_parameters", {"rope_theta": "1e4"}, 'rope_parameters: rope_theta is "1e4"'),
    ("rms_norm_eps", "1e-6", 'rms_norm_eps is "1e-6"'),
    ("num_attention_heads", 3, "LlamaConfig: hidden_size .* must be a multiple of 2 \\* num_attention_heads"),
    ("attention_bias", 0, "attention_bias is 0, expected true or false"),
])
def test_llama_config_fields_of_the_wrong_type_are_named(tmp_path, field, value, message):
    config = small_llama_config()
    checkpoint.save(tmp_path, make_params(config), config)
    _edit_config(tmp_path, field, value)
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: {message}"):
        checkpoint.load(tmp_path)


def test_a_billion_layers_are_counted_against_the_header_first(saved, monkeypatch):
    """Listing a billion layers' parameter names would fill the memory: the header is read first."""
    def never(config):
        raise AssertionError("param_shapes called before the layers were counted")

    monkeypatch.setattr(checkpoint, "param_shapes", never)
    _edit_config(saved[0], "n_layer", 10**9)
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: n_layer = 1000000000, but .*{MODEL_FILE} holds 2"):
        checkpoint.load(saved[0])


def _shard(directory, weight_map):
    """Turn ``directory``'s model.safetensors into shard.safetensors and an index with ``weight_map``."""
    (directory / MODEL_FILE).rename(directory / "shard.safetensors")
    (directory / checkpoint.INDEX_FILE).write_text(json.dumps(weight_map))


def test_a_sharded_checkpoint_loads(saved):
    directory, params, _ = saved
    _shard(directory, {"weight_map": dict.fromkeys(params, "shard.safetensors")})
    _assert_params_equal(checkpoint.load(directory)[0], params)


@pytest.mark.parametrize("shard,message", [
    ("../outside.safetensors", "is '\\.\\./outside.safetensors', a file outside"),
    ("/tmp/outside.safetensors", "is '/tmp/outside.safetensors', a file outside"),
    (3, "is 3, expected a file name"),
    ("", 'is "", expected a file name'),
])
def test_index_files_naming_shards_outside_the_directory_or_no_file_are_refused(saved, shard, message):
    directory, params, _ = saved
    (directory.parent / "outside.safetensors").write_bytes((directory / MODEL_FILE).read_bytes())
    _shard(directory, {"weight_map": {**dict.fromkeys(params, "shard.safetensors"), "x.weight": shard}})
    with pytest.raises(ValueError, match=f"{checkpoint.INDEX_FILE}: weight_map\\['x.weight'\\] {message}"):
        checkpoint.load(directory)


@pytest.mark.parametrize("index,message", [
    ([], "holds a JSON list"),
    ({"weight_map": ["shard.safetensors"]}, "weight_map is"),
    ({}, "weight_map is null"),
])
def test_a_malformed_index_file_is_named(saved, index, message):
    _shard(saved[0], index)
    with pytest.raises(ValueError, match=f"{checkpoint.INDEX_FILE}:? {message}"):
        checkpoint.load(saved[0])


@pytest.mark.parametrize("edit,message", [
    (lambda state: [state], "holds a JSON list"),
    (lambda state: {**state, "optimizer_step": "2"}, "optimizer_step is \"2\", expected an integer"),
    (lambda state: {k: v for k, v in state.items() if k != "optimizer_step"}, "optimizer_step is null"),
])
def test_a_malformed_training_state_json_is_named(saved, edit, message):
    path = saved[0] / STATE_JSON
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=f"{STATE_JSON}:? {message}"):
        checkpoint.load_training_state(saved[0])


# ------------------------------------------------------------------------------------------ GPT-2 layout


def _write_gpt2_layout(directory, params, config, lm_head=None):
    """Write a checkpoint as the original GPT-2 files have it.

    That is: no ``transformer.`` prefix, the attention mask buffers, an explicit lm_head.
    """
    P = config.n_positions
    tensors = {k.removeprefix("transformer."): v for k, v in params.items()}
    for l in range(config.n_layer):
        tensors[f"h.{l}.attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]
        tensors[f"h.{l}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = params["transformer.wte.weight"].copy() if lm_head is None else lm_head
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / MODEL_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(checkpoint.hf_config(config, np.float32)))


def test_original_gpt2_layout_loads(tmp_path):
    config = small_gpt2_config()
    params = make_params(config)
    _write_gpt2_layout(tmp_path, params, config)
    assert "h.0.attn.bias" in load_file(str(tmp_path / MODEL_FILE))
    loaded, loaded_config = checkpoint.load(tmp_path)
    assert loaded_config == config
    _assert_params_equal(loaded, params)


def test_untied_lm_head_is_refused(tmp_path):
    config = small_gpt2_config()
    params = make_params(config)
    head = params["transformer.wte.weight"].copy()
    head[3, 4] += 1e-3
    _write_gpt2_layout(tmp_path, params, config, lm_head=head)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        checkpoint.load(tmp_path)


def test_unexpected_tensor_is_refused(tmp_path):
    config = small_gpt2_config()
    params = make_params(config)
    save_file({**params, "transformer.h.0.attn.rotary": np.zeros(3, np.float32)}, str(tmp_path / MODEL_FILE))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(checkpoint.hf_config(config, np.float32)))
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.rotary'"):
        checkpoint.load(tmp_path)


# ------------------------------------------------------------------------------------------ transformers


def test_transformers_round_trip(tmp_path, torch, transformers):
    """A random transformers GPT-2 round-trips through minitodi with the same logits and CE gradients.

    Loaded here it gives transformers' logits and CE gradients; saved back, it loads in transformers
    with the same logits. Runs only where torch and transformers are installed.
    """
    hf_config = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=0, eos_token_id=0)
    hf = random_hf_model(torch, transformers.GPT2LMHeadModel, hf_config)
    hf.save_pretrained(tmp_path / "hf")
    params, config = checkpoint.load(tmp_path / "hf")
    assert config == small_gpt2_config()
    assert all(x.dtype == np.float64 for x in params.values())

    idx, (logits, loss, grads), (hf_logits, hf_loss, hf_grads) = cross_entropy_both(params, config, hf, torch)
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=1e-8)
    assert loss == pytest.approx(hf_loss, abs=1e-8)
    assert set(hf_grads) == set(grads)  # lm_head is tied: not listed
    for name, g in grads.items():
        np.testing.assert_allclose(g, hf_grads[name], rtol=0, atol=1e-8, err_msg=name)

    checkpoint.save(tmp_path / "mine", params, config)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "mine", dtype=torch.float64).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(idx)).logits.numpy(), logits, rtol=0, atol=1e-8)
