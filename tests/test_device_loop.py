"""The denoise loop keeps the UNet's conditioning on its device: the same images with IO binding off, on, and with
fixed input buffers (CUDA graphs' mode), for batched and sequential guidance, SD and SDXL (whose UNet takes more
conditioning); the conditioning is uploaded once per generation, not per step; fixed buffers keep their addresses;
CUDA graphs are refused where they cannot run. All on onnxruntime's CPU provider, where IO binding runs too."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from sdrt.engines.errors import EngineError
from sdrt.engines.iobinding import BoundRunner
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.engines.resident import BufferContents, Resident
from sdrt.runtime.pipeline import StableDiffusionPipeline

PROMPTS = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
ENGINE_MODES = {"plain": {}, "io_binding": {"io_binding": True}, "fixed_shapes": {"fixed_shapes": True}}
CFG_MODES = ("batched", "sequential")


def generate(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    return pipe(PROMPTS, negative_prompt=["", "blurry"], num_inference_steps=steps, guidance_scale=6.0, seed=3,
                output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def xl_folder(tiny):
    pytest.importorskip("diffusers")
    return tiny["xl-base"]


# -- the same images --------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_mode", CFG_MODES)
def test_sd_images_are_the_same_with_the_conditioning_on_the_device(exported, cfg_mode):
    images = {mode: generate(StableDiffusionPipeline.from_pretrained(exported["sd1"], cfg_mode=cfg_mode, **options))
              for mode, options in ENGINE_MODES.items()}
    for mode in ("io_binding", "fixed_shapes"):
        assert np.array_equal(images[mode], images["plain"]), mode


@pytest.mark.parametrize("cfg_mode", CFG_MODES)
def test_sdxl_images_are_the_same_with_the_conditioning_on_the_device(xl_folder, cfg_mode):
    """SDXL's UNet also takes text_embeds and time_ids (`unet_inputs`), split per half like the embeddings."""
    from sdrt.runtime.sdxl import StableDiffusionXLPipeline

    images = {mode: generate(StableDiffusionXLPipeline.from_pretrained(xl_folder, cfg_mode=cfg_mode, **options),
                             steps=2)
              for mode, options in ENGINE_MODES.items()}
    for mode in ("io_binding", "fixed_shapes"):
        assert np.array_equal(images[mode], images["plain"]), mode


# -- uploads: once per generation -------------------------------------------------------------------

def record_feeds(engine) -> list[dict]:
    """Every feed `engine.run` gets from now on."""
    feeds, run = [], engine.run
    engine.run = lambda feed: feeds.append(dict(feed)) or run(feed)
    return feeds


@pytest.mark.parametrize("cfg_mode", CFG_MODES)
def test_io_binding_uploads_the_conditioning_once_per_generation(exported, monkeypatch, cfg_mode):
    uploads, ortvalue = [], BoundRunner.ortvalue
    monkeypatch.setattr(BoundRunner, "ortvalue",
                        lambda runner, array: uploads.append(runner) or ortvalue(runner, array))
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="ddim", cfg_mode=cfg_mode,
                                                   io_binding=True)
    feeds = record_feeds(pipe.unet)
    calls_per_step = 2 if cfg_mode == "sequential" else 1
    for steps in (1, 4):
        uploads.clear()
        feeds.clear()
        generate(pipe, steps=steps)
        assert len(feeds) == steps * calls_per_step
        conditioning = [feed["encoder_hidden_states"] for feed in feeds]
        assert all(isinstance(value, ort.OrtValue) for value in conditioning)
        assert len({id(value) for value in conditioning}) == calls_per_step  # the same device values every step
        assert all(isinstance(feed["sample"], np.ndarray) for feed in feeds)  # the sample still goes per step
        # Once per generation for each constant input (the conditioning, zero ControlNet residuals), not per step.
        constant = len(pipe.unet.spec.inputs) - 2  # all but sample and timestep
        assert sum(runner is pipe.unet._runner for runner in uploads) == calls_per_step * constant


def test_without_io_binding_the_loop_feeds_host_arrays(exported):
    """The plain path: device_resident hands the arrays back as they are, and no IO binding is set up."""
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    assert not pipe.unet.io_binding  # the CPU provider's default
    feeds = record_feeds(pipe.unet)
    embeds = np.ones((2, 77, 32), np.float32)
    assert pipe.unet.device_resident({"encoder_hidden_states": embeds})["encoder_hidden_states"] is embeds
    generate(pipe, steps=2)
    assert all(isinstance(v, np.ndarray) for feed in feeds for v in feed.values())
    assert feeds[0]["encoder_hidden_states"] is feeds[1]["encoder_hidden_states"]
    assert pipe.unet._runner is None


class CountingBinding:
    """An onnxruntime IO binding that records which inputs get bound to an OrtValue (and so to an address)."""

    def __init__(self, binding):
        self._binding, self.bound = binding, Counter()

    def bind_ortvalue_input(self, name, value):
        self.bound[name] += 1
        self._binding.bind_ortvalue_input(name, value)

    def __getattr__(self, name):
        return getattr(self._binding, name)


@pytest.mark.parametrize("cfg_mode", CFG_MODES)
def test_fixed_buffers_keep_their_addresses_and_take_the_conditioning_when_it_changes(exported, monkeypatch, cfg_mode):
    copies, copy_in = Counter(), BoundRunner._copy_in
    monkeypatch.setattr(BoundRunner, "_copy_in",
                        lambda runner, name, array: copies.update([name]) or copy_in(runner, name, array))
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], scheduler="ddim", cfg_mode=cfg_mode,
                                                   fixed_shapes=True)
    runner = pipe.unet._bound()
    runner.binding = CountingBinding(runner.binding)
    steps, generations = 3, 2
    for _ in range(generations):
        generate(pipe, steps=steps)
    calls = steps * generations * (2 if cfg_mode == "sequential" else 1)
    assert copies["sample"] == copies["timestep"] == calls
    # Batched: one conditioning per generation, copied in once. Sequential: the halves take turns in one buffer.
    assert copies["encoder_hidden_states"] == (calls if cfg_mode == "sequential" else generations)
    residuals = [t.name for t in pipe.unet.spec.inputs if "residual" in t.name]
    assert residuals and all(copies[name] == copies["encoder_hidden_states"] for name in residuals)
    assert runner.binding.bound == {t.name: 1 for t in pipe.unet.spec.inputs}  # one address each
    assert pipe.unet._other_shapes is None


def test_fixed_buffers_refuse_an_ortvalue_at_a_new_address(exported):
    from sdrt.runtime.config import ModelFolder

    folder = ModelFolder.open(exported["sd1"])
    engine = OrtEngine(folder.onnx_path("unet"), folder.spec("unet"), fixed_shapes=True)
    rng = np.random.default_rng(0)
    spec = folder.spec("unet")
    feed = {t.name: np.zeros(t.resolve(spec.dims(2, 64, 64)), np.float32) for t in spec.inputs}
    feed.update(sample=rng.standard_normal((2, 4, 8, 8), dtype=np.float32), timestep=np.ones(2, np.float32))
    embeds = rng.standard_normal((2, 77, 32), dtype=np.float32)
    engine.run({**feed, "encoder_hidden_states": engine.to_device(embeds)})
    with pytest.raises(EngineError, match="moved to another device address"):
        engine.run({**feed, "encoder_hidden_states": engine.to_device(embeds)})


def test_fixed_buffers_do_not_write_into_the_callers_arrays(exported):
    """On the CPU onnxruntime wraps a NumPy array's memory: a fixed buffer must be a copy, or the next call's
    update would overwrite the first caller's array."""
    from sdrt.runtime.config import ModelFolder

    folder = ModelFolder.open(exported["sd1"])
    engine = OrtEngine(folder.onnx_path("vae_decoder"), folder.spec("vae_decoder"), fixed_shapes=True)
    first = np.zeros((1, 4, 8, 8), np.float32)
    engine.run({"latent_sample": first})
    engine.run({"latent_sample": np.ones((1, 4, 8, 8), np.float32)})
    assert not first.any()


# -- options: where they go, where they are refused --------------------------------------------------

def test_fixed_shapes_go_to_the_unet_only(exported):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], fixed_shapes=True)
    assert pipe.unet.fixed_shapes
    assert not pipe.text_encoder.fixed_shapes and not pipe.vae_decoder.fixed_shapes


def test_cuda_graph_on_the_cpu_provider_is_a_clear_error(exported):
    with pytest.raises(EngineError, match="cuda_graph needs the CUDA or TensorRT execution provider"):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], cuda_graph=True)


# -- native TensorRT: the same contract on its own buffers (fakes stand in for the GPU) ---------------

class FakeBuffer:
    def __init__(self):
        self.ptr, self.nbytes = 0, 0

    def reserve(self, nbytes):
        if nbytes > self.nbytes:
            self.ptr, self.nbytes = self.ptr + 1, nbytes


class FakeStream:
    has_graph, ptr = False, 0

    def __init__(self, names):
        self.names, self.uploads = names, Counter()

    def upload(self, buffer, array):
        self.uploads[self.names[id(buffer)]] += 1

    def download(self, buffer, shape, dtype):
        return np.zeros(shape, dtype)

    def drop_graph(self):
        pass


class FakeContext:
    def set_input_shape(self, name, shape):
        self.shapes = {**getattr(self, "shapes", {}), name: shape}
        return True

    def get_tensor_shape(self, name):
        return self.shapes["sample"]

    def set_tensor_address(self, name, ptr):
        pass

    def execute_async_v3(self, stream):
        return True


def fake_plan():
    from sdrt.engines.tensorrt import _LoadedPlan

    plan = object.__new__(_LoadedPlan)
    plan.inputs, plan.outputs = ["sample", "encoder_hidden_states"], ["out_sample"]
    plan.dtypes = {n: np.dtype(np.float32) for n in plan.inputs + plan.outputs}
    plan.buffers = {n: FakeBuffer() for n in plan.dtypes}
    plan.stream = FakeStream({id(b): n for n, b in plan.buffers.items()})
    plan.context, plan.contents, plan.bound_shapes = FakeContext(), BufferContents(), None
    return plan


def test_tensorrt_plan_copies_a_resident_input_only_when_its_buffer_holds_another():
    plan = fake_plan()
    sample = np.zeros((2, 4, 8, 8), np.float32)
    positive, negative = Resident(np.ones((2, 77, 32))), Resident(np.zeros((2, 77, 32)))
    for embeds in (positive, positive, positive, negative, positive):
        plan.run({"sample": sample, "encoder_hidden_states": embeds}, cuda_graph=False)
    assert plan.stream.uploads == {"sample": 5, "encoder_hidden_states": 3}
    larger = np.zeros((2, 4, 16, 16), np.float32)
    plan.run({"sample": larger, "encoder_hidden_states": positive}, cuda_graph=False)
    assert plan.stream.uploads["encoder_hidden_states"] == 4  # new shapes rebind the buffers: copied in again
    plan.run({"sample": larger, "encoder_hidden_states": positive.array}, cuda_graph=False)
    plan.run({"sample": larger, "encoder_hidden_states": positive}, cuda_graph=False)
    assert plan.stream.uploads["encoder_hidden_states"] == 6  # a host array in between replaced the resident one
