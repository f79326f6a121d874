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
