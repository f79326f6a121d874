"""Model families (one file each) and the pipeline class for a folder.

A folder's family comes from its model_index.json (ModelFolder.family); a UNet that takes the guidance
embedding (time_cond_proj_dim) is a Latent Consistency Model whatever the index says (an LCM-LoRA fused in).
"""

from __future__ import annotations

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.families.base import Family
from sdrt.runtime.families.flux import Flux
from sdrt.runtime.families.lcm import LatentConsistency
from sdrt.runtime.families.sd import StableDiffusion
from sdrt.runtime.families.sd3 import StableDiffusion3
from sdrt.runtime.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, type[Family]] = {
    family.name: family for family in (StableDiffusion, LatentConsistency, StableDiffusionXL, StableDiffusion3, Flux)
}


def family_name(folder: ModelFolder) -> str:
    if folder.family == "stable-diffusion" and folder.unet_config.get("time_cond_proj_dim") is not None:
        return LatentConsistency.name
    return folder.family


def family_class(name: str) -> type[Family]:
    return FAMILIES[name]


def _classes(task: str) -> dict:
    """family name -> the facade class of `task` ("txt2img", "img2img", "inpaint")."""
    from sdrt.runtime.flux import FluxImg2ImgPipeline, FluxPipeline
    from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
    from sdrt.runtime.lcm import LatentConsistencyImg2ImgPipeline, LatentConsistencyPipeline
    from sdrt.runtime.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from sdrt.runtime.pipeline import StableDiffusionPipeline
    from sdrt.runtime.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from sdrt.runtime.dit_inpaint import FluxInpaintPipeline, StableDiffusion3InpaintPipeline
    from sdrt.runtime.sdxl_inpaint import StableDiffusionXLInpaintPipeline

    return {
        "txt2img": {"stable-diffusion": StableDiffusionPipeline, "latent-consistency": LatentConsistencyPipeline,
                    "stable-diffusion-xl": StableDiffusionXLPipeline, "stable-diffusion-3": StableDiffusion3Pipeline,
                    "flux": FluxPipeline},
        "img2img": {"stable-diffusion": StableDiffusionImg2ImgPipeline,
                    "latent-consistency": LatentConsistencyImg2ImgPipeline,
                    "stable-diffusion-xl": StableDiffusionXLImg2ImgPipeline,
                    "stable-diffusion-3": StableDiffusion3Img2ImgPipeline, "flux": FluxImg2ImgPipeline},
        # LCM folders go to StableDiffusionInpaintPipeline, which refuses them by name.
        "inpaint": {"stable-diffusion-xl": StableDiffusionXLInpaintPipeline,
                    "stable-diffusion-3": StableDiffusion3InpaintPipeline, "flux": FluxInpaintPipeline},
    }[task]


def text_to_image_class(folder: ModelFolder) -> type:
    """StableDiffusionPipeline, or its family's (LatentConsistencyPipeline for any UNet that takes the guidance
    embedding, also one that an SD pipeline index names, e.g. an LCM-LoRA fused in)."""
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    return _classes("txt2img").get(family_name(folder), StableDiffusionPipeline)


def image_to_image_class(folder: ModelFolder) -> type:
    """StableDiffusionImg2ImgPipeline, or its family's (as text_to_image_class)."""
    from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline

    return _classes("img2img").get(family_name(folder), StableDiffusionImg2ImgPipeline)


def inpaint_class(folder: ModelFolder) -> type:
    from sdrt.runtime.inpaint import StableDiffusionInpaintPipeline

    return _classes("inpaint").get(folder.family, StableDiffusionInpaintPipeline)


def text_to_image_pipeline(path, verify: str = "size", **options):
    """Open `path` with the text-to-image pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return text_to_image_class(folder)(folder, **options)


def image_to_image_pipeline(path, verify: str = "size", **options):
    """Open `path` with the image-to-image pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return image_to_image_class(folder)(folder, **options)


def inpaint_pipeline(path, verify: str = "size", **options):
    """Open `path` with the inpainting pipeline of its family; options go to the pipeline's constructor."""
    folder = ModelFolder.open(path, verify=verify)
    return inpaint_class(folder)(folder, **options)
