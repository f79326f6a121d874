"""The server's request limits, with safe defaults; a request over one is refused (400, or 413 for the body)."""

from __future__ import annotations

from dataclasses import dataclass

from sdrt.runtime.errors import InvalidInputError


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_steps: int = 150
    max_images: int = 8  # images per request
    max_prompt_chars: int = 4000  # prompt and negative prompt, each
    max_body_bytes: int = 32 * 1024 * 1024  # a request body (base64 pictures included)

    def check(self, *, width: int | None, height: int | None, steps: int, images: int, prompts: list) -> None:
        """InvalidInputError naming the field and the limit, and the flag that raises it."""
        if width is not None and height is not None and width * height > self.max_pixels:
            raise InvalidInputError(f"size {width}x{height} is {width * height} pixels, over this server's limit of "
                                    f"{self.max_pixels} (sdrt serve --max-pixels); ask for a smaller size")
        if isinstance(steps, int) and steps > self.max_steps:
            raise InvalidInputError(f"steps={steps} is over this server's limit of {self.max_steps} "
                                    "(sdrt serve --max-steps)")
        if isinstance(images, int) and images > self.max_images:
            raise InvalidInputError(f"{images} images per request is over this server's limit of {self.max_images} "
                                    "(sdrt serve --max-images); send several requests")
        for text in prompts:
            if isinstance(text, str) and len(text) > self.max_prompt_chars:
                raise InvalidInputError(f"a prompt of {len(text)} characters is over this server's limit of "
                                        f"{self.max_prompt_chars} (sdrt serve --max-prompt-chars)")
