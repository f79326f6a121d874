"""ControlNet pipelines with diffusers' names and signatures: txt2img, img2img and inpainting for SD 1.x/2.x and
SDXL. Thin facades: the family and starting task of their plain counterparts plus the control task
(sdrt.runtime.tasks.control), which any facade adds when it is opened with `controlnet=`:

    pipe = StableDiffusionControlNetPipeline.from_pretrained("sd15-onnx", controlnet="canny-onnx")
    pipe("a house", image=edges, controlnet_conditioning_scale=0.8, seed=1)
    StableDiffusionControlNetPipeline.from_pretrained("sd15-onnx", controlnet=["canny-onnx", "depth-onnx"])

A ControlNet folder is made by `sdrt export-controlnet` and checked against the base when opened.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sdrt.runtime.core.facade import Facade
from sdrt.runtime.core.generate import PipelineOutput
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.families.sdxl import FAMILY as SDXL
from sdrt.runtime.tasks.img2img import ImageToImage
from sdrt.runtime.tasks.inpaint import Inpaint
from sdrt.runtime.tasks.txt2img import TextToImage

__all__ = ["StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline",
           "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
           "StableDiffusionXLControlNetInpaintPipeline", "StableDiffusionXLControlNetPipeline", "control_pipeline"]


class _ControlNetFacade(Facade):
    def __init__(self, folder, *args, controlnet=None, **kwargs):
        if controlnet is None or (isinstance(controlnet, (list, tuple)) and not controlnet):
            raise InvalidInputError(f"{type(self).__name__} needs controlnet=: an exported ControlNet folder "
                                    "(sdrt export-controlnet) or a list of them")
        super().__init__(folder, *args, controlnet=controlnet, **kwargs)

    def _control_generate(self, arguments: dict) -> PipelineOutput:
        arguments = dict(arguments)
        if "image" in arguments and "control_image" not in arguments:  # txt2img: `image` is the control image
            arguments["control_image"] = arguments.pop("image")
        return self._generate(arguments)


class StableDiffusionControlNetPipeline(_ControlNetFacade):
    """SD 1.x / 2.x text-to-image with ControlNet(s)."""

    task = TextToImage

    def __call__(
        self, prompt: str | Sequence[str], image=None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 50, guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None, loras: dict | None = None,
    ) -> PipelineOutput:
        """image: the control image (edges, depth, pose...: PIL or HWC array, any mode), or a list of one per
        ControlNet; resized to the output, whose size defaults to the (first) control image's, as diffusers.
        controlnet_conditioning_scale, control_guidance_start/end: a number, or one per ControlNet; each
        ControlNet acts at steps i with start <= i/N and (i+1)/N <= end. guess_mode: the ControlNets see the
        conditional half only (their residuals ramped 0.1 -> 1). Others as StableDiffusionPipeline's."""
        return self._control_generate(locals())


class StableDiffusionControlNetImg2ImgPipeline(_ControlNetFacade):
    """SD 1.x / 2.x image-to-image with ControlNet(s)."""

    task = ImageToImage
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, control_image, strength: float = 0.8,
        num_inference_steps: int = 50, guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        controlnet_conditioning_scale: float | list[float] = 0.8, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """image: the picture to start from; control_image: resized to its size. Note diffusers' default
        controlnet_conditioning_scale here is 0.8. Others as StableDiffusionImg2ImgPipeline's and
        StableDiffusionControlNetPipeline's."""
        return self._control_generate(locals())


class StableDiffusionControlNetInpaintPipeline(_ControlNetFacade):
    """SD 1.x / 2.x inpainting (9- or 4-channel UNet) with ControlNet(s)."""

    task = Inpaint
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, mask_image, control_image, strength: float = 1.0,
        height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
        num_inference_steps: int = 50, guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        controlnet_conditioning_scale: float | list[float] = 0.5, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
        loras: dict | None = None,
    ) -> PipelineOutput:
        """As StableDiffusionInpaintPipeline, plus control_image (resized to the output). Note diffusers' default
        controlnet_conditioning_scale here is 0.5."""
        return self._control_generate(locals())


class StableDiffusionXLControlNetPipeline(_ControlNetFacade):
    """SDXL text-to-image with ControlNet(s) made for SDXL."""

    family = SDXL
    task = TextToImage

    def __call__(
        self, prompt: str | Sequence[str], prompt_2: str | Sequence[str] | None = None, image=None,
        height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
        guidance_scale: float = 5.0, negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        seed: int | None = None, generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None, loras: dict | None = None,
    ) -> PipelineOutput:
        """As StableDiffusionXLPipeline, plus the control arguments of StableDiffusionControlNetPipeline."""
        return self._control_generate(locals())


class StableDiffusionXLControlNetImg2ImgPipeline(_ControlNetFacade):
    """SDXL image-to-image with ControlNet(s) made for SDXL (also the refiner's aesthetic-score conditioning)."""

    family = SDXL
    task = ImageToImage
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, control_image, strength: float = 0.8,
        prompt_2: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None, num_inference_steps: int = 50,
        guidance_scale: float = 5.0, num_images_per_prompt: int = 1, eta: float = 0.0, seed: int | None = None,
        generator=None, rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        controlnet_conditioning_scale: float | list[float] = 0.8, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5, guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None, loras: dict | None = None,
    ) -> PipelineOutput:
        """As StableDiffusionXLImg2ImgPipeline, plus the control arguments (diffusers' defaults here: strength
        0.8, controlnet_conditioning_scale 0.8). The output has the picture's size and the control image is
        resized to it (diffusers sizes both by the control image: the same when they match)."""
        return self._control_generate(locals())


class StableDiffusionXLControlNetInpaintPipeline(_ControlNetFacade):
    """SDXL inpainting (4- or 9-channel UNet) with ControlNet(s) made for SDXL."""

    family = SDXL
    task = Inpaint
    needs_encoder = True

    def __call__(
        self, prompt: str | Sequence[str], image, mask_image, control_image, strength: float = 0.9999,
        prompt_2: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None, height: int | None = None, width: int | None = None,
        padding_mask_crop: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1, eta: float = 0.0, seed: int | None = None, generator=None,
        rng: str = "torch", output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], Any] | None = None, progress: bool = False,
        controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5, guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None, loras: dict | None = None,
    ) -> PipelineOutput:
        """As StableDiffusionXLInpaintPipeline, plus control_image (resized to the output) and the control
        arguments (diffusers' defaults here: strength 0.9999, guidance 5.0, controlnet_conditioning_scale 1.0)."""
        return self._control_generate(locals())


def control_pipeline(path, task: str = "txt2img", verify: str = "size", **options):
    """Open the base folder `path` with the ControlNet pipeline of its family for `task` ("txt2img", "img2img",
    "inpaint"); options go to the constructor (controlnet= among them). LCM folders are refused by name."""
    from sdrt.runtime.config import ModelFolder
    from sdrt.runtime.errors import UnsupportedConfigError
    from sdrt.runtime.families import family_name

    classes = {
        ("stable-diffusion", "txt2img"): StableDiffusionControlNetPipeline,
        ("stable-diffusion", "img2img"): StableDiffusionControlNetImg2ImgPipeline,
        ("stable-diffusion", "inpaint"): StableDiffusionControlNetInpaintPipeline,
        ("stable-diffusion-xl", "txt2img"): StableDiffusionXLControlNetPipeline,
        ("stable-diffusion-xl", "img2img"): StableDiffusionXLControlNetImg2ImgPipeline,
        ("stable-diffusion-xl", "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
    }
    folder = ModelFolder.open(path, verify=verify)
    family = family_name(folder)
    if (family, task) not in classes:
        runs = ", ".join(f"{f} {t}" for f, t in classes)
        raise UnsupportedConfigError(f"ControlNet with a {family} folder for {task} is not supported ({folder.path}); "
                                     f"sdrt runs ControlNets for: {runs}")
    return classes[family, task](folder, **options)
