"""The timestep as a UNet of another exporter takes it.

sdrt's own UNets take one timestep per batch row (shape (batch,)). A UNet exported by optimum (`optimum-cli export
onnx`, its torchscript path) was traced with the scalar timestep its pipeline feeds, and declares ['batch'] while its
time projection only works with a scalar: fed (batch,) it fails in /time_proj/Mul ("Attempting to broadcast an axis
by a dimension other than 1"). The declared shape does not say which form a file takes, so the UNet of a folder sdrt
did not write is asked once: fed as sdrt feeds it, and on failure the scalar form, which is then kept. Rows at
different timesteps (a server batching requests) run as one call per distinct timestep.
"""

from __future__ import annotations

import numpy as np

from sdrt.engines.errors import EngineError


class TimestepForm:
    """An engine wrapper (everything but `run` goes to the engine) that feeds "timestep" in the form the network
    takes: "batch" (one per row) or "scalar" (optimum's); None until the first call has told."""

    def __init__(self, engine):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "form", None)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        if name == "form":
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)

    def run(self, feed):
        if self.form == "scalar":
            return self._scalar(feed)
        if self.form == "batch":
            return self._engine.run(feed)
        try:
            outputs = self._engine.run(feed)
        except EngineError as batch_error:
            try:
                outputs = self._scalar(feed)
            except EngineError:
                raise batch_error from None
            self.form = "scalar"
            return outputs
        self.form = "batch"
        return outputs

    def _scalar(self, feed) -> dict:
        t = np.asarray(feed["timestep"]).reshape(-1)
        values = np.unique(t)
        if len(values) == 1:
            return self._engine.run({**feed, "timestep": t[:1].reshape(())})
        rows = len(t)
        if any(not isinstance(v, np.ndarray) for v in feed.values()):
            raise EngineError(f"{self._engine.path}: this UNet takes one timestep per call (an optimum export), so rows "
                              "at different timesteps run one call each, which needs host arrays; give the folder an "
                              "sdrt export for mixed-timestep batches on a device")
        parts, order = [], []
        for value in values:
            index = np.flatnonzero(t == value)
            sub = {n: (a[index] if a.ndim and len(a) == rows else a) for n, a in feed.items() if n != "timestep"}
            parts.append(self._engine.run({**sub, "timestep": np.asarray(value, dtype=t.dtype)}))
            order.append(index)
        index = np.concatenate(order)
        inverse = np.empty_like(index)
        inverse[index] = np.arange(len(index))
        return {name: np.concatenate([p[name] for p in parts])[inverse] for name in parts[0]}


def adapt(engine, folder):
    """The UNet engine of `folder`, wrapped to find its timestep form when sdrt did not write the folder."""
    return engine if folder.manifest is not None else TimestepForm(engine)
