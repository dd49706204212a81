"""TrainConfig takes NumPy scalars and stores Python numbers, so a run's settings always write as JSON."""

import dataclasses
import json

import numpy as np
import pytest

from minitodi.presets import TrainConfig


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    """np.int64 steps were refused ('must be an int'); an np.float32 lr broke run.json (no JSON type)."""
    tcfg = TrainConfig(steps=np.int64(5), batch_size=np.int32(4), seed=np.uint8(3), lr=np.float32(0.5),
                       kd_rate=np.float64(0.25), temperature=1)
    assert (tcfg.steps, tcfg.batch_size, tcfg.seed) == (5, 4, 3)
    assert type(tcfg.steps) is int and type(tcfg.lr) is float and type(tcfg.temperature) is float
    assert json.loads(json.dumps(dataclasses.asdict(tcfg)))["lr"] == 0.5


@pytest.mark.parametrize("settings", [{"seed": True}, {"steps": np.float64(5.0)}, {"lr": np.int64(0)}])
def test_what_is_no_number_of_its_kind_is_still_refused(settings):
    with pytest.raises(ValueError, match="must be"):
        TrainConfig(**settings)


def test_a_temperature_too_small_for_float32_gradients_is_refused():
    """T = 1e-20 made an infinite gradient norm at step 0, blamed on the learning rate."""
    with pytest.raises(ValueError, match="temperature must be at least 1e-06, got 1e-20"):
        TrainConfig(loss="todi", temperature=1e-20)
    assert TrainConfig(loss="todi", temperature=1e-6).temperature == 1e-6
