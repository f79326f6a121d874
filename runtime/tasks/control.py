"""ControlNet as a task: each UNet call gets the ControlNets' residuals for its rows, as diffusers' ControlNet
pipelines compute them. It combines with whichever task starts the run (txt2img, img2img, inpainting) and with
SDXL, since it only adds UNet inputs.

Per ControlNet k and evaluation i of N: the control image (resized to the output, [0, 1]) and the scheduler's
sample before any task adds channels (an inpainting UNet's extra channels are not the ControlNet's), the call's
text conditioning; the residuals times controlnet_conditioning_scale[k], or 0 outside its window
(diffusers' controlnet_keep: off where i/N < control_guidance_start[k] or (i+1)/N > control_guidance_end[k]);
several ControlNets' residuals are summed (MultiControlNet). guess_mode: the ControlNets see the conditional
half only, the negative half gets zeros, and the residuals ramp from 0.1 (first) to 1 (mid block) on a log scale.
A global-pooling ControlNet (shuffle: `global_pool_conditions`) gives each residual's spatial mean, unramped, and
(the first ControlNet's setting) turns guess mode on, as diffusers' pipelines do.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime import control as controlio
from sdrt.runtime.core.loop import COND
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.tasks.base import Task

UNET_DOWN, UNET_MID = "down_block_additional_residual_{}", "mid_block_additional_residual"


class Control(Task):
    gives_residuals = True  # the Generator then feeds no zero residuals

    def prepare(self, run) -> None:
        request, nets = run.request, run.models.controlnets
        count = len(nets)
        images = request.control_image
        if images is None:
            raise InvalidInputError(f"this pipeline runs {count} ControlNet{'s' if count > 1 else ''}: give the "
                                    "control image (control_image=, or image= for txt2img; --control-image)")
        if count > 1:
            if not isinstance(images, (list, tuple)) or len(images) != count:
                got = len(images) if isinstance(images, (list, tuple)) else 1
                raise InvalidInputError(f"{count} ControlNets take {count} control images (one per ControlNet, in "
                                        f"order), got {got}")
            per_net = [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]
        else:
            per_net = [list(images) if isinstance(images, (list, tuple)) else [images]]
        self.scales = self._per_net("controlnet_conditioning_scale", request.controlnet_conditioning_scale, count)
        self.starts = self._per_net("control_guidance_start", request.control_guidance_start, count)
        self.ends = self._per_net("control_guidance_end", request.control_guidance_end, count)
        first = controlio.as_control_picture(per_net[0][0], 0)
        if run.tasks[0].__class__.__name__ == "TextToImage" and request.height is None and request.width is None:
            # diffusers' ControlNet txt2img: the control image's size, rounded down to what the UNet takes.
            m = run.folder.pixel_multiple
            run.height, run.width = max(m, first.height // m * m), max(m, first.width // m * m)
            run.parameters.update(width=run.width, height=run.height)
        self.pixels = []
        for k, pictures in enumerate(per_net):
            if len(pictures) not in (1, run.batch, len(request.prompt)):
                raise InvalidInputError(f"ControlNet {k}: {len(pictures)} control images for {len(request.prompt)} "
                                        "prompts; give one for all, or one per prompt")
            pixels = controlio.prepare(pictures, run.height, run.width)
            repeat = run.batch if len(pixels) == 1 else request.num_images_per_prompt if \
                len(pixels) == len(request.prompt) else 1
            self.pixels.append(np.repeat(pixels, repeat, axis=0))
        run.parameters["controlnet"] = ", ".join(
            f"{net.path.name} (scale {s:g}, {a:g}-{b:g})" for (net, _), s, a, b in
            zip(nets, self.scales, self.starts, self.ends))
        # diffusers: a global-pooling ControlNet (the first, for several) turns guess mode on
        self.guess = bool(request.guess_mode) or nets[0][0].global_pool
        if self.guess:
            run.parameters["guess_mode"] = True

    @staticmethod
    def _per_net(name: str, value, count: int) -> list[float]:
        if isinstance(value, tuple):
            if len(value) != count:
                raise InvalidInputError(f"{name} has {len(value)} entries for {count} ControlNets; give one number "
                                        "for all, or one per ControlNet")
            return list(value)
        return [value] * count

    def call_inputs(self, run, i: int, sample: np.ndarray, conditioning: dict, halves: tuple) -> dict:
        n_eval = run.plan.num_evaluations
        guess = self.guess
        rows = len(sample) // len(halves)
        # guess mode: the ControlNets see the conditional rows only; the others get zeros.
        take = slice((len(halves) - 1) * rows, None) if guess and COND in halves else slice(None)
        if guess and COND not in halves:
            take = slice(0, 0)
        total: list[np.ndarray] | None = None
        t = run.plan.timesteps[i]
        models = run.models
        for k, (net, engine) in enumerate(models.controlnets):
            keep = not (i / n_eval < self.starts[k] or (i + 1) / n_eval > self.ends[k])
            scale = self.scales[k] * float(keep)
            if scale == 0.0 or take.start == take.stop == 0:
                continue  # residuals times 0: skipping the ControlNet gives the same sums
            if models.alternate_controlnet:  # low memory: the UNet leaves while the ControlNets run, and back
                models.stage_done(models.unet)
            x = sample[take]
            feed = {"sample": x, "timestep": np.full((len(x),), t, dtype=np.float32),
                    "encoder_hidden_states": conditioning["encoder_hidden_states"][take],
                    "controlnet_cond": np.concatenate([self.pixels[k]] * (len(x) // len(self.pixels[k])))}
            for name in ("text_embeds", "time_ids"):
                if name in net.spec.input_names:
                    feed[name] = conditioning[name][take]
            out = engine.run(feed)
            if models.alternate_controlnet:
                models.stage_done(engine)
            residuals = [out[name] for name in net.spec.output_names]
            weights = np.full(len(residuals), scale, dtype=np.float32)
            if guess and not net.global_pool:  # diffusers: logspace(-1, 0, n) * conditioning_scale
                weights = np.logspace(-1, 0, len(residuals), dtype=np.float32) * np.float32(scale)
            residuals = [r * w for r, w in zip(residuals, weights)]
            if net.global_pool:
                residuals = [r.mean(axis=(2, 3), keepdims=True) for r in residuals]
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        spec = run.folder.spec("unet")
        names = [n for n in spec.input_names if n.startswith("down_block_additional_residual_")] + [UNET_MID]
        dims = spec.dims(len(sample), run.height, run.width)
        shapes = {t.name: t.resolve(dims) for t in spec.inputs if t.name in names}
        out = {}
        for j, name in enumerate(names):
            full = np.zeros(shapes[name], dtype=np.float32)
            if total is not None:
                full[take] = total[j]  # broadcast: global-pool ControlNets give 1x1 residuals
            out[name] = full
        return out
