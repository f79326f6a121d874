"""The Engine interface every backend implements: load, warm up, run, release."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sdrt.engines.spec import NetworkSpec


class Engine:
    """One network, run from its file.

    `run(feed)` returns new arrays the caller owns; the engine never hands out a buffer that a later
    call overwrites. The lifecycle is explicit: `load()` (also done by the first `run`), `warmup()`,
    `release()`; an engine is also a context manager that releases on exit. `device_resident(inputs)`
    keeps inputs that many calls share (a generation's text conditioning) on the engine's device.
    """

    spec: NetworkSpec | None = None

    @property
    def loaded(self) -> bool:
        raise NotImplementedError

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        """The dtype each input of the loaded network expects."""
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def provider_name(self) -> str:
        """What runs the network, as `--provider` names it (cpu, cuda, tensorrt-ep, tensorrt, ...); loads it."""
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def device_resident(self, inputs: Mapping[str, np.ndarray]) -> dict:
        """`inputs` made ready for many `run` calls: pass the returned values in later feeds instead of the arrays.

        An engine that keeps tensors on a device uploads them here, once (onnxruntime with IO binding),
        or copies them into its fixed input buffers when first run (sdrt.engines.resident). This
        default, for engines that take host arrays, returns the arrays unchanged.
        """
        return dict(inputs)

    def release(self) -> None:
        raise NotImplementedError

    def set_initializers(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Run with these arrays in place of the network file's weights of the same names (initializer names;
        LoRA); `{}` restores the file's. Each call replaces the previous set: nothing stacks."""
        from sdrt.engines.errors import EngineError

        if arrays:
            raise EngineError(f"{type(self).__name__} cannot replace a network's weights")

    def at_full_precision(self) -> "Engine | None":
        """The same network computing in fp32, where this engine computes in a narrower type that a backend picks at
        run time (OpenVINO bf16/f16): the NaN-safe re-run (sdrt.engines.fallback). None: this engine is fp32, or its
        precision is the file's (an fp16 folder keeps its own fp32 copy)."""
        return None

    def warmup(self, dims: Mapping[str, int], runs: int = 1) -> None:
        """Run the network on zeros of the spec's shapes, so that the first real call is not a cold one."""
        if self.spec is None:
            raise ValueError("warmup needs the engine's spec")
        self.load()
        shapes = self.spec.input_shapes(dims)
        feed = {name: np.zeros(shape, dtype=self.input_dtypes[name]) for name, shape in shapes.items()}
        for _ in range(runs):
            self.run(feed)

    def __enter__(self):
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
