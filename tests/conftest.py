"""Helpers shared by the test files (import them: ``from conftest import small_config``)."""

import numpy as np
import pytest

from minitodi import device, layers, model


def pytest_collection_modifyitems(config, items):
    """The one GPU switch: a test marked ``gpu`` is skipped unless CuPy and a CUDA device are usable."""
    if device.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a usable CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def small_config(**overrides):
    """A GPT small enough for finite differences: V 37, 16 positions, width 16, 2 layers of 2 heads."""
    return model.GPTConfig(**{"vocab_size": 37, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2,
                              **overrides})


def perturbed_params(config, seed=0, dtype=np.float64):
    """init_params, then every tensor moved off its init so layer norms are not 1 and biases not 0."""
    params = model.init_params(config, seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for x in params.values():
        x += (0.1 * rng.standard_normal(x.shape)).astype(dtype)
    return params


def fake_loss(forward, dy, out=0):
    """L = sum(forward()[out] * dy): the scalar whose gradient w.r.t. that output of a layer is dy."""
    return lambda: float(np.sum(forward()[out] * dy))


def cross_entropy_both(params, config, hf, torch, seed=0):
    """One cross-entropy batch (V 37, the first three targets of row 0 ignored) through minitodi by hand
    and through a transformers model ``hf`` by autograd: the ids, then (logits, loss, grads) of each.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 37, size=(2, 9))
    targets = rng.integers(0, 37, size=(2, 9))
    targets[0, :3] = layers.IGNORE_INDEX
    logits, cache = model.forward(params, idx, config)
    loss, ce_cache = layers.cross_entropy_forward(logits, targets)
    grads = model.backward(layers.cross_entropy_backward(1.0, ce_cache), cache)
    hf.zero_grad()
    hf_logits = hf(torch.tensor(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, 37), torch.tensor(targets).reshape(-1),
                                                ignore_index=layers.IGNORE_INDEX)
    hf_loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    return idx, (logits, float(loss), grads), (hf_logits.detach().numpy(), hf_loss.item(), hf_grads)


def small_llama_config(**overrides):
    """A Llama small enough for finite differences: V 37, 16 positions, width 16, 2 layers, 2 query heads
    sharing one key/value head.
    """
    return model.LlamaConfig(**{"vocab_size": 37, "hidden_size": 16, "intermediate_size": 24,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "max_position_embeddings": 16, **overrides})


@pytest.fixture
def gpt2_small():
    """(config, params): the small GPT-2 with float64 parameters moved off their initialisation."""
    config = small_config()
    return config, perturbed_params(config)


@pytest.fixture
def llama_small():
    """(config, params): the small Llama with float64 parameters moved off their initialisation."""
    config = small_llama_config()
    return config, perturbed_params(config)
