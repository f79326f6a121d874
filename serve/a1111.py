"""AUTOMATIC1111's web UI API: /sdapi/v1/txt2img, img2img (with mask), sd-models, samplers, progress, interrupt.

A1111's field names (prompt, negative_prompt, steps, cfg_scale, width, height, seed, sampler_name, scheduler,
batch_size, n_iter, denoising_strength, init_images, mask, inpainting_mask_invert, eta,
override_settings.sd_model_checkpoint) and its response: `images` (base64 PNGs with the infotext),
`parameters` (the request's fields) and `info` (a JSON string: seeds, prompts, infotexts). As A1111, image k of
a request has seed + k: each is its own generation, equal to `sdrt generate --seed SEED+k`, and they are
batched together. A1111 fields that change the picture in ways sdrt does not do (enable_hr, restore_faces,
tiling, scripts, subseeds) are refused when switched on; inpainting is diffusers' (mask_blur, inpainting_fill and
inpaint_full_res have no effect). /sdapi/v1/interrupt ends the requests in flight at the next step and returns
what they have, as A1111 does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import APIRouter, Request
from PIL import Image, ImageOps

from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from sdrt.serve import fields, images

# A1111 sampler names (lower case) -> sdrt scheduler names; "<name> Karras" or scheduler="karras" -> -karras.
SAMPLERS = {"euler a": "euler-a", "euler": "euler", "lms": "lms", "heun": "heun", "dpm++ 2m": "dpm++2m",
            "dpm++ 2m sde": "dpm++2m-sde", "ddim": "ddim", "plms": "pndm", "unipc": "unipc", "lcm": "lcm",
            "ddpm": "ddpm"}
ALIASES = {"k_euler_a": "euler a", "k_euler": "euler", "k_lms": "lms", "k_heun": "heun", "k_dpmpp_2m": "dpm++ 2m",
           "k_dpmpp_2m_sde": "dpm++ 2m sde"}
REFUSED = {"enable_hr": "hires fix", "restore_faces": "face restoration", "tiling": "tiling"}


def scheduler_for(sampler: str | None, schedule: str | None) -> str | None:
    """An A1111 sampler name (and A1111 1.9's separate scheduler: automatic or karras) -> sdrt's scheduler name;
    sdrt's own names are taken too. None: the model's own scheduler."""
    if schedule and schedule.lower() not in ("automatic", "karras", ""):
        raise InvalidInputError(f"scheduler {schedule!r}: sdrt serve takes 'automatic' or 'karras'")
    if sampler is None or sampler == "":
        return None
    key = ALIASES.get(sampler.lower(), sampler.lower())
    karras = key.endswith(" karras") or (schedule or "").lower() == "karras"
    key = key.removesuffix(" karras")
    if key in SAMPLERS:
        name = SAMPLERS[key] + ("-karras" if karras else "")
    elif key in SCHEDULER_NAMES:
        name = key
    else:
        name = None
    if name not in SCHEDULER_NAMES:
        raise InvalidInputError(f"sampler_name {sampler!r}" + (f" with scheduler {schedule!r}" if karras else "")
                                + " is not one sdrt has; GET /sdapi/v1/samplers lists them")
    return name


def samplers() -> list[dict]:
    out = []
    for a1111_name, name in SAMPLERS.items():
        title = {"euler a": "Euler a", "dpm++ 2m": "DPM++ 2M", "dpm++ 2m sde": "DPM++ 2M SDE", "unipc": "UniPC"}.get(
            a1111_name, a1111_name.upper() if len(a1111_name) <= 4 else a1111_name.title())
        out.append({"name": title, "aliases": [name], "options": {}})
        if f"{name}-karras" in SCHEDULER_NAMES:
            out.append({"name": f"{title} Karras", "aliases": [f"{name}-karras"], "options": {"scheduler": "karras"}})
    return out


async def _json(request: Request) -> dict:
    body = await fields.json_object(request)
    for name, what in REFUSED.items():
        if body.get(name):
            raise InvalidInputError(f"{name}: sdrt serve does not do {what}; leave it false")
    if body.get("script_name"):
        raise InvalidInputError(f"script_name {body['script_name']!r}: sdrt serve runs no scripts")
    if fields.get(body, "subseed_strength", float, 0.0) > 0:
        raise InvalidInputError("subseed_strength: sdrt serve has no variation seeds; leave it 0")
    fields.get(body, "send_images", bool)  # read after the work: checked before it
    return body


def _model(server, body: dict):
    override = body.get("override_settings") or {}
    if not isinstance(override, dict):
        raise InvalidInputError("override_settings must be an object")
    return server.model(override.get("sd_model_checkpoint"))


def _settings(body: dict, server) -> dict:
    """The fields every generation of the request shares, and the seeds."""
    scheduler = scheduler_for(fields.get(body, "sampler_name", str) or fields.get(body, "sampler_index", str),
                              fields.get(body, "scheduler", str))
    eta = fields.get(body, "eta", float, minimum=0.0, maximum=1.0)
    batch = fields.get(body, "batch_size", int, 1, minimum=1) * fields.get(body, "n_iter", int, 1, minimum=1)
    if batch > server.limits.max_images:
        raise InvalidInputError(f"batch_size x n_iter = {batch} images is over this server's limit of "
                                f"{server.limits.max_images} (sdrt serve --max-images)")
    seed = fields.get(body, "seed", int, -1)
    if seed == -1:  # A1111's random seed; other negative seeds are torch's, as `sdrt generate --seed` takes them
        seed = secrets.randbelow(2**32)
    return dict(
        shared=dict(
            prompt=fields.get(body, "prompt", str, ""),
            negative_prompt=fields.get(body, "negative_prompt", str) or None,
            num_inference_steps=fields.get(body, "steps", int, minimum=1),
            guidance_scale=fields.get(body, "cfg_scale", float, minimum=0.0),
            scheduler=scheduler,
            eta=eta if scheduler == "ddim" else None,  # A1111's eta is DDIM's (ancestral samplers' is fixed here)
        ),
        seeds=[seed + k for k in range(batch)],
        width=fields.get(body, "width", int, minimum=1),
        height=fields.get(body, "height", int, minimum=1),
    )


async def _run_all(server, request, model, task: str, per_image: list[dict], shared: dict) -> list:
    """One generation per image, submitted together (so they batch); outputs in order. When one fails (a full
    queue), the others are cancelled."""
    tasks = [asyncio.ensure_future(server.generate(request, model, task, "a1111", **shared, **given))
             for given in per_image]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _answer(body: dict, model, settings: dict, outputs: list, denoising_strength=None) -> dict:
    shared = settings["shared"]
    first = outputs[0]
    width, height = first.images[0].size
    infotexts = [o.parameters[0] for o in outputs]
    info = {
        "prompt": shared["prompt"], "all_prompts": [shared["prompt"]] * len(outputs),
        "negative_prompt": shared["negative_prompt"] or "",
        "all_negative_prompts": [shared["negative_prompt"] or ""] * len(outputs),
        "seed": settings["seeds"][0], "all_seeds": settings["seeds"], "subseed": -1,
        "all_subseeds": [-1] * len(outputs), "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": body.get("sampler_name") or model.default_scheduler,
        "cfg_scale": body.get("cfg_scale"), "steps": first.timings.get("steps"),
        "batch_size": body.get("batch_size", 1), "restore_faces": False, "sd_model_name": model.name,
        "sd_model_hash": None, "denoising_strength": denoising_strength, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "interrupted": any(o.timings.get("interrupted") for o in outputs), "version": "sdrt",
    }
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    send = fields.get(body, "send_images", bool, True)
    return {"images": [images.b64_png(o.images[0], o.parameters[0]) for o in outputs] if send else [],
            "parameters": parameters, "info": json.dumps(info)}


def router(server) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    async def txt2img(request: Request):
        body = await _json(request)
        model = _model(server, body)
        settings = _settings(body, server)
        per_image = [dict(seed=seed, width=settings["width"], height=settings["height"]) for seed in settings["seeds"]]
        outputs = await _run_all(server, request, model, "txt2img", per_image, settings["shared"])
        server.metrics.answered("a1111", 200)
        return _answer(body, model, settings, outputs)

    @api.post("/img2img")
    async def img2img(request: Request):
        body = await _json(request)
        model = _model(server, body)
        settings = _settings(body, server)
        init = body.get("init_images")
        if not isinstance(init, list) or not init:
            raise InvalidInputError("init_images must be a list of base64 pictures (one or more)")
        limit = server.limits.max_pixels
        pictures = [images.from_base64(text, f"init_images[{k}]", limit).convert("RGB") for k, text in enumerate(init)]
        mask = body.get("mask")
        mask = None if mask in (None, "") else images.from_base64(mask, "mask", limit).convert("L")
        if mask is not None and fields.get(body, "inpainting_mask_invert", int, 0):
            mask = ImageOps.invert(mask)
        width, height = settings["width"], settings["height"]
        if width is not None and height is not None:  # A1111's resize_mode 0: the pictures resized to the size
            pictures = [p if p.size == (width, height) else p.resize((width, height), Image.Resampling.LANCZOS)
                        for p in pictures]
            if mask is not None and mask.size != (width, height):
                mask = mask.resize((width, height), Image.Resampling.NEAREST)
        strength = fields.get(body, "denoising_strength", float, 0.75)
        task = "img2img" if mask is None else "inpaint"
        per_image = [dict(seed=seed, image=pictures[k % len(pictures)], strength=strength,
                          **({} if mask is None else {"mask_image": mask}))
                     for k, seed in enumerate(settings["seeds"])]
        outputs = await _run_all(server, request, model, task, per_image, settings["shared"])
        server.metrics.answered("a1111", 200)
        return _answer(body, model, settings, outputs, denoising_strength=strength)

    @api.get("/sd-models")
    async def sd_models():
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": str(m.path),
                 "config": None} for name, m in server.models.items()]

    @api.get("/samplers")
    async def list_samplers():
        return samplers()

    @api.get("/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @api.get("/progress")
    async def progress():
        waiting, active = [], []
        for m in server.models.values():
            w, a = m.batcher.jobs()
            waiting += w
            active += a
        done = sum(job.progress[0] for job in active)
        total = sum(job.progress[1] for job in active)
        fraction = done / total if total else 0.0
        elapsed = max((time.perf_counter() - job.started for job in active if job.started), default=0.0)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        steps = max((job.progress for job in active), default=(0, 0), key=lambda p: p[1])
        return {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": any(job.interrupted for job in active),
                          "job": "", "job_count": len(waiting) + len(active), "job_timestamp": "0",
                          "job_no": 0, "sampling_step": steps[0], "sampling_steps": steps[1]}}

    @api.post("/interrupt")
    async def interrupt():
        for m in server.models.values():
            m.batcher.interrupt()
        return {}

    @api.post("/skip")
    async def skip():
        return await interrupt()

    @api.get("/options")
    async def options():
        return {"sd_model_checkpoint": server.default_model or next(iter(server.models))}

    @api.post("/options")
    async def set_options(request: Request):
        body = await _json(request)
        name = body.get("sd_model_checkpoint")
        if name is not None:
            server.default_model = server.model(name).name
        return {}

    @api.post("/png-info")
    async def png_info(request: Request):
        body = await _json(request)
        picture = images.from_base64(body.get("image"), "image", server.limits.max_pixels)
        text = picture.info.get("parameters", "")
        return {"info": text, "items": {k: v for k, v in picture.info.items() if isinstance(v, str)},
                "parameters": {}}

    @api.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    return api
