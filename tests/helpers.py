"""Plain functions shared by the test files: ``from helpers import small_gpt2_config``.

Fixtures live in conftest.py, which no test file imports. This module is found because pytest puts the
tests/ directory on sys.path (its default "prepend" import mode does so for conftest.py and for every
test module here, tests/ having no __init__.py).
"""

import os

import numpy as np

from minitodi.core import layers, model
from minitodi.core.gradcheck import check_array


def small_gpt2_config(**overrides):
    """A GPT-2 small enough for finite differences: V 37, 16 positions, width 16, 2 layers of 2 heads."""
    settings = {"vocab_size": 37, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}
    return model.GPTConfig(**{**settings, **overrides})


def small_llama_config(**overrides):
    """A Llama small enough for finite differences: V 37, 16 positions, width 16, 2 layers.

    Its 2 query heads share one key/value head.
    """
    settings = {"vocab_size": 37, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16}
    return model.LlamaConfig(**{**settings, **overrides})


def perturbed_params(config, seed=0, dtype=np.float64):
    """init_params, then every tensor moved off its init so layer norms are not 1 and biases not 0."""
    params = model.init_params(config, seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for x in params.values():
        x += (0.1 * rng.standard_normal(x.shape)).astype(dtype)
    return params


def reference_log_softmax(z):
    """log softmax along the last axis, written out in NumPy: the tests' reference, not minitodi's code.

    An entry of -inf stays -inf (probability 0), without a divide-by-zero warning.
    """
    z = z - z.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fake_loss(forward, dy, out=0):
    """L = sum(forward()[out] * dy): the scalar whose gradient w.r.t. that output of a layer is dy."""
    return lambda: float(np.sum(forward()[out] * dy))


def check_layer_gradients(f, pairs, tol):
    """Each (array, gradient) pair: the gradient has the array's shape and agrees with f's differences.

    ``f`` is the layer's fake loss (see fake_loss); every entry of every array is checked, relative
    error below ``tol``.
    """
    for arr, grad in pairs:
        assert grad.shape == arr.shape
        assert check_array(f, arr, grad).max_rel_error < tol


def cross_entropy_pass(params, idx, targets, config):
    """One forward, cross-entropy and backward through minitodi: (logits, loss, grads)."""
    logits, cache = model.forward(params, idx, config)
    loss, ce_cache = layers.cross_entropy_forward(logits, targets)
    grads = model.backward(layers.cross_entropy_backward(1.0, ce_cache), cache)
    return logits, loss, grads


def random_hf_model(torch, model_class, hf_config):
    """A transformers model of ``model_class`` in float64, in eval mode, its weights moved off their init.

    Seeded (torch.manual_seed(0)); every parameter gets 0.1 N(0, 1) added, so that layer norms are not 1
    and biases not 0.
    """
    torch.manual_seed(0)
    hf = model_class(hf_config).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def cross_entropy_both(params, config, hf, torch, seed=0):
    """One cross-entropy batch through minitodi by hand and through a transformers model by autograd.

    The batch: V 37, 2 rows of 9 tokens, the first three targets of row 0 ignored. Returns the ids, then
    (logits, loss, grads) of minitodi and the same three of the transformers model ``hf``.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 37, size=(2, 9))
    targets = rng.integers(0, 37, size=(2, 9))
    targets[0, :3] = layers.IGNORE_INDEX
    logits, loss, grads = cross_entropy_pass(params, idx, targets, config)
    hf.zero_grad()
    hf_logits = hf(torch.tensor(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, 37), torch.tensor(targets).reshape(-1),
                                                ignore_index=layers.IGNORE_INDEX)
    hf_loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    return idx, (logits, float(loss), grads), (hf_logits.detach().numpy(), hf_loss.item(), hf_grads)


def exit_status(argv):
    """What ``minitodi ARGV`` exits with, run in this process.

    main's return value, or argparse's SystemExit code (the parser refuses an option of a bad type).
    """
    from minitodi.cli import main

    try:
        return main(argv)
    except SystemExit as stopped:
        return stopped.code


def read_only(monkeypatch, directory):
    """os.access says ``directory`` is not writable (as a non-root user finds after chmod a-w).

    Faked because these tests may run as root, to whom chmod forbids nothing.
    """
    real_access = os.access

    def access(path, mode, **kwargs):
        if os.path.abspath(path) == str(directory) and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
