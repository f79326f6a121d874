"""The OpenAI Images API: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models.

OpenAI's fields (model, prompt, n, size "WxH", response_format "b64_json" or "url": a data: URL, since nothing
is stored) and sdrt's extensions, sent as extra fields (the openai client's `extra_body`): seed, steps,
guidance_scale, negative_prompt, scheduler, strength (edits). n images of one request are one generation of
num_images_per_prompt=n (as `sdrt generate --num-images n --seed SEED`). Fields OpenAI defines for its own
models (quality, style, user, background, moderation) are accepted and have no effect.

Edits: `image` (or `image[]`, one picture) and an optional `mask`. OpenAI's masks mark the part to edit with
full transparency (alpha 0); a mask without an alpha channel is read as sdrt's: white repainted, black kept.
Without a mask an edit is image-to-image at `strength`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from PIL import Image

from sdrt.runtime.errors import InvalidInputError
from sdrt.serve import fields, images

FORMATS = ("b64_json", "url")


def _common(body: dict, server, form: bool = False) -> tuple:
    """(model, generation fields, response_format)."""
    model = server.model(fields.get(body, "model", str, form=form))
    prompt = fields.get(body, "prompt", str, form=form)
    if prompt is None:
        raise InvalidInputError("prompt is required: the text to draw")
    response_format = fields.get(body, "response_format", str, "b64_json", form=form)
    if response_format not in FORMATS:
        raise InvalidInputError(f"response_format must be one of {FORMATS}, got {response_format!r}")
    output_format = fields.get(body, "output_format", str, "png", form=form)
    if output_format != "png":
        raise InvalidInputError(f"output_format {output_format!r}: sdrt serve writes PNG only")
    width, height = fields.size(fields.get(body, "size", str, form=form))
    given = dict(
        prompt=prompt,
        negative_prompt=fields.get(body, "negative_prompt", str, form=form),
        num_images_per_prompt=fields.get(body, "n", int, 1, minimum=1, form=form),
        num_inference_steps=fields.get(body, "steps", int, minimum=1, form=form),
        guidance_scale=fields.get(body, "guidance_scale", float, minimum=0.0, form=form),
        seed=fields.get(body, "seed", int, form=form),
        scheduler=fields.get(body, "scheduler", str, form=form),
        width=width, height=height,
    )
    return model, given, response_format


def _answer(output, response_format: str) -> dict:
    data = []
    for image, parameters in zip(output.images, output.parameters):
        encoded = images.b64_png(image, parameters)
        data.append({"b64_json": encoded} if response_format == "b64_json"
                    else {"url": "data:image/png;base64," + encoded})
    return {"created": int(time.time()), "data": data}


def openai_mask(picture: Image.Image) -> Image.Image:
    """OpenAI's mask (transparent = edit) as sdrt's (white = repaint); a mask without alpha is sdrt's already."""
    if picture.mode in ("RGBA", "LA") or (picture.mode == "P" and "transparency" in picture.info):
        alpha = picture.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0).convert("L")
    return picture


def router(server) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sdrt"}
                                           for name in server.models]}

    @api.get("/v1/models/{name}")
    async def model(name: str):
        served = server.model(name)
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "sdrt"}

    @api.post("/v1/images/generations")
    async def generations(request: Request):
        body = await fields.json_object(request)
        model, given, response_format = _common(body, server)
        output = await server.generate(request, model, "txt2img", "openai", **given)
        server.metrics.answered("openai", 200)
        return _answer(output, response_format)

    @api.post("/v1/images/edits")
    async def edits(request: Request):
        async with request.form(max_files=4) as form:
            body = {k: v for k, v in form.items() if isinstance(v, str)}
            uploads = {k: v for k, v in form.multi_items() if not isinstance(v, str)}
            pictures = [await f.read() for k, f in form.multi_items() if k in ("image", "image[]")
                        and not isinstance(f, str)]
            mask_data = await uploads["mask"].read() if "mask" in uploads else None
        if len(pictures) != 1:
            raise InvalidInputError(f"send one picture as the multipart file 'image' (got {len(pictures)})")
        model, given, response_format = _common(body, server, form=True)
        limit = server.limits.max_pixels
        picture = images.from_bytes(pictures[0], "image", limit).convert("RGB")
        mask = None if mask_data is None else openai_mask(images.from_bytes(mask_data, "mask", limit))
        width, height = given.pop("width"), given.pop("height")
        if width is not None and (width, height) != picture.size:  # the output size: the picture resized to it
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
            mask = None if mask is None else mask.resize((width, height), Image.Resampling.NEAREST)
        strength = fields.get(body, "strength", float, form=True)
        task = "img2img" if mask is None else "inpaint"
        extra = {"mask_image": mask} if mask is not None else {}
        output = await server.generate(request, model, task, "openai", image=picture, strength=strength,
                                       **given, **extra)
        server.metrics.answered("openai", 200)
        return _answer(output, response_format)

    return api
