"""The text-to-image pipeline class for a folder's family (model_index.json's pipeline, read by ModelFolder)."""

from __future__ import annotations

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
from sdrt.runtime.lcm import LatentConsistencyPipeline
from sdrt.runtime.pipeline import StableDiffusionBase, StableDiffusionPipeline
from sdrt.runtime.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

TEXT_TO_IMAGE = {
    "stable-diffusion": StableDiffusionPipeline,
    "latent-consistency": LatentConsistencyPipeline,
    "stable-diffusion-xl": StableDiffusionXLPipeline,
}
IMAGE_TO_IMAGE = {"stable-diffusion-xl": StableDiffusionXLImg2ImgPipeline}  # others: StableDiffusionImg2ImgPipeline


def text_to_image_class(folder: ModelFolder) -> type[StableDiffusionBase]:
    """StableDiffusionPipeline, or LatentConsistencyPipeline for an LCM folder (also one that an SD
    pipeline index names but whose UNet takes the guidance embedding, e.g. an LCM-LoRA fused in)."""
    if folder.unet_config.get("time_cond_proj_dim") is not None:
        return LatentConsistencyPipeline
    return TEXT_TO_IMAGE.get(folder.family, StableDiffusionPipeline)


def text_to_image_pipeline(path, verify: str = "size", **options) -> StableDiffusionBase:
    """Open `path` with the text-to-image pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return text_to_image_class(folder)(folder, **options)


def image_to_image_pipeline(path, verify: str = "size", **options) -> StableDiffusionBase:
    """Open `path` with the image-to-image pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return IMAGE_TO_IMAGE.get(folder.family, StableDiffusionImg2ImgPipeline)(folder, **options)
