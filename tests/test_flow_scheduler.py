"""flow-euler (sdrt.runtime.schedulers.flow) against diffusers' FlowMatchEulerDiscreteScheduler: timesteps and
sigmas for SD3's and Flux's configs, whole sampling loops on a fake velocity model, img2img's scale_noise and
strength plans as the SD3/Flux img2img pipelines cut them, Flux's mu, and the refusals.

Both sides run the same loop from the same latents; the fake model output is one NumPy function of the model
input and timestep. Every value is compared against diffusers; the flow formulas are the same float32
operations in the same order, so the errors are expected to be (and are) zero.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError  # noqa: E402
from tests.reference import fake_velocity, run_flow_loop  # noqa: E402
from sdrt.runtime.schedulers import FLOW_SCHEDULER_NAMES, SCHEDULER_NAMES, load_scheduler, registry  # noqa: E402
from sdrt.runtime.schedulers.flow import flux_mu, flux_sigmas  # noqa: E402

TOLERANCE = 1e-6  # float32: the same operations in the same order; measured 0 (see WORST)
WORST: list[float] = []  # max abs error of every comparison, for reports
SHAPE = (1, 16, 8, 8)

# stabilityai/stable-diffusion-3-medium-diffusers (and 3.5-large / 3.5-medium) scheduler/scheduler_config.json
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}

# Flux image token counts: (height / 16) * (width / 16) for 256², 512², 768x1024, 1024², 1536x2048
SEQ_LENS = [256, 1024, 3072, 4096, 12288]

VARIANTS = {
    "sd3": SD3,
    "shift-1": {**SD3, "shift": 1.0},
    "terminal": {**SD3, "shift_terminal": 0.1},
    "karras": {**SD3, "use_karras_sigmas": True},
    "exponential": {**SD3, "use_exponential_sigmas": True},
    "invert": {**SD3, "invert_sigmas": True},
    "flux-dev": FLUX_DEV,
    "flux-linear": {**FLUX_DEV, "time_shift_type": "linear"},
    "flux-terminal": {**FLUX_DEV, "shift_terminal": 0.02},
    "flux-karras": {**FLUX_DEV, "use_karras_sigmas": True},
    "flux-schnell": FLUX_SCHNELL,
}




def schedule_kwargs(config: dict, steps: int, seq_len: int, flux_style: bool) -> dict:
    """What the SD3 / Flux pipelines pass to set_timesteps: Flux its sigmas and always mu (ignored by a static
    shift, as in FLUX.1-schnell's config); SD3 mu with dynamic shifting only. sdrt takes mu only where it counts."""
    kwargs = {}
    if flux_style:
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if flux_style or config.get("use_dynamic_shifting"):
        reference = FlowMatchEulerDiscreteScheduler.from_config(config).config
        kwargs["mu"] = calculate_shift(seq_len, reference.get("base_image_seq_len", 256),
                                       reference.get("max_image_seq_len", 4096), reference.get("base_shift", 0.5),
                                       reference.get("max_shift", 1.15))
    return kwargs


def sdrt_kwargs(config: dict, steps: int, seq_len: int, flux_style: bool) -> dict:
    sched = load_scheduler(config)
    kwargs = {}
    if flux_style:
        kwargs["sigmas"] = flux_sigmas(steps)
    if sched.config.use_dynamic_shifting:
        kwargs["mu"] = flux_mu(seq_len, sched.config)
    return kwargs


def assert_close(ours: np.ndarray, reference: np.ndarray, what: str, tolerance: float = TOLERANCE) -> None:
    reference = np.asarray(reference)
    assert ours.dtype == np.float32 and ours.shape == reference.shape, what
    error = float(np.max(np.abs(ours.astype(np.float64) - reference))) if ours.size else 0.0
    WORST.append(error)
    assert error <= tolerance, f"{what}: max abs error {error:.3g} > {tolerance:.3g}"


def run_diffusers(config, steps, latents, kwargs, strength=None, seed=0):
    """diffusers' loop as StableDiffusion3Pipeline / FluxPipeline (and their img2img pipelines) drive it."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps, **kwargs)
    timesteps, sigmas = sched.timesteps, sched.sigmas
    generator = torch.Generator("cpu").manual_seed(seed)
    if strength is None:
        sample = torch.from_numpy(latents)
    else:  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = int(max(steps - min(steps * strength, steps), 0))
        timesteps = timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)
        noise = torch.from_numpy(latents[:, ::-1].copy())
        sample = sched.scale_noise(torch.from_numpy(latents), timesteps[:1], noise)
    samples = [sample.numpy().copy()]
    for t in timesteps:
        model_output = torch.from_numpy(fake_velocity(sample.numpy(), float(t)))
        sample = sched.step(model_output, t, sample, generator=generator).prev_sample
        samples.append(sample.numpy().copy())
    return timesteps.numpy(), sigmas.numpy(), samples


def run_sdrt(config, steps, latents, kwargs, strength=None, seed=0):
    sched = load_scheduler(config)
    plan = sched.plan(steps, strength=strength, **kwargs)
    return plan, run_flow_loop(sched, plan, latents, strength, seed)


def assert_loop_parity(config, steps, seq_len=1024, flux_style=False, strength=None, seed=0):
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1000 + seed)).numpy()
    ref_t, ref_sigmas, ref_samples = run_diffusers(config, steps, latents,
                                                   schedule_kwargs(config, steps, seq_len, flux_style), strength, seed)
    plan, samples = run_sdrt(config, steps, latents, sdrt_kwargs(config, steps, seq_len, flux_style), strength, seed)
    assert plan.timesteps.dtype == np.float32 and plan.init_noise_sigma == 1.0
    assert plan.num_inference_steps == len(ref_t) == len(samples) - 1
    assert_close(plan.timesteps, ref_t, "timesteps")
    if strength is None:
        assert_close(np.append(plan.coefficients.sigma, plan.coefficients.sigma_next[-1:]), ref_sigmas, "sigmas")
    for k, (ours, reference) in enumerate(zip(samples, ref_samples)):
        assert_close(ours, reference, f"sample {k}")


# --- schedules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("variant", VARIANTS)
def test_timesteps_and_sigmas_match_diffusers(variant, steps):
    config = VARIANTS[variant]
    if config.get("shift_terminal") and steps == 1:  # diffusers' stretch divides 0 by 0: NaN sigmas
        with pytest.raises(InvalidInputError, match="shift_terminal"):
            load_scheduler(config).plan(steps, **sdrt_kwargs(config, steps, 1024, False))
        return
    for seq_len in SEQ_LENS if config.get("use_dynamic_shifting") else [1024]:
        for flux_style in (False, True):
            reference = FlowMatchEulerDiscreteScheduler.from_config(config)
            reference.set_timesteps(steps, **schedule_kwargs(config, steps, seq_len, flux_style))
            plan = load_scheduler(config).plan(steps, **sdrt_kwargs(config, steps, seq_len, flux_style))
            c = plan.coefficients
            assert_close(plan.timesteps, reference.timesteps.numpy(), f"timesteps {seq_len} {flux_style}")
            assert_close(np.append(c.sigma, c.sigma_next[-1]), reference.sigmas.numpy(), f"sigmas {seq_len}")


def test_flux_mu_is_diffusers_calculate_shift():
    sched = load_scheduler(FLUX_DEV)
    for seq_len in SEQ_LENS + [1, 4095, 65536]:
        assert flux_mu(seq_len, sched.config) == calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    other = load_scheduler({**FLUX_DEV, "base_shift": 0.3, "max_shift": 1.5, "max_image_seq_len": 8192}).config
    assert flux_mu(2048, other) == calculate_shift(2048, 256, 8192, 0.3, 1.5)
    np.testing.assert_array_equal(flux_sigmas(7), np.linspace(1.0, 1 / 7, 7))


def test_sd3_shift_is_applied_twice_as_diffusers_does():
    """diffusers shifts the training table in __init__ and the inference sigmas again in set_timesteps; SD3's
    images come from that schedule, so sdrt keeps it."""
    plan = load_scheduler(SD3).plan(28)
    once = 3.0 * np.linspace(1, 0.001, 28) / (1 + 2.0 * np.linspace(1, 0.001, 28))
    assert plan.coefficients.sigma[-1] > once[-1] * 1.5


# --- whole loops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("variant", VARIANTS)
def test_loop_matches_diffusers(variant, steps):
    config = VARIANTS[variant]
    if config.get("shift_terminal") and steps == 1:
        return  # NaN in diffusers, refused by sdrt (test_timesteps_and_sigmas_match_diffusers)
    flux = variant.startswith("flux")
    assert_loop_parity(config, steps, seq_len=1024, flux_style=flux)
    if config.get("use_dynamic_shifting"):
        assert_loop_parity(config, steps, seq_len=4096, flux_style=flux)  # a second image size


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("config", [{**SD3, "stochastic_sampling": True},
                                    {**FLUX_DEV, "stochastic_sampling": True}])
def test_stochastic_sampling_matches_diffusers_stream(config, seed):
    assert_loop_parity(config, 8, flux_style=config.get("use_dynamic_shifting", False), seed=seed)


@pytest.mark.parametrize("strength", [0.3, 0.55, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("variant", ["sd3", "flux-dev", "flux-schnell"])
def test_img2img_strength_matches_diffusers(variant, strength):
    config = VARIANTS[variant]
    for steps in (4, 10, 28):
        assert_loop_parity(config, steps, flux_style=variant.startswith("flux"), strength=strength, seed=3)


def test_img2img_cut_is_the_flow_pipelines_not_stable_diffusions():
    """10 steps at strength 0.55: SD3/Flux img2img run 6 (they skip int(10 - 5.5) = 4), SD's 5 (int(5.5))."""
    assert load_scheduler(SD3).plan(10, strength=0.55).num_inference_steps == 6
    assert load_scheduler(SD15, "euler").plan(10, strength=0.55).num_inference_steps == 5


def test_scale_noise_matches_diffusers_at_every_step():
    original = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(11))
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(12))
    for config, kwargs in ((SD3, {}), (FLUX_DEV, {"mu": flux_mu(1024, load_scheduler(FLUX_DEV).config)})):
        reference = FlowMatchEulerDiscreteScheduler.from_config(config)
        reference.set_timesteps(10, **kwargs)
        sched = load_scheduler(config)
        plan = sched.plan(10, **kwargs)
        for i in range(plan.num_evaluations):
            reference.set_begin_index(i)
            expected = reference.scale_noise(original, reference.timesteps[i:i + 1], noise)
            assert_close(sched.add_noise(plan, original.numpy(), noise.numpy(), i), expected.numpy(), f"step {i}")


# --- configuration and refusals ----------------------------------------------------------------------


def test_class_defaults_are_diffusers_defaults():
    solver, _ = registry._SCHEDULERS["flow-euler"]
    reference = FlowMatchEulerDiscreteScheduler().config
    assert dict(solver.class_defaults) == {k: v for k, v in reference.items() if not k.startswith("_")}


def test_class_name_picks_flow_euler_and_names_are_separate():
    assert "flow-euler" in FLOW_SCHEDULER_NAMES and not set(FLOW_SCHEDULER_NAMES) & set(SCHEDULER_NAMES)
    for config in (SD3, FLUX_DEV, FLUX_SCHNELL):
        sched = load_scheduler(config)
        assert sched.name == "flow-euler" and sched.config.ignored_keys == ()
    assert load_scheduler(SD3).config.shift == 3.0 and load_scheduler(FLUX_DEV).config.use_dynamic_shifting


@pytest.mark.parametrize(
    "option, value",
    [
        ("use_beta_sigmas", True),  # needs scipy's beta quantiles
        ("time_shift_type", "cubic"),
        ("prediction_type", "epsilon"),  # an SD option FlowMatchEulerDiscreteScheduler does not read: listed
    ],
)
def test_unsupported_option_is_refused_by_name(option, value):
    if option == "prediction_type":
        assert load_scheduler({**SD3, option: value}).config.ignored_keys == ("prediction_type",)
        return
    with pytest.raises(UnsupportedConfigError, match=option) as error:
        load_scheduler({**SD3, option: value})
    assert repr(value) in str(error.value)


@pytest.mark.parametrize("option, value", [("shift", 0.0), ("shift", -3.0), ("shift", "3"), ("shift_terminal", 1.0),
                                           ("base_image_seq_len", 256.5), ("stochastic_sampling", "yes")])
def test_bad_option_values_are_refused(option, value):
    with pytest.raises(InvalidInputError, match=option):
        load_scheduler({**SD3, option: value})


def test_flow_and_noise_prediction_configs_do_not_mix():
    with pytest.raises(UnsupportedConfigError, match="flow-euler.*PNDMScheduler"):
        load_scheduler(SD15, "flow-euler")
    # On a flow model's config a sampler's usual name is its flow variant ("euler" = flow-euler, as A1111/ComfyUI)
    assert load_scheduler(FLUX_SCHNELL, "euler").name == "flow-euler"
    with pytest.raises(UnsupportedConfigError, match="euler-a.*FlowMatchEulerDiscreteScheduler"):
        load_scheduler(FLUX_SCHNELL, "euler-a")  # no flow variant
    with pytest.raises(UnsupportedConfigError, match="shift"):
        load_scheduler({**SD15, "shift": 3.0}, "euler")  # a model option Euler cannot honour
    config = {k: v for k, v in SD3.items() if k != "_class_name"}
    assert load_scheduler(config, "flow-euler").config.shift == 3.0


def test_plan_arguments_are_checked():
    sd3, dev = load_scheduler(SD3), load_scheduler(FLUX_DEV)
    with pytest.raises(InvalidInputError, match="use_dynamic_shifting: pass mu"):
        dev.plan(4)
    with pytest.raises(InvalidInputError, match="mu=0.5 applies only with use_dynamic_shifting"):
        sd3.plan(4, mu=0.5)
    with pytest.raises(InvalidInputError, match="4 finite numbers"):
        sd3.plan(4, sigmas=[1.0, 0.5])
    with pytest.raises(InvalidInputError, match=r"\(0, 1\]"):
        sd3.plan(2, sigmas=[1.5, 0.5])
    with pytest.raises(InvalidInputError, match="mu must be a finite number"):
        dev.plan(4, mu=float("nan"))
    with pytest.raises(InvalidInputError, match="sigmas= sets a flow-matching schedule"):
        load_scheduler(SD15, "euler").plan(4, sigmas=[1.0, 0.7, 0.4, 0.1])
    with pytest.raises(InvalidInputError, match="mu= sets a flow-matching schedule"):
        load_scheduler(SD15, "dpm++2m").plan(4, mu=1.0)
    with pytest.raises(InvalidInputError, match="no schedule built for an img2img strength"):
        sd3.plan(4, strength=0.5, strength_in_schedule=True)
    with pytest.raises(UnsupportedConfigError, match="use_karras_sigmas and use_exponential_sigmas"):
        load_scheduler({**SD3, "use_karras_sigmas": True, "use_exponential_sigmas": True}).plan(4)
    with pytest.raises(UnsupportedConfigError, match="base_shift"):
        flux_mu(1024, load_scheduler({**FLUX_DEV, "base_shift": None}).config)
    with pytest.raises(InvalidInputError, match="image_seq_len"):
        flux_mu(0, dev.config)


def test_stochastic_sampling_needs_rng_and_plans_are_immutable():
    sched = load_scheduler({**SD3, "stochastic_sampling": True})
    plan = sched.plan(4)
    sample = np.ones(SHAPE, np.float32)
    with pytest.raises(InvalidInputError, match="rng"):
        sched.step(plan, 0, sample, sample, None, None)
    with pytest.raises(ValueError):
        plan.coefficients.dt[0] = 0
    with pytest.raises(InvalidInputError, match="flow-euler"):
        load_scheduler(SD15, "euler").step(plan, 0, sample, sample, None, None)


def test_flow_euler_runs_without_torch():
    from conftest import run_without_torch

    result = run_without_torch("""
        import numpy as np
        from sdrt.runtime.schedulers import load_scheduler
        from sdrt.runtime.schedulers.flow import flux_mu, flux_sigmas

        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "shift": 3.0}
        sched = load_scheduler(config)
        plan = sched.plan(4, sigmas=flux_sigmas(4), mu=flux_mu(4096, sched.config))
        sample = np.ones((1, 16, 2, 2), np.float32)
        for i, t in enumerate(plan.timesteps):
            sample, _ = sched.step(plan, i, 0.5 * sched.scale_model_input(plan, i, sample), sample, None)
        assert np.isfinite(sample).all()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
