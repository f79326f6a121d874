"""The text-to-image pipeline class for a folder's family (model_index.json's pipeline, read by ModelFolder)."""

from __future__ import annotations

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.inpaint import StableDiffusionInpaintPipeline
from sdrt.runtime.lcm import LatentConsistencyImg2ImgPipeline, LatentConsistencyPipeline
from sdrt.runtime.pipeline import StableDiffusionBase, StableDiffusionPipeline
from sdrt.runtime.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from sdrt.runtime.sdxl_inpaint import StableDiffusionXLInpaintPipeline

TEXT_TO_IMAGE = {
    "stable-diffusion": StableDiffusionPipeline,
    "latent-consistency": LatentConsistencyPipeline,
    "stable-diffusion-xl": StableDiffusionXLPipeline,
}
IMAGE_TO_IMAGE = {
    "latent-consistency": LatentConsistencyImg2ImgPipeline,
    "stable-diffusion-xl": StableDiffusionXLImg2ImgPipeline,
}  # others: StableDiffusionImg2ImgPipeline
INPAINT = {"stable-diffusion-xl": StableDiffusionXLInpaintPipeline}  # others: StableDiffusionInpaintPipeline


def text_to_image_class(folder: ModelFolder) -> type[StableDiffusionBase]:
    """StableDiffusionPipeline, or LatentConsistencyPipeline for an LCM folder (also one that an SD
    pipeline index names but whose UNet takes the guidance embedding, e.g. an LCM-LoRA fused in)."""
    if folder.unet_config.get("time_cond_proj_dim") is not None:
        return LatentConsistencyPipeline
    return TEXT_TO_IMAGE.get(folder.family, StableDiffusionPipeline)


def image_to_image_class(folder: ModelFolder) -> type[StableDiffusionBase]:
    """StableDiffusionImg2ImgPipeline, or its family's (LatentConsistencyImg2ImgPipeline for any UNet that takes
    the guidance embedding, as text_to_image_class)."""
    if folder.unet_config.get("time_cond_proj_dim") is not None:
        return LatentConsistencyImg2ImgPipeline
    return IMAGE_TO_IMAGE.get(folder.family, StableDiffusionImg2ImgPipeline)


def text_to_image_pipeline(path, verify: str = "size", **options) -> StableDiffusionBase:
    """Open `path` with the text-to-image pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return text_to_image_class(folder)(folder, **options)


def image_to_image_pipeline(path, verify: str = "size", **options) -> StableDiffusionBase:
    """Open `path` with the image-to-image pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return image_to_image_class(folder)(folder, **options)


def inpaint_pipeline(path, verify: str = "size", **options) -> StableDiffusionInpaintPipeline:
    """Open `path` with the inpainting pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return INPAINT.get(folder.family, StableDiffusionInpaintPipeline)(folder, **options)
