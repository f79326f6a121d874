"""`Scheduler`: a resolved config plus a solver, with the one interface the pipeline uses.

    sched = load_scheduler(config_dict, name=None)
    plan = sched.plan(num_inference_steps, strength=None, eta=0.0)
    latents = noise * plan.init_noise_sigma              (or sched.add_noise(plan, x0, noise, 0) for img2img)
    state = sched.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_input = sched.scale_model_input(plan, i, latents)
        model_output = unet(model_input, t)
        latents, state = sched.step(plan, i, model_output, latents, state, rng)

Samples are float32; `step` never changes its inputs and returns arrays the caller owns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers.config import SchedulerConfig
from sdrt.runtime.schedulers.plan import Plan, Solver

F32 = np.float32


@dataclass(frozen=True)
class Scheduler:
    name: str  # registry name, e.g. "euler-karras"
    config: SchedulerConfig
    solver: Solver

    @property
    def evaluations_per_step(self) -> int:
        """Model evaluations per solver step (diffusers' `order`; Heun: 2)."""
        return self.solver.evaluations_per_step

    def plan(self, num_inference_steps: int, *, strength: float | None = None, eta: float = 0.0,
             strength_in_schedule: bool = False, sigmas: Sequence[float] | None = None,
             mu: float | None = None) -> Plan:
        """Precompute a sampling run of `num_inference_steps` steps.

        strength: img2img, as diffusers' img2img pipelines: keep the last int(n * strength) steps.
        eta: DDIM's noise weight (0 deterministic, 1 DDPM-like); other solvers accept only 0.
        strength_in_schedule: instead, build the schedule for strength and run all n steps, as diffusers'
        LatentConsistencyModelImg2ImgPipeline does (LCMScheduler.set_timesteps(n, strength=)); only solvers
        with such a schedule (lcm) take it. diffusers' StableDiffusionImg2ImgPipeline cuts even LCM's schedule.
        sigmas, mu: diffusers' set_timesteps(sigmas=, mu=) of the flow schedulers (the Flux pipeline passes
        sigmas linspace(1, 1/n, n) and mu = flow.flux_mu(image_seq_len, config)); other solvers take neither.
        """
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        if n > self.config.num_train_timesteps:
            raise InvalidInputError(
                f"num_inference_steps={n} exceeds num_train_timesteps={self.config.num_train_timesteps}"
            )
        if not eta >= 0:
            raise InvalidInputError(f"eta must be >= 0, got {eta!r}")
        if eta != 0 and not self.solver.accepts_eta:
            raise InvalidInputError(f"eta={eta} applies to the ddim scheduler only; {self.name} takes eta=0")
        schedule_options = self._schedule_options(int(n), sigmas, mu)
        start_step = 0
        if strength is not None:
            if not 0 < strength <= 1:
                raise InvalidInputError(f"strength must be in (0, 1], got {strength!r}")
            if strength_in_schedule:
                return replace(self._strength_plan(int(n), float(strength)), solver=self.name)
            start_step = self.solver.strength_start(int(n), float(strength))
            if start_step >= n:
                raise InvalidInputError(f"strength={strength} with {n} steps leaves no step to run; raise either")
        plan = self.solver.make_plan(self.config, int(n), float(eta), start_step * self.solver.evaluations_per_step,
                                     **schedule_options)
        return replace(plan, solver=self.name, num_inference_steps=int(n) - start_step)

    def _schedule_options(self, n: int, sigmas: Sequence[float] | None, mu: float | None) -> dict[str, Any]:
        """sigmas= and mu= checked (given ones only), for a solver that declares them."""
        options: dict[str, Any] = {}
        for key, value in (("sigmas", sigmas), ("mu", mu)):
            if value is not None and key not in self.solver.schedule_options:
                raise InvalidInputError(f"{key}= sets a flow-matching schedule (flow-euler); the {self.name} "
                                        "scheduler takes none")
        if sigmas is not None:
            try:
                values = np.array(sigmas, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"sigmas must be a list of numbers, got {sigmas!r}") from e
            if values.ndim != 1 or len(values) != n or not np.all(np.isfinite(values)):
                raise InvalidInputError(f"sigmas must be {n} finite numbers (one per step), got {sigmas!r}")
            options["sigmas"] = values
        if mu is not None:
            if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating, np.integer)) or not np.isfinite(mu):
                raise InvalidInputError(f"mu must be a finite number, got {mu!r}")
            options["mu"] = float(mu)
        return options

    def _strength_plan(self, n: int, strength: float) -> Plan:
        if self.solver.make_strength_plan is None:
            raise InvalidInputError(
                f"the {self.name} scheduler has no schedule built for an img2img strength (diffusers' "
                f"{self.solver.diffusers_class}.set_timesteps takes none); LCM img2img samples with lcm: leave the "
                "scheduler option out"
            )
        return self.solver.make_strength_plan(self.config, n, strength)

    def scale_model_input(self, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
        """The UNet input at evaluation i (sigma-view solvers divide by sqrt(sigma^2 + 1))."""
        self._check(plan, i)
        return np.asarray(sample, dtype=F32) / plan.input_divisors[i]

    def initial_state(self, plan: Plan) -> Any:
        """The solver state before evaluation 0 (None for single-step solvers)."""
        return self.solver.initial_state(plan)

    def step(
        self, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any, rng: Any = None
    ) -> tuple[np.ndarray, Any]:
        """Advance `sample` past evaluation i; returns (new sample, new state). Pure apart from drawing from rng."""
        self._check(plan, i)
        # Copies: multistep states keep these, and engines may reuse their output buffers.
        model_output = np.array(model_output, dtype=F32)
        sample = np.array(sample, dtype=F32)
        if model_output.shape != sample.shape:
            raise InvalidInputError(f"model_output shape {model_output.shape} differs from sample shape {sample.shape}")
        new_sample, new_state = self.solver.step(plan, i, model_output, sample, state, rng)
        return np.asarray(new_sample, dtype=F32), new_state

    def add_noise(self, plan: Plan, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """`original` noised to the level of evaluation i (diffusers' `add_noise` at plan.timesteps[i])."""
        self._check(plan, i)
        scale_original, scale_noise = plan.noise_coefficients[i]
        return scale_original * np.asarray(original, dtype=F32) + scale_noise * np.asarray(noise, dtype=F32)

    def _check(self, plan: Plan, i: int) -> None:
        if plan.solver != self.name:
            raise InvalidInputError(f"this plan was made by the {plan.solver} scheduler, not {self.name}")
        if not 0 <= i < plan.num_evaluations:
            raise InvalidInputError(f"evaluation index {i} out of range: the plan has {plan.num_evaluations}")
