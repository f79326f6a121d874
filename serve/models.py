"""ServedModel: an exported folder opened once for the server, and API fields turned into a checked Request.

One Generator per folder (one set of engines, shared by txt2img, img2img and inpainting); each task's Request
is built exactly as its diffusers-named facade builds it (the facade's own defaults, `Request.from_arguments`),
so that a request equals the same call of the pipeline or the CLI.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from sdrt.runtime.config import ModelFolder
from sdrt.runtime.core.facade import check_folder
from sdrt.runtime.core.generate import Generator
from sdrt.runtime.core.request import Request
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.families import image_to_image_class, inpaint_class, text_to_image_class
from sdrt.runtime.schedulers import load_scheduler
from sdrt.serve.batcher import Batcher
from sdrt.serve.limits import Limits

TASKS = (("txt2img", text_to_image_class), ("img2img", image_to_image_class), ("inpaint", inpaint_class))


class ServedModel:
    """A folder's Generator, the facade class of each task it can run, and its Batcher."""

    def __init__(self, path, provider: str = "cpu", scheduler: str | None = None, verify: str = "size",
                 emphasis: str = "original", max_batch: int = 8, max_queue: int = 32, batching: bool = True,
                 metrics=None, name: str | None = None):
        folder = ModelFolder.open(path, verify=verify)
        self.name = name or Path(folder.path).resolve().name
        self.path = Path(folder.path)
        self.facades: dict[str, type] = {}
        family, refusals = None, []
        for task, pick in TASKS:
            facade = pick(folder)
            if facade.needs_encoder and "vae_encoder" not in folder.components:
                refusals.append(f"{task}: the folder has no vae_encoder")
                continue
            try:
                made = check_folder(folder, facade.family, facade.task, facade.__name__)
            except (UnsupportedConfigError, ModelFolderError) as e:
                refusals.append(f"{task}: {e}")
                continue
            self.facades[task] = facade
            family = family or made
        if family is None:
            raise ModelFolderError(f"{folder.path}: sdrt serve can run none of its tasks ({'; '.join(refusals)})")
        encoder = any(self.facades[task].needs_encoder for task in self.facades)
        self.generator = Generator(folder, family, provider=provider, scheduler=scheduler, encoder=encoder,
                                   emphasis=emphasis)
        self.default_scheduler = scheduler or load_scheduler(folder.scheduler_config).name
        self.batcher = Batcher(self.generator, self.name, max_batch=max_batch, max_queue=max_queue,
                               batching=batching, metrics=metrics)

    @property
    def folder(self) -> ModelFolder:
        return self.generator.folder

    def defaults(self, task: str) -> dict:
        """The facade's keyword defaults (steps, guidance, strength, ...) for `task`."""
        parameters = inspect.signature(self._facade(task).__call__).parameters
        return {name: p.default for name, p in parameters.items()
                if name != "self" and p.default is not inspect.Parameter.empty}

    def _facade(self, task: str) -> type:
        if task not in self.facades:
            raise InvalidInputError(f"model {self.name!r} cannot run {task} (it runs {', '.join(self.facades)})")
        return self.facades[task]

    def request(self, task: str, limits: Limits, **given) -> tuple[Request, list]:
        """A checked Request for `task` from the API's fields (None = the facade's default) and its task list."""
        facade = self._facade(task)
        arguments = self.defaults(task)
        if getattr(self.generator.family, "distilled_guidance", None) is False:
            # A Flux schnell-type model takes no guidance; A1111 clients send cfg_scale with every request
            given = {name: value for name, value in given.items() if name != "guidance_scale"}
        arguments.update({name: value for name, value in given.items() if value is not None})
        arguments.update(output_type="pil", progress=False, callback=None)
        prompts = arguments.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        negatives = arguments.get("negative_prompt")
        negatives = [negatives] if isinstance(negatives, str) else list(negatives or [])
        size = self.folder.default_size
        width = arguments.get("width") or getattr(given.get("image"), "width", None) or size
        height = arguments.get("height") or getattr(given.get("image"), "height", None) or size
        limits.check(width=width, height=height, steps=arguments.get("num_inference_steps"),
                     images=len(prompts) * arguments.get("num_images_per_prompt", 1)
                     if isinstance(arguments.get("num_images_per_prompt", 1), int) else None,
                     prompts=prompts + negatives)
        if getattr(self.generator.family, "resizes_pictures", False) and task != "txt2img" \
                and given.get("image") is not None:
            # SD3 / Flux resize the picture to height x width (default the model's size): keep the picture's
            m = self.folder.pixel_multiple
            arguments.update(height=max(m, int(height) // m * m), width=max(m, int(width) // m * m))
        elif task == "img2img":  # the img2img facades take no size: the output has the picture's
            arguments.pop("height", None)
            arguments.pop("width", None)
        return Request.from_arguments(facade.call_arguments(arguments)), [facade.task()]

    def submit(self, task: str, limits: Limits, **given):
        """Check and queue; the Job (its `future` gets the PipelineOutput)."""
        request, tasks = self.request(task, limits, **given)
        return self.batcher.submit(request, tasks)

    def close(self) -> None:
        self.batcher.close()
        self.generator.models.release()
