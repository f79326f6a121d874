"""sdrt.runtime.schedulers without a reference: config resolution, refusals, plan and step contracts.
Needs neither torch nor diffusers (parity against diffusers is in test_schedulers.py)."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.schedulers import SCHEDULER_NAMES, load_scheduler

SHAPE = (2, 4, 8, 8)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


class NumpyRng:
    def __init__(self, seed: int = 0):
        self.generator = np.random.default_rng(seed)

    def randn(self, shape, dtype=np.float32):
        return self.generator.standard_normal(shape).astype(dtype)


# --- configuration -------------------------------------------------------------------------------


def test_class_name_picks_the_solver():
    assert load_scheduler(SD15).name == "pndm"
    classes = {
        "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler-a", "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
        "DPMSolverMultistepScheduler": "dpm++2m", "UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm",
    }
    for class_name, name in classes.items():
        assert load_scheduler({**SD15, "_class_name": class_name}).name == name


def test_options_not_read_by_the_solver_are_listed():
    sched = load_scheduler(SD15, "euler")
    assert sched.config.ignored_keys == ("clip_sample", "set_alpha_to_one", "skip_prk_steps")
    assert sched.config.timestep_spacing == "linspace"  # EulerDiscreteScheduler's default, as diffusers


def test_name_is_case_insensitive_and_overrides_apply():
    sched = load_scheduler(SD15, "Euler-Karras")
    assert sched.name == "euler-karras" and sched.config.use_karras_sigmas


@pytest.mark.parametrize(
    "name, option, value",
    [
        ("ddim", "thresholding", True),
        ("ddim", "beta_schedule", "sigmoid"),
        ("ddim", "prediction_type", "x0"),
        ("ddim", "timestep_spacing", "karras"),
        ("euler", "use_beta_sigmas", True),
        ("euler", "interpolation_type", "cubic"),
        ("euler-a", "prediction_type", "sample"),
        ("pndm", "prediction_type", "sample"),
        ("ddpm", "variance_type", "learned_range"),
        ("pndm", "rescale_betas_zero_snr", True),  # a model property PNDM cannot honour
        ("heun", "rescale_betas_zero_snr", True),
        ("ddim", "use_flow_sigmas", True),
        ("euler", "some_future_option", 3),
        ("dpm++2m", "algorithm_type", "dpmsolver"),  # the deprecated noise-prediction variants
        ("dpm++2m", "algorithm_type", "sde-dpmsolver"),
        ("dpm++2m", "solver_order", 3),
        ("dpm++2m", "variance_type", "learned_range"),
        ("dpm++2m-karras", "thresholding", True),
        ("unipc", "solver_order", 3),
        ("unipc", "predict_x0", False),
        ("lcm", "thresholding", True),
    ],
)
def test_unsupported_option_is_refused_by_name(name, option, value):
    with pytest.raises(UnsupportedConfigError, match=option) as error:
        load_scheduler({**SD15, option: value}, name)
    assert repr(value) in str(error.value)


def test_unsupported_class_is_refused_by_name():
    with pytest.raises(UnsupportedConfigError, match="KDPM2DiscreteScheduler"):
        load_scheduler({**SD15, "_class_name": "KDPM2DiscreteScheduler"})


def test_options_of_other_solvers_are_ignored_when_a_name_is_given():
    dpm = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 2, "algorithm_type": "dpmsolver++",
           "use_flow_sigmas": False, "lower_order_final": True}
    assert "solver_order" in load_scheduler(dpm, "euler").config.ignored_keys


def test_unknown_name_lists_known_names():
    with pytest.raises(InvalidInputError) as error:
        load_scheduler(SD15, "dpm++5m")
    for name in SCHEDULER_NAMES:
        assert name in str(error.value)


def test_config_without_class_name_needs_a_name():
    config = {k: v for k, v in SD15.items() if k != "_class_name"}
    with pytest.raises(InvalidInputError, match="_class_name"):
        load_scheduler(config)
    assert load_scheduler(config, "ddim").name == "ddim"


# --- plans and steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 1.5, True, 1001])
def test_bad_step_counts_are_rejected(steps):
    with pytest.raises(InvalidInputError, match="num_inference_steps"):
        load_scheduler(SD15, "ddim").plan(steps)


def test_bad_plan_options_are_rejected():
    with pytest.raises(InvalidInputError, match="eta"):
        load_scheduler(SD15, "euler").plan(10, eta=0.5)
    with pytest.raises(InvalidInputError, match="eta"):
        load_scheduler(SD15, "ddim").plan(10, eta=-1)
    for strength in (0.0, 1.5, 0.01):
        with pytest.raises(InvalidInputError, match="strength"):
            load_scheduler(SD15, "ddim").plan(10, strength=strength)


def test_lcm_refuses_more_steps_than_it_was_distilled_for():
    with pytest.raises(InvalidInputError, match="original_inference_steps"):
        load_scheduler(SD15, "lcm").plan(51)


@pytest.mark.parametrize("name", ["dpm++2m", "unipc"])
def test_multistep_state_is_returned_not_kept(name):
    sched = load_scheduler(SD15, name)
    plan = sched.plan(6)
    sample = np.ones(SHAPE, np.float32)
    state = sched.initial_state(plan)
    for i in range(3):
        output = np.full(SHAPE, 0.1 * (i + 1), np.float32)
        sample, state = sched.step(plan, i, output, sample, state, None)
    again, _ = sched.step(plan, 3, np.zeros(SHAPE, np.float32), sample, state, None)
    first, _ = sched.step(plan, 3, np.zeros(SHAPE, np.float32), sample, state, None)
    np.testing.assert_array_equal(first, again)
    fresh, _ = sched.step(plan, 3, np.zeros(SHAPE, np.float32), sample, None, None)
    assert not np.array_equal(first, fresh)  # the history changes the step


def test_heun_declares_two_evaluations_per_step():
    sched = load_scheduler(SD15, "heun")
    assert sched.evaluations_per_step == 2 and sched.plan(10).num_evaluations == 19
    assert load_scheduler(SD15, "euler").evaluations_per_step == 1


def test_plan_is_immutable_and_step_is_pure():
    sched = load_scheduler(SD15, "pndm")
    plan = sched.plan(10)
    with pytest.raises(ValueError):
        plan.timesteps[0] = 0
    sample = np.ones(SHAPE, np.float32)
    output = np.full(SHAPE, 0.5, np.float32)
    state = sched.initial_state(plan)
    first, state1 = sched.step(plan, 0, output, sample, state, None)
    again, _ = sched.step(plan, 0, output, sample, state, None)
    np.testing.assert_array_equal(first, again)
    assert np.all(sample == 1) and np.all(output == 0.5)
    assert state.ets == () and len(state1.ets) == 1  # the state passed in is unchanged; a new one comes back
    assert first is not sample


def test_step_checks_its_arguments():
    sched = load_scheduler(SD15, "euler-a")
    plan = sched.plan(4)
    sample = np.zeros(SHAPE, np.float32)
    with pytest.raises(InvalidInputError, match="rng"):
        sched.step(plan, 0, sample, sample, None, None)
    with pytest.raises(InvalidInputError, match="out of range"):
        sched.step(plan, 4, sample, sample, None, NumpyRng())
    with pytest.raises(InvalidInputError, match="shape"):
        sched.step(plan, 0, sample[:1], sample, None, NumpyRng())
    with pytest.raises(InvalidInputError, match="euler-a"):
        load_scheduler(SD15, "ddim").step(plan, 0, sample, sample, None, None)


def test_runtime_code_never_imports_torch():
    folder = pathlib.Path(__file__).resolve().parents[1] / "runtime" / "schedulers"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("torch", "diffusers", "transformers", "scipy"), (path.name, name)


def test_every_scheduler_runs_without_torch():
    from conftest import run_without_torch

    result = run_without_torch("""
        import numpy as np
        from sdrt.runtime.schedulers import SCHEDULER_NAMES, load_scheduler

        class Rng:
            def __init__(self):
                self.generator = np.random.default_rng(0)
            def randn(self, shape, dtype=np.float32):
                return self.generator.standard_normal(shape).astype(dtype)

        config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False}
        for name in SCHEDULER_NAMES:
            sched = load_scheduler(config, name)
            plan = sched.plan(5)
            sample = np.ones((1, 4, 2, 2), np.float32) * plan.init_noise_sigma
            state = sched.initial_state(plan)
            for i, t in enumerate(plan.timesteps):
                output = 0.5 * sched.scale_model_input(plan, i, sample)
                sample, state = sched.step(plan, i, output, sample, state, Rng())
            assert np.isfinite(sample).all(), name
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("name", ["dpm++2m", "unipc"])
def test_usual_name_on_a_flow_config_is_the_flow_solver(name):
    """A config that says use_flow_sigmas is a flow model's: its sampler's usual name means the flow variant (as
    "euler" means flow-euler on SD3/Flux folders)."""
    assert load_scheduler({**SD15, "use_flow_sigmas": True}, name).name == f"flow-{name}"
    assert load_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "euler").name == "flow-euler"
