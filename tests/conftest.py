"""Helpers shared by the test files (import them: ``from conftest import small_config``)."""

import numpy as np

from minitodi import model


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
