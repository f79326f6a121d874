"""diffusers on torch as the reference: load pipelines once, and run them with the scheduler sdrt names."""

from __future__ import annotations

import numpy as np

# sdrt scheduler name -> (diffusers class, config overrides), as `Class.from_config(config, **overrides)`.
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def load_pipes(pipeline_cls, checkpoints) -> dict:
    """flavour -> (pipeline, the checkpoint's own scheduler to rebuild others from)."""
    pipes = {}
    for name, path in checkpoints.items():
        pipe = pipeline_cls.from_pretrained(path, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = (pipe, pipe.scheduler)
    return pipes


def reference(pipe_and_scheduler, scheduler: str | None, seed: int, **kwargs) -> np.ndarray:
    import diffusers
    import torch

    pipe, original = pipe_and_scheduler
    pipe.scheduler = original
    if scheduler is not None:
        cls_name, overrides = DIFFUSERS_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=generator, output_type="np", **kwargs).images


class TorchStreamRng:
    """Test-only rng: the runtime's `randn(shape, dtype)` protocol over a torch CPU generator."""

    def __init__(self, seed: int):
        import torch

        self.generator = torch.Generator("cpu").manual_seed(seed)

    def randn(self, shape, dtype=np.float32):
        import torch

        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).numpy()


# -- flow-matching loops (tests/test_flow_scheduler.py, tests/test_flow_schedulers_more.py) ---------------------------

FLOW_SHAPE = (1, 16, 8, 8)
_FLOW_PATTERN = np.linspace(-1.0, 1.0, int(np.prod(FLOW_SHAPE[1:])), dtype=np.float32).reshape(FLOW_SHAPE[1:])


def fake_velocity(model_input: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the transformer: roughly noise - x0 for unit-variance data."""
    return (np.float32(0.8) * model_input + np.float32(0.3) * np.sin(np.float32(t / 100) + _FLOW_PATTERN)
            ).astype(np.float32)


def run_flow_loop(sched, plan, latents: np.ndarray, strength=None, seed: int = 0) -> list:
    """sdrt's whole loop over `plan` with fake_velocity: every sample, the first included (img2img: the latents
    noised with their mirror image at the plan's first timestep)."""
    import numpy.testing

    rng = TorchStreamRng(seed)
    if strength is None:
        sample = latents * np.float32(plan.init_noise_sigma)
    else:
        sample = sched.add_noise(plan, latents, latents[:, ::-1].copy(), 0)
    state = sched.initial_state(plan)
    samples = [sample]
    for i, t in enumerate(plan.timesteps):
        model_input = sched.scale_model_input(plan, i, sample)
        numpy.testing.assert_array_equal(model_input, sample)  # flow models see the sample itself
        sample, state = sched.step(plan, i, fake_velocity(model_input, float(t)), sample, state, rng)
        samples.append(sample)
    return samples
