"""ModelsLab scheduler names and options mapped onto diffusers schedulers."""

import numpy as np
import pytest
from diffusers import DDIMScheduler

from service.engine.schedulers import (
    SCHEDULERS,
    _PolynomialLMSDiscreteScheduler,
    accepts_karras_sigmas,
    build_scheduler,
    canonical_scheduler_name,
    validate_scheduler_options,
)
from service.engine.tiny_model import SD2_SCHEDULER_CONFIG

# diffusers' schedulers trip numpy 2 and their own deprecations; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

BASE = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG).config

MODELSLAB_NAMES = [
    "DDPM",
    "DDIM",
    "PNDM",
    "LMSDiscrete",
    "EulerDiscrete",
    "EulerAncestralDiscrete",
    "DPMSolverMultistep",
    "DPMSolverSinglestep",
    "HeunDiscrete",
    "KDPM2Discrete",
    "KDPM2AncestralDiscrete",
    "UniPCMultistep",
    "DEISMultistep",
    "IPNDM",
    "LCM",
]


def test_all_modelslab_names_with_and_without_suffix():
    assert tuple(f"{name}Scheduler" for name in MODELSLAB_NAMES) == SCHEDULERS
    for name in MODELSLAB_NAMES:
        assert canonical_scheduler_name(name) == f"{name}Scheduler"
        assert canonical_scheduler_name(f"{name}Scheduler") == f"{name}Scheduler"
    assert canonical_scheduler_name("unipcmultistepscheduler") == "UniPCMultistepScheduler"


def test_unknown_scheduler_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match="scheduler") as excinfo:
        canonical_scheduler_name("KarrasMagic")
    assert "UniPCMultistepScheduler" in str(excinfo.value)
    assert str(excinfo.value).startswith("scheduler:")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_builds_from_the_sd2_config(name):
    scheduler = build_scheduler(BASE, name, use_karras_sigmas=True, algorithm_type=None)
    assert type(scheduler).__name__ == name
    if "prediction_type" in scheduler.config:
        assert scheduler.config.prediction_type == "v_prediction"
    if accepts_karras_sigmas(name):
        assert scheduler.config.use_karras_sigmas is True
    else:
        assert "use_karras_sigmas" not in scheduler.config
    scheduler.set_timesteps(3)
    assert len(scheduler.timesteps) >= 3


def test_karras_only_where_accepted():
    assert build_scheduler(BASE, "UniPCMultistep", False, None).config.use_karras_sigmas is False
    assert build_scheduler(BASE, "UniPCMultistep", True, None).config.use_karras_sigmas is True
    assert "use_karras_sigmas" not in build_scheduler(BASE, "DDIM", True, None).config
    assert validate_scheduler_options("DDIM", True).use_karras_sigmas is False


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("dpmsolver+++", "sde-dpmsolver++"),
        ("sde-dpmsolver++", "sde-dpmsolver++"),
        ("dpmsolver++", "dpmsolver++"),
        ("dpmsolver", "dpmsolver"),
        ("sde-dpmsolver", "sde-dpmsolver"),
        (None, "dpmsolver++"),
        ("none", "dpmsolver++"),
    ],
)
def test_algorithm_type_for_dpmsolver_multistep(requested, expected):
    scheduler = build_scheduler(BASE, "DPMSolverMultistepScheduler", True, requested)
    assert scheduler.config.algorithm_type == expected
    scheduler.set_timesteps(4)


def test_algorithm_type_for_dpmsolver_singlestep():
    scheduler = build_scheduler(BASE, "DPMSolverSinglestep", False, "dpmsolver+++")
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"
    with pytest.raises(ValueError, match="^algorithm_type:"):
        validate_scheduler_options("DPMSolverSinglestep", False, "sde-dpmsolver")


def test_algorithm_type_ignored_elsewhere_with_a_note():
    choice = validate_scheduler_options("UniPCMultistepScheduler", True, "dpmsolver+++")
    assert choice.algorithm_type is None
    assert any("algorithm_type" in note for note in choice.notes)
    build_scheduler(BASE, "UniPCMultistepScheduler", True, "dpmsolver+++")
    assert validate_scheduler_options("UniPCMultistepScheduler", True, None).notes == ()


def test_bad_options_name_their_field():
    with pytest.raises(ValueError, match="^algorithm_type:"):
        validate_scheduler_options("DPMSolverMultistep", False, "dpmsolver4")
    with pytest.raises(ValueError, match="^num_inference_steps:"):
        validate_scheduler_options("LCM", False, None, num_inference_steps=51)
    with pytest.raises(ValueError, match="^num_inference_steps:"):
        validate_scheduler_options("DDIM", False, None, num_inference_steps=0)


def test_lms_coefficients_without_scipy_match_numeric_integration():
    scheduler = _PolynomialLMSDiscreteScheduler.from_config(BASE)
    scheduler.set_timesteps(10)
    sigmas = [float(s) for s in scheduler.sigmas]
    t = 5
    for order in range(1, 5):
        for current in range(order):
            grid = np.linspace(sigmas[t], sigmas[t + 1], 20001)
            basis = np.ones_like(grid)
            for k in range(order):
                if k != current:
                    basis *= (grid - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k])
            expected = np.trapezoid(basis, grid)
            assert scheduler.get_lms_coefficient(order, t, current) == pytest.approx(expected, 1e-6)
