"""`sdrt demo`: a grid of images from the bundled trained demo model (shapes on backgrounds), with timings.

The demo model is a tiny latent diffusion model trained on synthetic captioned shapes
(models/shapes-demo, see its README); its exported ONNX folder ships beside it, so the demo needs
only the base install.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sdrt.runtime.errors import ModelFolderError

DEMO_PROMPTS = (
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a blue circle on a yellow background",
    "a white square on a red background",
    "a black triangle on a green background",
    "a red triangle on a white background",
    "a green circle on a black background",
)


def default_model() -> Path:
    """The bundled ONNX folder: $SDRT_DEMO_MODEL, else models/shapes-demo-onnx in the source tree."""
    if os.environ.get("SDRT_DEMO_MODEL"):
        return Path(os.environ["SDRT_DEMO_MODEL"])
    return Path(__file__).resolve().parent.parent / "models" / "shapes-demo-onnx"


def run_demo(output="demo.png", model=None, steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
             scheduler: str | None = None, provider: str = "cpu", log=None) -> dict:
    from sdrt.runtime import image as imageio
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    model = Path(model) if model else default_model()
    if not model.is_dir():
        raise ModelFolderError(
            f"the demo model is not at {model}; run from a source checkout of sdrt, or pass --model FOLDER "
            "(or set SDRT_DEMO_MODEL)"
        )
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, provider=provider, scheduler=scheduler)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = pipe(list(DEMO_PROMPTS), num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                  output_type="pil", progress=True)
    t_gen = time.perf_counter() - t1
    scale = max(1, 128 // result.images[0].width)
    images = [im.resize((im.width * scale, im.height * scale), resample=0) for im in result.images]
    grid = imageio.image_grid(images, cols=4)
    imageio.save_image(grid, output, parameters="\n".join(result.parameters))  # the format: output's extension
    timings = dict(result.timings, load=t_load, total=t_gen, images=len(DEMO_PROMPTS))
    log(f"wrote {output}: {len(DEMO_PROMPTS)} images, {steps} steps, guidance {guidance_scale}, seed {seed}")
    log(f"load {t_load:.2f} s; generate {t_gen:.2f} s (text encoder {timings['text_encoder']:.3f} s, "
        f"UNet {timings['unet']:.2f} s, scheduler+CFG {timings['scheduler_and_guidance']:.3f} s, "
        f"VAE decode {timings['vae_decoder']:.3f} s)")
    for p in DEMO_PROMPTS:
        log(f"  {p}")
    return timings
