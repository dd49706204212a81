"""The Llama family: its layers against central differences in float64, the model against transformers.

A layer is checked through the fake loss L = sum(y * dy) with a fixed random dy (dL/dy = dy), as in
test_layers.py. The model is checked against transformers' LlamaForCausalLM in float64 (logits, the
cross-entropy gradient of every parameter) and through checkpoints both ways, when torch and
transformers are installed.
"""

import json

import numpy as np
import pytest
from helpers import (
    check_layer_gradients,
    cross_entropy_both,
    cross_entropy_pass,
    fake_loss,
    random_hf_model,
    small_llama_config,
)
from safetensors.numpy import save_file

from minitodi import checkpoint
from minitodi.core import device, layers, model
from minitodi.core.gradcheck import check_arrays, directional_check
from minitodi.generate import generate

TOL = 1e-6


# ------------------------------------------------------------------------------------------ layers


def test_rmsnorm_backward():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7)) * 2.0 + 0.5
    w = 1.0 + 0.3 * rng.standard_normal(7)
    y, cache = layers.rmsnorm_forward(x, w, 1e-5)
    np.testing.assert_allclose(y, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-14)
    dy = rng.standard_normal(y.shape)
    dx, dw = layers.rmsnorm_backward(dy, cache)
    check_layer_gradients(fake_loss(lambda: layers.rmsnorm_forward(x, w, 1e-5), dy), ((x, dx), (w, dw)), TOL)


def test_rope_tables_follow_transformers_layout():
    cos, sin = layers.rope_tables(3, 4, 6, 500.0, np.zeros(1))
    angles = np.arange(3, 7)[:, None] * 500.0 ** (-np.arange(3) * 2 / 6)  # (T, hs/2)
    np.testing.assert_allclose(cos, np.cos(np.concatenate([angles, angles], axis=1)), rtol=1e-15)
    np.testing.assert_allclose(sin, np.sin(np.concatenate([angles, angles], axis=1)), rtol=1e-15)


def test_rotary_backward_is_the_inverse_rotation():
    rng = np.random.default_rng(1)
    B, T, H, hs = 2, 5, 3, 8
    cos, sin = layers.rope_tables(2, T, hs, 100.0, np.zeros(1))
    x = rng.standard_normal((B, T, H * hs))
    y, cache = layers.rotary_forward(x, cos, sin, H)
    # a rotation keeps each pair's length, and position 0 is not turned at all
    pairs = lambda a: a.reshape(B, T, H, 2, hs // 2)  # noqa: E731
    np.testing.assert_allclose((pairs(y) ** 2).sum(3), (pairs(x) ** 2).sum(3), rtol=1e-12)
    c0, s0 = layers.rope_tables(0, 1, hs, 100.0, np.zeros(1))
    np.testing.assert_array_equal(layers.rotary_forward(x[:, :1], c0, s0, H)[0], x[:, :1])
    dy = rng.standard_normal(y.shape)
    dx = layers.rotary_backward(dy, cache)
    check_layer_gradients(fake_loss(lambda: layers.rotary_forward(x, cos, sin, H), dy), ((x, dx),), TOL)
    np.testing.assert_allclose(layers.rotary_backward(y, cache), x, rtol=1e-12)  # R^T R = 1


def test_swiglu_backward():
    rng = np.random.default_rng(2)
    g, u = 3.0 * rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    y, cache = layers.swiglu_forward(g, u)
    np.testing.assert_allclose(y, g / (1.0 + np.exp(-g)) * u, rtol=1e-14)
    dy = rng.standard_normal(y.shape)
    dg, du = layers.swiglu_backward(dy, cache)
    check_layer_gradients(fake_loss(lambda: layers.swiglu_forward(g, u), dy), ((g, dg), (u, du)), TOL)
    with np.errstate(over="raise"):  # sigmoid through tanh: no overflow far out
        assert np.all(np.isfinite(layers.swiglu_forward(np.array([-1e4, 1e4]), np.ones(2))[0]))


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 2), (4, 1), (2, 2)])
def test_grouped_attention_backward(n_head, n_kv_head):
    rng = np.random.default_rng(3)
    B, T, hs = 2, 5, 3
    q = rng.standard_normal((B, T, n_head * hs))
    k, v = (rng.standard_normal((B, T, n_kv_head * hs)) for _ in range(2))
    y, cache = layers.grouped_attention_forward(q, k, v, n_head, n_kv_head)
    dy = rng.standard_normal(y.shape)
    dq, dk, dv = layers.grouped_attention_backward(dy, cache)
    f = fake_loss(lambda: layers.grouped_attention_forward(q, k, v, n_head, n_kv_head), dy)
    check_layer_gradients(f, ((q, dq), (k, dk), (v, dv)), TOL)


def test_grouped_attention_is_multi_head_attention_on_repeated_heads():
    """Query head h reads key/value head h // G: the same as GPT-2's attention with each kv head repeated."""
    rng = np.random.default_rng(4)
    B, T, H, Hkv, hs = 2, 6, 6, 2, 4
    q = rng.standard_normal((B, T, H * hs))
    k, v = (rng.standard_normal((B, T, Hkv * hs)) for _ in range(2))
    repeat = lambda a: np.repeat(a.reshape(B, T, Hkv, 1, hs), H // Hkv, axis=3).reshape(B, T, H * hs)  # noqa: E731
    want, _ = layers.attention_forward(np.concatenate([q, repeat(k), repeat(v)], axis=-1), H)
    got, _ = layers.grouped_attention_forward(q, k, v, H, Hkv)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_grouped_attention_with_past_matches_the_full_sequence():
    rng = np.random.default_rng(5)
    B, T, H, Hkv, hs = 1, 7, 4, 2, 3
    q = rng.standard_normal((B, T, H * hs))
    k, v = (rng.standard_normal((B, T, Hkv * hs)) for _ in range(2))
    full, _ = layers.grouped_attention_forward(q, k, v, H, Hkv)
    first, cache = layers.grouped_attention_forward(q[:, :4], k[:, :4], v[:, :4], H, Hkv)
    rest, _ = layers.grouped_attention_forward(q[:, 4:], k[:, 4:], v[:, 4:], H, Hkv, past=cache[1:3])
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------ the model


def grouped_llama_config(**overrides):
    """The small Llama with 4 query heads in 2 key/value groups, RMSNorm eps 1e-5 and rope_theta 500.

    _hf_llama below builds the same model in transformers, so a checkpoint of either loads as this config.
    """
    grouped = {"num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500.0}
    return small_llama_config(**{**grouped, **overrides})


def _random_params(config, seed=0):
    """float64 parameters with norms and biases away from 1 and 0."""
    rng = np.random.default_rng(seed)
    return {name: 0.3 * rng.standard_normal(shape) + (1.0 if name.endswith("norm.weight") else 0.0)
            for name, shape in model.param_shapes(config).items()}


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "tie_word_embeddings": True},
                                       {"num_key_value_heads": 1}])
def test_every_parameter_gradient(overrides):
    """The cross-entropy gradient of every tensor against central differences.

    Sampled entries of each tensor (of the embedding, the rows the batch uses), then a directional check
    along a random direction through all of them.
    """
    config = grouped_llama_config(**overrides)
    params = _random_params(config)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 37, size=(2, 6))
    targets = rng.integers(0, 37, size=(2, 6))
    targets[0, :2] = layers.IGNORE_INDEX

    def loss():
        return layers.cross_entropy_forward(model.forward(params, idx, config)[0], targets)[0]

    _, _, grads = cross_entropy_pass(params, idx, targets, config)
    assert grads.keys() == params.keys()
    results = check_arrays(loss, params, grads, max_entries=12,
                           rows={"model.embed_tokens.weight": np.unique(idx)})
    worst = max(results.items(), key=lambda item: item[1].max_rel_error)
    assert worst[1].max_rel_error < TOL, worst
    analytic, numeric, err = directional_check(loss, params, grads)
    assert err < 1e-8, (analytic, numeric)


def test_kv_cache_decoding_matches_the_full_forward():
    config = grouped_llama_config()
    params = _random_params(config)
    idx = np.random.default_rng(2).integers(0, 37, size=(2, 9))
    full, _ = model.forward(params, idx, config)
    first, cache = model.forward(params, idx[:, :5], config)
    steps = [first]
    for t in range(5, 9):
        logits, cache = model.forward(params, idx[:, t:t + 1], config, past=cache["present"])
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)


def test_init_params_and_generate():
    config = grouped_llama_config()
    params = model.init_params(config, seed=0)
    assert {k: v.shape for k, v in params.items()} == model.param_shapes(config)
    assert np.all(params["model.layers.1.post_attention_layernorm.weight"] == 1.0)
    prompts = [[3, 4, 5], [6, 7, 8]]
    out = generate(params, config, prompts, max_new_tokens=5)
    assert [len(o) for o in out] == [5, 5]
    # greedy decoding with the KV cache picks the argmax of the full forward at every step
    for prompt, new in zip(prompts, out):
        logits, _ = model.forward(params, np.array([prompt + new]), config)
        assert list(logits[0, len(prompt) - 1:-1].argmax(axis=-1)) == new


def test_computes_in_the_params_dtype():
    config = grouped_llama_config(attention_bias=True)
    params = _random_params(config)
    rng = np.random.default_rng(3)
    idx, targets = rng.integers(0, 37, size=(2, 7)), rng.integers(0, 37, size=(2, 7))
    logits, loss, grads = cross_entropy_pass(params, idx, targets, config)
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    logits32, loss32, grads32 = cross_entropy_pass(params32, idx, targets, config)
    assert logits32.dtype == np.float32 and all(g.dtype == np.float32 for g in grads32.values())
    np.testing.assert_allclose(logits32, logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    for k, g in grads.items():
        np.testing.assert_allclose(grads32[k], g, rtol=0, atol=1e-4 * np.abs(g).max(), err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 1e-4)])
def test_cupy_matches_numpy(dtype, tol):
    config = grouped_llama_config(attention_bias=True)
    params = {k: v.astype(dtype) for k, v in _random_params(config).items()}
    rng = np.random.default_rng(5)
    idx, targets = rng.integers(0, 37, size=(3, 12)), rng.integers(0, 37, size=(3, 12))
    logits, loss, grads = cross_entropy_pass(params, idx, targets, config)
    gpu = {k: device.to_device(x, "gpu") for k, x in params.items()}
    idx_g, targets_g = device.to_device(idx, "gpu"), device.to_device(targets, "gpu")
    logits_g, loss_g, grads_g = cross_entropy_pass(gpu, idx_g, targets_g, config)
    assert device.device_of(logits_g) == "gpu" and logits_g.dtype == dtype
    np.testing.assert_allclose(device.to_numpy(logits_g), logits, rtol=0, atol=tol * np.abs(logits).max())
    for k, g in grads.items():
        np.testing.assert_allclose(device.to_numpy(grads_g[k]), g, rtol=0, atol=tol * np.abs(g).max(),
                                   err_msg=k)


def test_config_errors():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        grouped_llama_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        grouped_llama_config(num_hidden_layers=0)
    with pytest.raises(ValueError, match="rope_theta"):
        grouped_llama_config(rope_theta=0.0)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -2, 2.5, "8"])
def test_every_size_must_be_a_positive_integer(field, value):
    """Each size and count is checked by name (a check by annotation type once let all of them through)."""
    with pytest.raises(ValueError, match=f"LlamaConfig.{field} must be a positive integer"):
        grouped_llama_config(**{field: value})


# ------------------------------------------------------------------------------------------ checkpoints


def _saved(tmp_path, **overrides):
    config = grouped_llama_config(**overrides)
    params = _random_params(config)
    checkpoint.save(tmp_path, params, config)
    return params, config, json.loads((tmp_path / "config.json").read_text())


def _write_config(tmp_path, config_json):
    (tmp_path / "config.json").write_text(json.dumps(config_json))


def test_save_load_round_trip_and_rope_theta_in_either_place(tmp_path):
    params, config, config_json = _saved(tmp_path, tie_word_embeddings=True)
    assert config_json["model_type"] == "llama" and config_json["rope_parameters"]["rope_theta"] == 500.0
    back, back_config = checkpoint.load(tmp_path)
    assert back_config == config and back.keys() == params.keys()
    assert all(np.array_equal(back[k], params[k]) for k in params)
    # transformers 4 wrote rope_theta at the top level, transformers 5 inside rope_parameters
    del config_json["rope_parameters"]
    _write_config(tmp_path, config_json)
    assert checkpoint.load(tmp_path)[1].rope_theta == 500.0
    # num_key_value_heads None: transformers' default, as many as the query heads
    config_json.update({"rope_parameters": {"rope_type": "default", "rope_theta": 20.0}, "rope_theta": None,
                        "num_key_value_heads": None})
    _write_config(tmp_path, config_json)
    with pytest.raises(ValueError, match="k_proj.weight has shape"):  # the tensors are grouped
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("mlp_bias", True), ("head_dim", 8), ("sliding_window", 4), ("pretraining_tp", 2),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0}),
])
def test_unimplemented_config_features_are_named(tmp_path, field, value):
    _, _, config_json = _saved(tmp_path)
    _write_config(tmp_path, {**config_json, field: value})
    with pytest.raises(ValueError, match=f"{field}.*not implemented"):
        checkpoint.load(tmp_path)


def test_missing_size_and_foreign_tensors(tmp_path):
    params, config, config_json = _saved(tmp_path)
    _write_config(tmp_path, {k: v for k, v in config_json.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="missing field 'intermediate_size'"):
        checkpoint.load(tmp_path)
    # tied, but the saved lm_head.weight differs from the embedding
    _write_config(tmp_path, {**config_json, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        checkpoint.load(tmp_path)
    extra = {**params, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2),
             "model.layers.0.mlp.x": np.ones(2)}
    save_file(extra, str(tmp_path / "model.safetensors"))
    _write_config(tmp_path, config_json)
    # the rotary buffer is dropped; the other tensor is refused
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.x'"):
        checkpoint.load(tmp_path)


# ------------------------------------------------------------------------------------------ transformers


@pytest.fixture
def llama_in_float64(monkeypatch, torch, transformers):
    """transformers' Llama computing in float64 throughout, for the length of one test.

    Whatever the model's dtype, transformers computes RMSNorm and the rotary angles in float32 (a few
    1e-8 of difference at float64); the reference replaces exactly those two functions by the same
    formulas without the casts. The attention (sdpa) already computes in the inputs' dtype.
    """
    from transformers.models.llama import modeling_llama

    def rmsnorm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (
            torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = position_ids[..., None].double() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotary)


def _hf_llama(transformers, torch, tie=False):
    """A random LlamaForCausalLM in float64, grouped_llama_config(attention_bias=True) in transformers.

    Grouped-query attention with biases, rope_theta 500, norms and biases moved off 1 and 0, an untied
    head (unless ``tie``).
    """
    hf_config = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=500.0,
                                         attention_bias=True, tie_word_embeddings=tie,
                                         attn_implementation="sdpa")
    return random_hf_model(torch, transformers.LlamaForCausalLM, hf_config)


@pytest.mark.usefixtures("llama_in_float64")
@pytest.mark.parametrize("shard", [False, True])
def test_transformers_logits_gradients_and_round_trip(tmp_path, torch, transformers, shard):
    """A random transformers Llama round-trips through minitodi with the same logits and gradients.

    Loaded here (one file, or shards with an index) it gives the logits (1e-9) and cross-entropy
    gradients (1e-8) of PyTorch autograd in float64; saved back, transformers loads it with the same
    logits.
    """
    hf = _hf_llama(transformers, torch)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="2KB" if shard else "1GB")
    assert (tmp_path / "hf" / checkpoint.INDEX_FILE).is_file() == shard
    params, config = checkpoint.load(tmp_path / "hf")
    assert config == grouped_llama_config(attention_bias=True)
    assert all(x.dtype == np.float64 for x in params.values())

    idx, (logits, loss, grads), (hf_logits, hf_loss, hf_grads) = cross_entropy_both(params, config, hf, torch)
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=1e-9)
    assert loss == pytest.approx(hf_loss, abs=1e-9)
    assert set(hf_grads) == set(grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g, hf_grads[name], rtol=0, atol=1e-8, err_msg=name)

    checkpoint.save(tmp_path / "mine", params, config)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "mine", dtype=torch.float64).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(idx)).logits.numpy(), logits, rtol=0, atol=1e-9)


@pytest.mark.usefixtures("llama_in_float64")
def test_transformers_tied_head(tmp_path, torch, transformers):
    hf = _hf_llama(transformers, torch, tie=True)
    hf.save_pretrained(tmp_path / "hf")
    params, config = checkpoint.load(tmp_path / "hf")
    assert config.tie_word_embeddings and "lm_head.weight" not in params
    idx = np.arange(8).reshape(1, 8)
    with torch.no_grad():
        want = hf(torch.tensor(idx)).logits.numpy()
    np.testing.assert_allclose(model.forward(params, idx, config)[0], want, rtol=0, atol=1e-9)
    checkpoint.save(tmp_path / "mine", params, config)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "mine", dtype=torch.float64).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(idx)).logits.numpy(), want, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ command line


def test_cli_trains_and_distils_across_architectures(tmp_path):
    """`--arch llama`: a Llama student of a GPT-2 teacher, and a GPT-2 student of a Llama teacher.

    The three runs share one tokenizer; each is a run directory that loads, generates and has the
    preset's shape.
    """
    from minitodi import presets
    from minitodi.cli import main

    tiny_args = ["--preset", "tiny", "--steps", "4", "--batch-size", "8", "--eval-every", "2",
                 "--vocab-size", "300", "--seq-len", "48", "--max-new-tokens", "8", "--quiet"]
    assert main(["train", "--out", str(tmp_path / "gpt2"), *tiny_args]) == 0
    assert main(["distill", "--arch", "llama", "--teacher", str(tmp_path / "gpt2"), "--loss", "todi",
                 "--out", str(tmp_path / "llama"), *tiny_args]) == 0
    assert main(["distill", "--teacher", str(tmp_path / "llama"), "--loss", "fkl",
                 "--out", str(tmp_path / "back"), *tiny_args]) == 0
    params, config = checkpoint.load(tmp_path / "llama")
    assert config == presets.model_config("tiny", config.vocab_size, 56, "llama")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    assert (config.num_key_value_heads, config.intermediate_size) == (1, 88)  # 8 * 32 / 3 = 85.3 -> 88
    assert checkpoint.load(tmp_path / "back")[1].model_type == "gpt2"
    assert main(["generate", "--model", str(tmp_path / "llama"), "--instruction", "Name a fruit.",
                 "--max-new-tokens", "4"]) == 0
    with pytest.raises(ValueError, match="arch must be one of"):
        presets.model_config("tiny", 300, 56, "mamba")
