"""sdrt.runtime.schedulers against diffusers: whole sampling loops on a fake model, add_noise,
img2img truncation, and config defaults (contracts and refusals: test_schedulers_config.py).

Both sides run the same loop from the same latents; the fake model output is one NumPy function of
the UNet input and timestep. Stochastic samplers draw from a torch CPU generator on both sides.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.reference import TorchStreamRng  # noqa: E402
from sdrt.runtime.schedulers import SCHEDULER_NAMES, load_scheduler  # noqa: E402
from sdrt.runtime.schedulers import registry  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' np.array(tensor) calls

TOLERANCE = 1e-5
ULPS = 8
F32_EPS = float(np.finfo(np.float32).eps)
WORST: list[tuple[float, float]] = []  # (max abs error, error / allowed) of every comparison, for reports
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

# registry name -> (diffusers class, from_config overrides)
DIFFUSERS_EQUIVALENT = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun-karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m-sde-karras": (
        "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
DPM = {"dpm++2m", "dpm++2m-karras", "dpm++2m-sde", "dpm++2m-sde-karras"}
UNIPC = {"unipc", "unipc-karras"}
STOCHASTIC = {"euler-a", "ddpm", "dpm++2m-sde", "dpm++2m-sde-karras", "lcm"}
PREDICTS_SAMPLE = {
    "ddim", "ddpm", "euler", "euler-karras", "heun", "heun-karras", "lms", "lms-karras", *DPM, *UNIPC, "lcm",
}
ZERO_SNR = {"ddim", "ddpm", "euler", "euler-karras", "euler-a", *DPM, *UNIPC, "lcm"}
CLIPS = {"ddim", "ddpm", "heun", "heun-karras", "lcm"}

VARIANTS = {
    "sd15": {},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
    "v": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "zsnr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "clip": {"clip_sample": True, "clip_sample_range": 1.0},
    "linear-betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine-betas": {"beta_schedule": "squaredcos_cap_v2"},
    "alpha-to-one": {"set_alpha_to_one": True},
    "offset-0": {"steps_offset": 0, "timestep_spacing": "leading"},
    "trained-betas": {"trained_betas": [0.0001 + 0.00002 * i for i in range(1000)]},
}

# stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0 scheduler_config.json
SD21 = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}


def _variant_applies(name: str, variant: str) -> bool:
    return {
        "sample": name in PREDICTS_SAMPLE,
        "zsnr": name in ZERO_SNR,
        "clip": name in CLIPS,
    }.get(variant, True)


VARIANT_CASES = [
    (name, variant, steps)
    for name in SCHEDULER_NAMES
    for variant in VARIANTS
    for steps in (4, 25)
    if _variant_applies(name, variant)
]


_PATTERN = np.linspace(-1.0, 1.0, int(np.prod(SHAPE[1:])), dtype=np.float32).reshape(SHAPE[1:])


def fake_model(model_input: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: a fixed function of its input and timestep. Roughly the
    ideal noise prediction for Gaussian data (sqrt(1 - alpha_bar) x_t), so samples keep a realistic scale."""
    weight = np.float32(np.sqrt(max(t, 0.0) / 1000))
    return (weight * model_input + np.float32(0.1) * np.sin(np.float32(t / 100) + _PATTERN)).astype(np.float32)


@pytest.fixture(autouse=True)
def _scipy_free_lms(monkeypatch):
    """diffusers' LMS integrates with scipy.integrate.quad; without scipy, use Gauss-Legendre
    (exact, like quad, for the cubic integrands) on diffusers' own integrand."""
    try:
        import scipy.integrate  # noqa: F401
    except ImportError:
        from diffusers.schedulers import scheduling_lms_discrete

        class _Integrate:
            @staticmethod
            def quad(f, a, b, epsrel=None):
                nodes, weights = np.polynomial.legendre.leggauss(8)
                a, b = float(a), float(b)
                values = [float(f((b - a) / 2 * x + (b + a) / 2)) for x in nodes]
                return (b - a) / 2 * float(np.dot(weights, values)), 0.0

        monkeypatch.setattr(scheduling_lms_discrete, "integrate", _Integrate, raising=False)


def diffusers_class(class_name: str):
    """The diffusers scheduler class; LMS from its module, as the top-level name is a placeholder without scipy."""
    if class_name == "LMSDiscreteScheduler":
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

        return LMSDiscreteScheduler
    return getattr(diffusers, class_name)


def diffusers_scheduler(name: str, config: dict):
    class_name, overrides = DIFFUSERS_EQUIVALENT[name]
    return diffusers_class(class_name).from_config(config, **overrides)


def run_diffusers(name, config, steps, latents, seed=0, eta=0.0, strength=None):
    """diffusers' sampling loop as its txt2img / img2img pipelines drive it; returns what it saw."""
    sched = diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    generator = torch.Generator("cpu").manual_seed(seed)
    if strength is None:
        sample = torch.from_numpy(latents) * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        noise = torch.from_numpy(latents[::-1].copy())
        sample = sched.add_noise(torch.from_numpy(latents), noise, timesteps[:1])
    step_params = inspect.signature(sched.step).parameters
    kwargs = {"generator": generator} if "generator" in step_params else {}
    if "eta" in step_params:
        kwargs["eta"] = eta
    inputs, samples = [], [sample.numpy().copy()]
    for t in timesteps:
        model_input = sched.scale_model_input(sample, t)
        inputs.append(model_input.numpy().copy())
        model_output = torch.from_numpy(fake_model(model_input.numpy(), float(t)))
        sample = sched.step(model_output, t, sample, **kwargs).prev_sample
        samples.append(sample.numpy().copy())
    return timesteps.numpy(), float(sched.init_noise_sigma), inputs, samples


def run_sdrt(name, config, steps, latents, seed=0, eta=0.0, strength=None):
    sched = load_scheduler(config, name)
    plan = sched.plan(steps, eta=eta, strength=strength)
    rng = TorchStreamRng(seed)
    if strength is None:
        sample = latents * plan.init_noise_sigma
    else:
        sample = sched.add_noise(plan, latents, latents[::-1].copy(), 0)
    state = sched.initial_state(plan)
    inputs, samples = [], [sample]
    for i, t in enumerate(plan.timesteps):
        model_input = sched.scale_model_input(plan, i, sample)
        inputs.append(model_input)
        sample, state = sched.step(plan, i, fake_model(model_input, float(t)), sample, state, rng)
        samples.append(sample)
    assert plan.num_evaluations == len(plan.timesteps)
    return plan.timesteps, plan.init_noise_sigma, inputs, samples


def denoised_magnitudes(name, config, timesteps, ref_inputs) -> list[float]:
    """max |x0| of the data prediction each step computes from its input, x0 = (x_t - sqrt(1 - abar_t) eps) /
    sqrt(abar_t) in the VP space that every scheduler's model input is in (Ho et al. 2020, eq. 15), with abar
    interpolated at fractional timesteps. Solvers work with it (DPM-Solver++, UniPC) or with sigma * eps, its
    equal in size; near sigma_max it dwarfs the sample (1 / sqrt(abar) is 2e4 for the cosine schedule)."""
    alphas_cumprod = diffusers_scheduler(name, config).alphas_cumprod.numpy().astype(np.float64)
    grid = np.arange(len(alphas_cumprod), dtype=np.float64)
    magnitudes = []
    for t, model_input in zip(timesteps, ref_inputs):
        abar = float(np.interp(float(t), grid, alphas_cumprod))
        eps = fake_model(model_input, float(t)).astype(np.float64)
        x0 = (model_input.astype(np.float64) - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
        magnitudes.append(float(np.max(np.abs(x0))))
    return magnitudes


def assert_trajectory_close(inputs, samples, ref_inputs, ref_samples, denoised=None):
    """Every UNet input and every sample within TOLERANCE max abs, or within a float32 rounding budget
    that grows with the steps taken, whichever is larger.

    torch's float32 sqrt/exp/pow (used in diffusers' tables and coefficients) are not correctly rounded
    and their vectorized kernels differ between CPUs (AVX2, AVX-512, AMX builds round differently), so
    bit-identity is out of reach; float32 rounding then scales with the magnitudes computed with:
    sigma-scaled latents reach sigma_max * |noise| (about 50 for SD's schedule, 10^4 and more for
    zero-SNR or cosine schedules), where 1e-5 is below one ulp.

    The budget is derived, not fitted: a solver step x_{k+1} = a_k x_k + sum_j b_kj d_j (|a_k| <= 1 for
    every sampler here, history terms included) carries the error it is given and adds the rounding of
    its own operations, at most ULPS ulps of the largest magnitude seen (each of its few multiply-adds
    and coefficient evaluations contributes at most one ulp, torch's transcendental kernels up to about
    two). After k steps the two float32 implementations may therefore differ by
    ULPS * (k + 1) ulps of that magnitude (the +1 is the initial scaling by init_noise_sigma, and
    scale_model_input's division, which every input adds on top of its sample). The magnitudes are those
    of every value computed with, the data predictions included (`denoised`, `denoised_magnitudes`).
    """
    assert len(inputs) == len(ref_inputs) and len(samples) == len(ref_samples) == len(inputs) + 1
    scale = float(np.max(np.abs(ref_samples[0])))
    pairs = [("sample", 0, samples[0], ref_samples[0], None)]
    for k in range(len(inputs)):
        pairs.append(("input", k, inputs[k], ref_inputs[k], None if denoised is None else denoised[k]))
        pairs.append(("sample", k + 1, samples[k + 1], ref_samples[k + 1], None))
    for kind, k, ours, reference, computed_with in pairs:
        assert ours.dtype == np.float32 and ours.shape == reference.shape, (kind, k)
        scale = max(scale, float(np.max(np.abs(reference))), computed_with or 0.0)
        error = float(np.max(np.abs(ours.astype(np.float64) - reference)))
        steps_taken = k + 1 if kind == "input" else k  # input k is scaled from sample k, after k steps
        allowed = max(TOLERANCE, ULPS * (steps_taken + 1) * F32_EPS * scale)
        WORST.append((error, error / allowed))
        assert error <= allowed, f"{kind} {k}: max abs error {error:.3g} > {allowed:.3g} (scale {scale:.3g})"


def assert_loop_parity(name, config, steps, seed=0, eta=0.0, strength=None):
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1000 + seed)).numpy()
    ref_t, ref_sigma, ref_inputs, ref_samples = run_diffusers(name, config, steps, latents, seed, eta, strength)
    t, sigma, inputs, samples = run_sdrt(name, config, steps, latents, seed, eta, strength)
    assert t.dtype == ref_t.dtype
    if np.all(ref_t == np.round(ref_t)):
        np.testing.assert_array_equal(t, ref_t)
    else:  # Karras / exponential sigmas mapped back to fractional timesteps through log sigma
        np.testing.assert_allclose(t, ref_t, rtol=0, atol=1e-3)
    if strength is None:
        assert sigma == pytest.approx(ref_sigma, rel=1e-6)
    assert_trajectory_close(inputs, samples, ref_inputs, ref_samples,
                            denoised_magnitudes(name, config, ref_t, ref_inputs))


# --- whole loops against diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_sd15_loop_matches_diffusers(name, steps):
    assert_loop_parity(name, SD15, steps)


@pytest.mark.parametrize("name, variant, steps", VARIANT_CASES, ids=["-".join(map(str, c)) for c in VARIANT_CASES])
def test_config_variants_match_diffusers(name, variant, steps):
    if (name, variant, steps) == DIFFUSERS_NAN:
        pytest.skip("diffusers returns NaN here; see test_euler_ancestral_stays_finite_where_diffusers_is_nan")
    if (name, variant, steps) in DIFFUSERS_CRASHES:
        pytest.skip("diffusers fails here; see test_karras_runs_where_diffusers_fails")
    assert_loop_parity(name, {**SD15, **VARIANTS[variant]}, steps)


# With the cosine schedule sigma_max is 20291 and the next sigma 1.75; diffusers' float32
# sigma_up rounds above sigma_next and sigma_down = sqrt(negative) is NaN. sdrt clamps sigma_up to
# sigma_next as k-diffusion does.
DIFFUSERS_NAN = ("euler-a", "cosine-betas", 4)


def test_euler_ancestral_stays_finite_where_diffusers_is_nan():
    name, variant, steps = DIFFUSERS_NAN
    config = {**SD15, **VARIANTS[variant]}
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1000)).numpy()
    assert np.isnan(run_diffusers(name, config, steps, latents)[3][1]).all()
    samples = run_sdrt(name, config, steps, latents)[3]
    assert all(np.isfinite(sample).all() for sample in samples)


# Karras sigmas on the cosine schedule start 20291, 15612, ... and map to repeated timesteps (998,
# 998, ...); with zero-SNR betas and 25 steps the first ones all round to 999. diffusers' multistep
# schedulers locate their first step by timestep value, take the second of the repeats and run off
# the end of the schedule (DPM: IndexError; UniPC: its `this_order > 0` assertion); sdrt steps by index.
DIFFUSERS_CRASHES = {
    *((name, variant, steps)
      for name in ("dpm++2m-karras", "dpm++2m-sde-karras")
      for variant, steps in (("cosine-betas", 4), ("cosine-betas", 25), ("zsnr", 25))),
    ("unipc-karras", "cosine-betas", 25),
    ("unipc-karras", "zsnr", 25),
}


@pytest.mark.parametrize("name, variant, steps", sorted(DIFFUSERS_CRASHES))
def test_karras_runs_where_diffusers_fails(name, variant, steps):
    config = {**SD15, **VARIANTS[variant]}
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1000)).numpy()
    with pytest.raises((IndexError, AssertionError)):
        run_diffusers(name, config, steps, latents)
    timesteps, _, _, samples = run_sdrt(name, config, steps, latents)
    assert timesteps[0] == timesteps[1] and len(timesteps) == steps
    assert all(np.isfinite(sample).all() for sample in samples)


@pytest.mark.parametrize("config", [SD21, SDXL], ids=["sd21", "sdxl"])
@pytest.mark.parametrize("name", [None, *SCHEDULER_NAMES])
def test_shipped_configs_match_diffusers(name, config):
    if name is None:  # the file's own class
        name = load_scheduler(config).name
    assert_loop_parity(name, config, 20)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_match_diffusers_stream(name, seed):
    assert_loop_parity(name, SD15, 10, seed=seed)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("steps", [1, 10])
def test_ddim_eta_matches_diffusers(eta, steps):
    assert_loop_parity("ddim", SD15, steps, seed=3, eta=eta)


@pytest.mark.parametrize("steps", [4, 10])
def test_pndm_with_prk_steps_matches_diffusers(steps):
    assert_loop_parity("pndm", {**SD15, "skip_prk_steps": False, "timestep_spacing": "linspace"}, steps)
    assert_loop_parity("pndm", {**SD15, "skip_prk_steps": False, "timestep_spacing": "trailing"}, steps)


@pytest.mark.parametrize(
    "options",
    [
        {"use_exponential_sigmas": True},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        {"final_sigmas_type": "sigma_min"},
        {"interpolation_type": "log_linear"},
        {"timestep_type": "continuous", "prediction_type": "v_prediction"},
        {"timestep_spacing": "leading"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_euler_options_match_diffusers(options):
    config = {**SD15, "_class_name": "EulerDiscreteScheduler", **options}
    assert_loop_parity("euler", config, 10)


@pytest.mark.parametrize("name", ["heun", "lms"])
def test_exponential_sigmas_match_diffusers(name):
    assert_loop_parity(name, {**SD15, "use_exponential_sigmas": True}, 10)


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "fixed_large"])
def test_ddpm_variance_types_match_diffusers(variance_type):
    assert_loop_parity("ddpm", {**SD15, "variance_type": variance_type}, 10, seed=5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_strength_matches_diffusers(name):
    assert_loop_parity(name, SD15, 10, seed=2, strength=0.6)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_matches_diffusers(name):
    original = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(11)).numpy()
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(12)).numpy()
    reference = diffusers_scheduler(name, SD15)
    reference.set_timesteps(10)
    sched = load_scheduler(SD15, name)
    plan = sched.plan(10)
    for i in range(plan.num_evaluations):
        timestep = reference.timesteps[i : i + 1]
        expected = reference.add_noise(torch.from_numpy(original), torch.from_numpy(noise), timestep)
        np.testing.assert_allclose(sched.add_noise(plan, original, noise, i), expected.numpy(), rtol=0, atol=TOLERANCE)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_class_defaults_are_diffusers_defaults(name):
    solver, _ = registry._SCHEDULERS[name]
    reference = diffusers_class(solver.diffusers_class)().config
    assert dict(solver.class_defaults) == {k: v for k, v in reference.items() if not k.startswith("_")}


def test_use_default_values_are_dropped_like_diffusers():
    config = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in config["_use_default_values"]
    assert load_scheduler(config, "euler").config.timestep_spacing == "linspace"


# --- multistep and consistency solvers -----------------------------------------------------------

DPM_CONFIG = {**SD15, "_class_name": "DPMSolverMultistepScheduler"}
UNIPC_CONFIG = {**SD15, "_class_name": "UniPCMultistepScheduler"}


@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize(
    "options",
    [
        {"solver_type": "heun"},
        {"solver_type": "heun", "algorithm_type": "sde-dpmsolver++"},
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"solver_order": 1},
        {"use_lu_lambdas": True},
        {"use_exponential_sigmas": True},
        {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"},
        {"solver_type": "bh2"},  # a UniPC option: diffusers runs it as midpoint
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_dpm_options_match_diffusers(options, steps):
    assert_loop_parity("dpm++2m", {**DPM_CONFIG, **options}, steps, seed=4)


def test_dpm_class_name_honours_the_files_algorithm_type():
    sde = {**DPM_CONFIG, "algorithm_type": "sde-dpmsolver++"}
    sched = load_scheduler(sde)
    assert sched.name == "dpm++2m" and sched.config.algorithm_type == "sde-dpmsolver++"
    assert_loop_parity("dpm++2m", sde, 10, seed=9)
    assert load_scheduler(sde, "dpm++2m-karras").config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize(
    "options",
    [
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min"},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_min": 0.05, "sigma_max": 10.0},
        {"use_exponential_sigmas": True},
        {"disable_corrector": [0, 2]},
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},  # second order onto sigma 0 is inf
        {"solver_order": 1},
        {"solver_type": "midpoint"},  # a DPM option: diffusers runs it as bh2
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_unipc_options_match_diffusers(options, steps):
    assert_loop_parity("unipc", {**UNIPC_CONFIG, **options}, steps)


def test_unipc_bh1_is_finite_where_diffusers_is_nan():
    """With bh1, B(h) = -h is -inf on the step to sigma 0; diffusers multiplies it by a zero residual
    (NaN); sdrt leaves the zero first-order residual out."""
    config = {**UNIPC_CONFIG, "solver_type": "bh1"}
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1000)).numpy()
    reference = run_diffusers("unipc", config, 10, latents)[3]
    samples = run_sdrt("unipc", config, 10, latents)[3]
    assert np.isnan(reference[-1]).all() and np.isfinite(samples[-1]).all()
    assert_trajectory_close([], samples[:1], [], reference[:1])
    for ours, theirs in zip(samples[1:-1], reference[1:-1]):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [{"original_inference_steps": 25}, {"timestep_scaling": 5.0}, {}])
@pytest.mark.parametrize("steps", [2, 8])
def test_lcm_options_match_diffusers(options, steps):
    assert_loop_parity("lcm", {**SD15, "_class_name": "LCMScheduler", **options}, steps, seed=6)
