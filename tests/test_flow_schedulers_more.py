"""flow-heun, flow-dpm++2m(-sde) and flow-unipc against diffusers' FlowMatchHeunDiscreteScheduler and
DPMSolverMultistepScheduler / UniPCMultistepScheduler with use_flow_sigmas: whole sampling loops on a fake velocity
model for SD3's config (shift 3) and Flux's (dynamic shifting, mu at two image sizes), the img2img strength cut,
the FlowMatch -> DPM/UniPC config mapping, and the refusals.

diffusers' side is built the way a user does: `FlowMatchHeunDiscreteScheduler.from_config(config)` and
`DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction",
flow_shift=config["shift"])`; both sides run the same loop from the same latents; every value is compared.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError  # noqa: E402
from sdrt.runtime.schedulers import FLOW_SCHEDULER_NAMES, SCHEDULER_NAMES, load_scheduler, registry  # noqa: E402
from sdrt.runtime.schedulers.flow import flux_mu, flux_sigmas  # noqa: E402
from tests.reference import fake_velocity, run_flow_loop  # noqa: E402

TOLERANCE = 1e-6
WORST: dict[str, float] = {}  # scheduler name -> max abs error over every comparison, for reports
SHAPE = (1, 16, 8, 8)

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}
# Wan2.1-T2V's scheduler/scheduler_config.json: UniPC itself, with flow sigmas
WAN = {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0", "beta_end": 0.02,
       "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
       "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
       "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
       "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
       "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
       "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}

SEQ_LENS = (256, 4096)  # Flux image tokens of a 256² and a 1024² image
STEPS = (1, 2, 4, 10)
MULTISTEP = {"flow-dpm++2m": DPMSolverMultistepScheduler, "flow-dpm++2m-sde": DPMSolverMultistepScheduler,
             "flow-unipc": UniPCMultistepScheduler}



def reference_scheduler(name: str, config: dict):
    """diffusers' scheduler for the sdrt name, built from `config` as a diffusers user does."""
    if name == "flow-heun":
        return FlowMatchHeunDiscreteScheduler.from_config(config)
    extra = {} if config.get("use_flow_sigmas") else {"flow_shift": config.get("shift", 1.0)}
    if name == "flow-dpm++2m-sde":
        extra["algorithm_type"] = "sde-dpmsolver++"
    return MULTISTEP[name].from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction", **extra)


def reference_mu(config: dict, seq_len: int) -> float | None:
    """mu as FluxPipeline / StableDiffusion3Pipeline compute it from the scheduler's config (dynamic shifting only)."""
    if not config.get("use_dynamic_shifting"):
        return None
    c = config
    return calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def record(name: str, ours: np.ndarray, reference, what: str) -> None:
    reference = np.asarray(reference)
    assert ours.shape == reference.shape, what
    error = float(np.max(np.abs(ours.astype(np.float64) - reference.astype(np.float64)))) if ours.size else 0.0
    WORST[name] = max(WORST.get(name, 0.0), error)
    assert error <= TOLERANCE, f"{name} {what}: max abs error {error:.3g} > {TOLERANCE:.3g}"


def run_diffusers(name, config, steps, latents, mu=None, sigmas=None, strength=None, seed=0):
    """The loop as StableDiffusion3Pipeline / FluxPipeline (and their img2img pipelines) drive it."""
    sched = reference_scheduler(name, config)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        kwargs["sigmas"] = np.array(sigmas)  # UniPC lowers a first sigma of 1 in place
    sched.set_timesteps(steps, **kwargs)
    timesteps, sigma_table = sched.timesteps, sched.sigmas.numpy().copy()
    generator = torch.Generator("cpu").manual_seed(seed)
    if strength is None:
        sample = torch.from_numpy(latents)
    else:  # get_timesteps + prepare_latents: FlowMatch classes have scale_noise, DPM/UniPC add_noise
        t_start = int(max(steps - min(steps * strength, steps), 0))
        timesteps = timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)
        noise = torch.from_numpy(latents[:, ::-1].copy())
        if name == "flow-heun":
            sample = sched.scale_noise(torch.from_numpy(latents), timesteps[:1], noise)
        else:
            sample = sched.add_noise(torch.from_numpy(latents), noise, timesteps[:1])
    samples = [sample.numpy().copy()]
    for t in timesteps:
        model_output = torch.from_numpy(fake_velocity(sample.numpy(), float(t)))
        step_kwargs = {"generator": generator} if name in ("flow-heun", "flow-dpm++2m-sde") else {}
        sample = sched.step(model_output, t, sample, **step_kwargs).prev_sample
        samples.append(sample.numpy().copy())
    return timesteps.numpy(), sigma_table, samples


def run_sdrt(name, config, steps, latents, mu=None, sigmas=None, strength=None, seed=0):
    sched = load_scheduler(config, name)
    plan = sched.plan(steps, strength=strength, mu=mu, sigmas=sigmas)
    return plan, run_flow_loop(sched, plan, latents, strength, seed)


def assert_loop_parity(name, config, steps, seq_len=1024, strength=None, flux_sigmas_=False, seed=0):
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1000 + seed)).numpy()
    mu = reference_mu(config, seq_len)
    sigmas = flux_sigmas(steps) if flux_sigmas_ else None
    ref_t, ref_sigmas, ref_samples = run_diffusers(name, config, steps, latents, mu, sigmas, strength, seed)
    sched = load_scheduler(config, name)
    ours_mu = flux_mu(seq_len, sched.config) if sched.config.use_dynamic_shifting else None
    assert ours_mu == mu  # the mapped config keeps Flux's base/max shift and sequence lengths
    plan, samples = run_sdrt(name, config, steps, latents, ours_mu, sigmas, strength, seed)
    assert plan.init_noise_sigma == 1.0 and plan.prediction_type == "flow_prediction"
    assert plan.num_evaluations == len(ref_t) == len(samples) - 1
    record(name, plan.timesteps.astype(np.float64), ref_t, "timesteps")
    if strength is None:
        ref_noise = np.stack([1 - ref_sigmas[:-1], ref_sigmas[:-1]], axis=1).astype(np.float32)
        record(name, plan.noise_coefficients, ref_noise, "sigmas (add_noise coefficients)")
    for k, (ours, reference) in enumerate(zip(samples, ref_samples)):
        assert ours.dtype == np.float32
        record(name, ours, reference, f"sample {k}")


# --- whole loops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", [SD3, FLUX_SCHNELL, {**SD3, "shift": 1.0}], ids=["sd3", "schnell", "shift-1"])
def test_flow_heun_loop_matches_diffusers(config, steps):
    assert_loop_parity("flow-heun", config, steps)
    assert load_scheduler(config, "flow-heun").plan(steps).num_evaluations == 2 * steps - 1


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(MULTISTEP))
def test_multistep_sd3_loop_matches_diffusers(name, steps):
    assert_loop_parity(name, SD3, steps)
    assert_loop_parity(name, FLUX_SCHNELL, steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(MULTISTEP))
def test_multistep_flux_loop_matches_diffusers_at_two_image_sizes(name, steps):
    for seq_len in SEQ_LENS:
        assert_loop_parity(name, FLUX_DEV, steps, seq_len=seq_len)


@pytest.mark.parametrize("steps", [2, 4, 10])
@pytest.mark.parametrize("config", [
    WAN,  # a UniPC config of its own (flow_shift 3)
    {**SD3, "shift_terminal": 0.1},  # UniPC reads shift_terminal
    {**FLUX_DEV, "time_shift_type": "linear"},  # and the linear time shift
    {**SD3, "final_sigmas_type": "sigma_min"},
    {**SD3, "solver_order": 1},
    {**SD3, "disable_corrector": [0, 2]},
    # bh1 with a final sigma of 0: diffusers multiplies B(h) = -inf by a zero residual (NaN), sdrt skips it
    {**SD3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
], ids=["wan", "terminal", "linear", "sigma-min", "order-1", "no-corrector", "bh1"])
def test_unipc_variants_match_diffusers(config, steps):
    assert_loop_parity("flow-unipc", config, steps)


@pytest.mark.parametrize("steps", [1, 4, 10])
@pytest.mark.parametrize("config", [SD3, FLUX_DEV], ids=["sd3", "flux-dev"])
def test_unipc_takes_flux_sigmas(config, steps):
    assert_loop_parity("flow-unipc", config, steps, flux_sigmas_=True)


@pytest.mark.parametrize("steps", [2, 4, 10])
@pytest.mark.parametrize("config", [
    {**SD3, "_class_name": "DPMSolverMultistepScheduler", "flow_shift": 5.0, "use_flow_sigmas": True,
     "prediction_type": "flow_prediction"},
    {**SD3, "solver_type": "heun"},
    {**SD3, "final_sigmas_type": "sigma_min"},
    {**SD3, "solver_order": 1},
    {**SD3, "euler_at_final": True, "lower_order_final": False},
], ids=["dpm-config", "heun", "sigma-min", "order-1", "euler-at-final"])
def test_dpm_variants_match_diffusers(config, steps):
    assert_loop_parity("flow-dpm++2m", config, steps)


@pytest.mark.parametrize("seed", [0, 1])
def test_dpm_sde_stream_matches_diffusers(seed):
    assert_loop_parity("flow-dpm++2m-sde", FLUX_DEV, 8, seq_len=4096, seed=seed)


@pytest.mark.parametrize("strength", [0.3, 0.55, 0.95, 1.0])
@pytest.mark.parametrize("name, config", [("flow-heun", SD3), ("flow-heun", FLUX_SCHNELL),
                                          ("flow-dpm++2m", SD3), ("flow-dpm++2m", FLUX_DEV),
                                          ("flow-unipc", SD3), ("flow-unipc", FLUX_DEV)])
def test_img2img_strength_matches_diffusers(name, config, strength):
    """Cut as the SD3/Flux img2img pipelines: skip int(n - n * strength) steps (times the evaluations per step)."""
    for steps in (4, 10):
        assert_loop_parity(name, config, steps, strength=strength, seed=3)


def test_img2img_cut_is_the_flow_pipelines():
    for name in ("flow-heun", "flow-dpm++2m", "flow-unipc"):
        plan = load_scheduler(SD3, name).plan(10, strength=0.55)
        assert plan.num_inference_steps == 6, name
    assert load_scheduler(SD3, "flow-heun").plan(10, strength=0.55).num_evaluations == 11


# --- configuration -----------------------------------------------------------------------------------


def test_names_and_class_defaults():
    assert set(FLOW_SCHEDULER_NAMES) >= {"flow-euler", "flow-heun", "flow-dpm++2m", "flow-dpm++2m-sde", "flow-unipc"}
    assert not set(FLOW_SCHEDULER_NAMES) & set(SCHEDULER_NAMES)
    solver, _ = registry._SCHEDULERS["flow-heun"]
    reference = FlowMatchHeunDiscreteScheduler().config
    assert dict(solver.class_defaults) == {k: v for k, v in reference.items() if not k.startswith("_")}
    assert registry.load_scheduler(SD3, "flow-heun").evaluations_per_step == 2
    heun_file = dict(FlowMatchHeunDiscreteScheduler.from_config(SD3).config)
    assert load_scheduler({k: v for k, v in heun_file.items() if k != "_use_default_values"}).name == "flow-heun"
    assert load_scheduler(SD3).name == "flow-euler"  # the FlowMatch Euler file still picks flow-euler


def test_flow_euler_config_maps_to_dpm_as_diffusers_from_config():
    """shift -> flow_shift; use_dynamic_shifting and the mu options carried; diffusers' config agrees."""
    for config in (SD3, FLUX_DEV):
        for name in MULTISTEP:
            ours = load_scheduler(config, name).config
            reference = reference_scheduler(name, config).config
            assert ours.use_flow_sigmas and ours.prediction_type == "flow_prediction"
            assert ours.flow_shift == reference.flow_shift == config["shift"]
            assert ours.use_dynamic_shifting == reference.use_dynamic_shifting
            for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
                assert getattr(ours, key) == reference.get(key, getattr(ours, key))
            assert "shift" not in ours.ignored_keys and "base_shift" not in ours.ignored_keys


def test_a_flow_dpm_or_unipc_file_loads_as_a_flow_scheduler():
    assert load_scheduler(WAN).name == "flow-unipc" and load_scheduler(WAN).config.flow_shift == 3.0
    dpm = {**SD3, "_class_name": "DPMSolverMultistepScheduler", "flow_shift": 5.0, "use_flow_sigmas": True,
           "prediction_type": "flow_prediction"}
    sched = load_scheduler(dpm)
    assert sched.name == "flow-dpm++2m" and sched.config.flow_shift == 5.0  # the file's flow_shift, not shift
    # a DPM config saved by diffusers after from_config(FLUX_DEV, ...) carries shift and the mu options too
    saved = {**FLUX_DEV, **dict(reference_scheduler("flow-dpm++2m", FLUX_DEV).config)}
    saved = {k: v for k, v in saved.items() if k != "_use_default_values"}
    assert load_scheduler(saved).name == "flow-dpm++2m"
    # prediction_type alone marks it too
    assert load_scheduler({**WAN, "use_flow_sigmas": True, "_class_name": "DPMSolverMultistepScheduler"}).name \
        == "flow-dpm++2m"


# --- refusals ----------------------------------------------------------------------------------------


def test_flow_and_noise_prediction_configs_do_not_mix():
    with pytest.raises(UnsupportedConfigError, match="flow-dpm\\+\\+2m.*PNDMScheduler"):
        load_scheduler(SD15, "flow-dpm++2m")
    with pytest.raises(UnsupportedConfigError, match="flow-heun.*PNDMScheduler"):
        load_scheduler(SD15, "flow-heun")
    # A flow config's usual sampler names are the flow variants (sdrt.runtime.schedulers.registry)
    assert load_scheduler(WAN, "dpm++2m").name == "flow-dpm++2m"
    assert load_scheduler({**SD15, "prediction_type": "flow_prediction"}, "unipc").name == "flow-unipc"
    with pytest.raises(UnsupportedConfigError, match="ddim.*use_flow_sigmas=True"):
        load_scheduler(WAN, "ddim")  # no flow variant
    with pytest.raises(UnsupportedConfigError, match="use_flow_sigmas=False"):
        load_scheduler({**WAN, "use_flow_sigmas": False}, "flow-unipc")


def test_heun_cannot_honour_dynamic_shifting():
    """FlowMatchHeunDiscreteScheduler has no mu: a Flux-dev config would sample with the wrong schedule."""
    with pytest.raises(UnsupportedConfigError, match="use_dynamic_shifting"):
        load_scheduler(FLUX_DEV, "flow-heun")
    with pytest.raises(UnsupportedConfigError, match="shift_terminal"):
        load_scheduler({**SD3, "shift_terminal": 0.1}, "flow-dpm++2m")  # DPM reads no shift_terminal


@pytest.mark.parametrize("name, option, value", [
    ("flow-dpm++2m", "use_karras_sigmas", True),
    ("flow-dpm++2m", "use_lu_lambdas", True),
    ("flow-dpm++2m", "solver_order", 3),
    ("flow-dpm++2m", "time_shift_type", "linear"),
    ("flow-unipc", "use_karras_sigmas", True),
    ("flow-unipc", "use_exponential_sigmas", True),
    ("flow-unipc", "predict_x0", False),
    ("flow-dpm++2m", "invert_sigmas", True),
    ("flow-heun", "some_future_option", 3),
])
def test_unsupported_options_are_refused_by_name(name, option, value):
    with pytest.raises(UnsupportedConfigError, match=option):
        load_scheduler({**SD3, option: value}, name)


def test_plan_arguments_are_checked():
    for name in ("flow-dpm++2m", "flow-unipc"):
        with pytest.raises(InvalidInputError, match="use_dynamic_shifting: pass mu"):
            load_scheduler(FLUX_DEV, name).plan(4)
        with pytest.raises(InvalidInputError, match="mu=0.5 applies only with use_dynamic_shifting"):
            load_scheduler(SD3, name).plan(4, mu=0.5)
    for name in ("flow-heun", "flow-dpm++2m"):  # their set_timesteps take no sigmas
        with pytest.raises(InvalidInputError, match="sigmas="):
            load_scheduler(SD3, name).plan(2, sigmas=[1.0, 0.5])
    with pytest.raises(InvalidInputError, match="mu="):
        load_scheduler(SD3, "flow-heun").plan(2, mu=0.5)
    with pytest.raises(InvalidInputError, match=r"\(0, 1\]"):
        load_scheduler(SD3, "flow-unipc").plan(2, sigmas=[1.5, 0.5])
    with pytest.raises(InvalidInputError, match="not finite"):
        load_scheduler({**SD3, "shift_terminal": 0.1}, "flow-unipc").plan(1)
    with pytest.raises(InvalidInputError, match="flow_shift must be > 0"):
        load_scheduler({**WAN, "flow_shift": 0.0})


def test_new_flow_schedulers_run_without_torch():
    from conftest import run_without_torch

    result = run_without_torch("""
        import numpy as np
        from sdrt.runtime.schedulers import load_scheduler
        from sdrt.runtime.schedulers.flow import flux_mu

        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "shift": 3.0}
        for name in ("flow-dpm++2m", "flow-unipc"):
            sched = load_scheduler(config, name)
            plan = sched.plan(4, mu=flux_mu(4096, sched.config))
            sample, state = np.ones((1, 16, 2, 2), np.float32), sched.initial_state(plan)
            for i, t in enumerate(plan.timesteps):
                sample, state = sched.step(plan, i, 0.5 * sample, sample, state)
            assert np.isfinite(sample).all()
        sched = load_scheduler({**config, "use_dynamic_shifting": False}, "flow-heun")
        plan = sched.plan(3)
        sample, state = np.ones((1, 16, 2, 2), np.float32), None
        for i, t in enumerate(plan.timesteps):
            sample, state = sched.step(plan, i, 0.5 * sample, sample, state)
        assert np.isfinite(sample).all()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_report_worst_errors():
    """Runs last: prints the max abs error per scheduler (pytest -s)."""
    print("\nmax abs error vs diffusers:", {k: f"{v:.3g}" for k, v in sorted(WORST.items())})
