"""Fixtures and hooks shared by the test files; no test file imports this module.

Plain functions the tests call live in helpers.py. The fixtures here are what several files build the
same way: the small float64 GPT-2 and Llama, the small synthetic suite with its tokenizer, and PyTorch
and transformers for the comparisons with them (skipped where they are not installed).
"""

import pytest
from helpers import perturbed_params, small_gpt2_config, small_llama_config

from minitodi import data
from minitodi.core import device
from minitodi.tokenizer import Tokenizer


def pytest_collection_modifyitems(config, items):
    """The one GPU switch: a test marked ``gpu`` is skipped unless CuPy and a CUDA device are usable.

    The marker itself is looked up, not the keywords, so a parametrization id "gpu" does not count.
    """
    if device.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a usable CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def small_gpt2():
    """(config, params): the small GPT-2 of helpers.small_gpt2_config, float64 parameters off their init."""
    config = small_gpt2_config()
    return config, perturbed_params(config)


@pytest.fixture
def small_llama():
    """(config, params): the small Llama of helpers.small_llama_config, float64 parameters off their init."""
    config = small_llama_config()
    return config, perturbed_params(config)


@pytest.fixture(scope="session")
def small_suite():
    """The synthetic suite at seed 0 with 240 training, 16 validation and 16 test records.

    Shared by the whole session: a test may read the records but must not change them.
    """
    return data.synthetic_suite(seed=0, n_train=240, n_valid=16, n_test=16)


@pytest.fixture(scope="session")
def small_suite_tokenizer(small_suite):
    """A byte-level BPE of 300 tokens trained on the small suite's training records."""
    return Tokenizer.train([data.record_text(r) for r in small_suite["train"]], 300)


@pytest.fixture(scope="session")
def torch():
    """PyTorch, the reference some tests compare against; they are skipped where it is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def transformers(torch):
    """Hugging Face transformers (on PyTorch); the tests comparing with it are skipped without either."""
    return pytest.importorskip("transformers")
