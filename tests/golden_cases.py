"""Pinned outputs of every pipeline: the cases, and how to run one (tests/test_golden.py compares them with the
arrays `python tests/make_golden.py` stored in tests/golden/pipelines.npz before the runtime's generation core was
rebuilt, so that a refactoring that changes an image is caught).

Each case: (folder name in conftest.TinyFolders, pipeline class, constructor options, call arguments). A call
argument "@name" is the output of the case `name` (the refiner hand-off resumes from the base's latents).
"""

from __future__ import annotations

import hashlib
import platform

import numpy as np
from PIL import Image


def picture(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    return Image.fromarray(np.clip(base * 0.5 + rng.uniform(0, 127, (height, width, 3)), 0, 255).astype(np.uint8))


def mask(width: int = 64, height: int = 64) -> Image.Image:
    array = np.zeros((height, width), np.uint8)
    array[height // 4: 3 * height // 4, width // 8: width // 2] = 255
    return Image.fromarray(array, mode="L")


P = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
SD = "sdrt.runtime.pipeline.StableDiffusionPipeline"
I2I = "sdrt.runtime.img2img.StableDiffusionImg2ImgPipeline"
INPAINT = "sdrt.runtime.inpaint.StableDiffusionInpaintPipeline"
LCM = "sdrt.runtime.lcm.LatentConsistencyPipeline"
LCM_I2I = "sdrt.runtime.lcm.LatentConsistencyImg2ImgPipeline"
XL = "sdrt.runtime.sdxl.StableDiffusionXLPipeline"
XL_I2I = "sdrt.runtime.sdxl.StableDiffusionXLImg2ImgPipeline"
XL_INPAINT = "sdrt.runtime.sdxl_inpaint.StableDiffusionXLInpaintPipeline"

CASES = {
    "sd1-txt2img-euler-a": ("sd1", SD, {"scheduler": "euler-a"}, dict(
        prompt=P, negative_prompt=["blurry", "ugly"], num_inference_steps=4, guidance_scale=7.5,
        guidance_rescale=0.5, seed=1)),
    "sd2-txt2img-dpm-nocfg": ("sd2", SD, {"scheduler": "dpm++2m-karras"}, dict(
        prompt=P[1], num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2, seed=2, width=96)),
    "sd1-txt2img-heun-lowmem": ("sd1", SD, {"scheduler": "heun", "low_memory": True}, dict(
        prompt=P[0], negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, seed=3)),
    "sd1-txt2img-ddim-eta-numpy": ("sd1", SD, {"scheduler": "ddim"}, dict(
        prompt=P[0], num_inference_steps=4, guidance_scale=4.0, eta=1.0, seed=4, rng="numpy")),
    "sd1-img2img-ddim": ("sd1", I2I, {"scheduler": "ddim"}, dict(
        prompt=P, image=picture(0), strength=0.6, num_inference_steps=5, guidance_scale=7.5, seed=5)),
    "sd2-img2img-euler-a": ("sd2", I2I, {"scheduler": "euler-a"}, dict(
        prompt=P[0], image=[picture(1)], strength=0.8, num_inference_steps=5, guidance_scale=3.0,
        num_images_per_prompt=2, seed=6)),
    "sd1-inpaint9-full": ("sd1-inpaint", INPAINT, {}, dict(
        prompt=P[0], image=picture(2), mask_image=mask(), num_inference_steps=4, guidance_scale=7.5, seed=7)),
    "sd1-inpaint9-strength": ("sd1-inpaint", INPAINT, {"scheduler": "dpm++2m-karras"}, dict(
        prompt=P[1], image=picture(3), mask_image=mask(), strength=0.7, num_inference_steps=5,
        guidance_scale=5.0, seed=8)),
    "sd1-inpaint4-blend": ("sd1", INPAINT, {"scheduler": "euler"}, dict(
        prompt=P[0], image=picture(4), mask_image=mask(), strength=0.8, num_inference_steps=5,
        guidance_scale=7.5, seed=9)),
    "sd1-inpaint4-crop": ("sd1", INPAINT, {}, dict(
        prompt=P[0], image=picture(5, 96, 64), mask_image=mask(96, 64), padding_mask_crop=8, num_inference_steps=3,
        guidance_scale=7.5, seed=10, output_type="uint8")),
    "lcm-txt2img": ("lcm", LCM, {}, dict(prompt=P, num_inference_steps=4, guidance_scale=8.5, seed=11)),
    "lcm-img2img": ("lcm", LCM_I2I, {}, dict(
        prompt=P[0], image=picture(6), strength=0.5, num_inference_steps=3, guidance_scale=6.0, seed=12)),
    "xl-txt2img": ("xl-base", XL, {"scheduler": "euler"}, dict(
        prompt=P[0], prompt_2="oil painting", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
        original_size=(128, 128), crops_coords_top_left=(4, 8), seed=13)),
    "xl-txt2img-zeros": ("xl-base", XL, {}, dict(
        prompt=P, num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.3, seed=14)),
    "xl-img2img": ("xl-base", XL_I2I, {"scheduler": "dpm++2m-karras"}, dict(
        prompt=P[1], image=picture(7), strength=0.5, num_inference_steps=6, guidance_scale=5.0, seed=15)),
    "xl-base-to-refiner": ("xl-base", XL, {"scheduler": "euler-a"}, dict(
        prompt=P[0], num_inference_steps=6, denoising_end=0.7, guidance_scale=5.0, output_type="latent", seed=16)),
    "xl-refiner-from-base": ("xl-refiner", XL_I2I, {"scheduler": "euler-a"}, dict(
        prompt=P[0], image="@xl-base-to-refiner", num_inference_steps=6, denoising_start=0.7, guidance_scale=5.0,
        seed=16)),
    "xl-refiner-picture": ("xl-refiner", XL_I2I, {"scheduler": "heun"}, dict(
        prompt=P[0], negative_prompt="blurry", image=picture(8), strength=0.5, num_inference_steps=4,
        aesthetic_score=7.0, guidance_scale=5.0, seed=17)),
    "xl-inpaint9": ("xl-inpaint", XL_INPAINT, {}, dict(
        prompt=P[0], image=picture(9), mask_image=mask(), num_inference_steps=4, guidance_scale=7.5, seed=18)),
    "xl-inpaint4-base": ("xl-base", XL_INPAINT, {"scheduler": "dpm++2m-karras"}, dict(
        prompt=P[1], image=picture(10), mask_image=mask(), num_inference_steps=6, denoising_end=0.75,
        guidance_scale=7.5, output_type="latent", seed=19)),
    "xl-inpaint4-refiner": ("xl-refiner", XL_INPAINT, {"scheduler": "dpm++2m-karras"}, dict(
        prompt=P[1], image="@xl-inpaint4-base", mask_image=mask(), num_inference_steps=6, denoising_start=0.75,
        guidance_scale=7.5, seed=19)),
}


def load_class(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def run_case(name: str, folders, outputs: dict) -> np.ndarray:
    """The case's images (or latents) as one array; `outputs` holds earlier cases' results for "@name" arguments."""
    folder, cls, options, kwargs = CASES[name]
    kwargs = {k: outputs[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in kwargs.items()}
    kwargs.setdefault("output_type", "np")
    pipe = load_class(cls).from_pretrained(folders[folder], **options)
    images = pipe(**kwargs).images
    outputs[name] = np.asarray(images)
    return outputs[name]


def machine() -> str:
    """What float results depend on: the CPU model and flags, and the numeric libraries' versions."""
    import onnxruntime

    try:
        cpuinfo = open("/proc/cpuinfo").read().split("\n\n")[0]
        cpu = [line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags"))]
    except OSError:
        cpu = [platform.processor()]
    text = "\n".join([*cpu, platform.machine(), np.__version__, onnxruntime.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
