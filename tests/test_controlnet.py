"""ControlNet: tiny random ControlNetModels exported by sdrt, run torch-free beside exported bases, against
diffusers' ControlNet pipelines on the same checkpoints and seeds (txt2img with one and two ControlNets, scales,
start/end windows, guess mode, img2img, inpainting, SDXL, the CLI); the canny preprocessor against OpenCV; bad
inputs refused before anything runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from sdrt.export.controlnet import export_controlnet  # noqa: E402
from sdrt.export.errors import ExportError  # noqa: E402
from sdrt.export.fixtures_controlnet import save_tiny_controlnet  # noqa: E402
from sdrt.runtime.cli import main  # noqa: E402
from sdrt.runtime.controlnet import (  # noqa: E402
    StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline, StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline, control_pipeline)
from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError  # noqa: E402
from sdrt.runtime.pipeline import StableDiffusionPipeline  # noqa: E402

SEED, STEPS, PROMPT = 3, 4, "a red cube on a table"
KW = dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="np")


def picture(width=64, height=64, seed=0) -> Image.Image:
    """A drawn picture (shapes on a gradient): edges and flat areas, as a real control source has."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)
    base = np.stack([np.broadcast_to(x, (height, width))] * 3, axis=-1) * rng.uniform(0.3, 1.0, 3)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        box = (int(x0), int(y0), int(x0 + rng.integers(8, width // 2)), int(y0 + rng.integers(8, height // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def unet_of(checkpoint):
    return diffusers.UNet2DConditionModel.from_pretrained(checkpoint / "unet")


@pytest.fixture(scope="module")
def nets(checkpoints, tiny, tmp_path_factory):
    """name -> (diffusers checkpoint, sdrt export) of tiny ControlNets: two for sd1, one for sd2 and one for SDXL."""
    root = tmp_path_factory.mktemp("controlnets")
    made = {}
    for name, base, seed in (("sd1", checkpoints["sd1"], 0), ("sd1-b", checkpoints["sd1"], 1),
                             ("sd2", checkpoints["sd2"], 0), ("xl", tiny.checkpoint("xl-base"), 0)):
        checkpoint = save_tiny_controlnet(root / f"{name}-ck", unet_of(base), seed=seed)
        made[name] = (checkpoint, export_controlnet(checkpoint, root / f"{name}-onnx"))
    return made


def reference(cls, base, *controlnets):
    loaded = [diffusers.ControlNetModel.from_pretrained(c) for c in controlnets]
    pipe = cls.from_pretrained(base, controlnet=loaded[0] if len(loaded) == 1 else loaded, safety_checker=None) \
        if cls is not diffusers.StableDiffusionXLControlNetPipeline else \
        cls.from_pretrained(base, controlnet=loaded[0] if len(loaded) == 1 else loaded)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded():
    return torch.Generator("cpu").manual_seed(SEED)


# -- export ---------------------------------------------------------------------------------------------------

def test_export_writes_a_validated_folder(nets):
    checkpoint, out = nets["sd1"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "sdrt.json"]
    manifest = json.loads((out / "sdrt.json").read_text())
    assert manifest["kind"] == "controlnet" and manifest["validation"]["passed"]
    assert len({json.dumps(c["dims"]) for c in manifest["validation"]["checks"]}) == 2
    assert all(c["passed"] and c["max_abs"] <= 1e-4 * max(1.0, c["max_ref"]) for c in manifest["validation"]["checks"])
    config = json.loads((checkpoint / "config.json").read_text())
    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    outputs = [o["name"] for o in manifest["spec"]["outputs"]]
    assert len(outputs) == 1 + blocks * layers + blocks - 1 + 1  # conv_in, layers, downsamplers, mid block
    assert not list(out.parent.glob(".*partial"))


def test_export_refuses_what_is_not_a_controlnet(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="not a diffusers ControlNetModel folder"):
        export_controlnet(checkpoints["sd1"], tmp_path / "out")
    with pytest.raises(ExportError, match="describes a UNet2DConditionModel"):
        export_controlnet(checkpoints["sd1"] / "unet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_writes_the_folder_and_refuses_an_existing_one(nets, tmp_path, capsys):
    checkpoint, _ = nets["sd1"]
    assert main(["export-controlnet", str(checkpoint), str(tmp_path / "cn")]) == 0
    assert (tmp_path / "cn" / "model.onnx").is_file()
    assert main(["export-controlnet", str(checkpoint), str(tmp_path / "cn")]) == 2
    assert "exists" in capsys.readouterr().err


# -- parity with diffusers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(), dict(controlnet_conditioning_scale=0.6), dict(control_guidance_start=0.3, control_guidance_end=0.8),
    dict(guess_mode=True, guidance_scale=4.0),
], ids=["default", "scale", "window", "guess"])
def test_txt2img_matches_diffusers(checkpoints, exported, nets, options):
    control = picture()
    expected = reference(diffusers.StableDiffusionControlNetPipeline, checkpoints["sd1"], nets["sd1"][0])(
        image=control, generator=seeded(), **KW, **options).images
    pipe = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1])
    got = pipe(image=control, seed=SEED, **KW, **options).images
    np.testing.assert_allclose(got, expected, atol=1e-4)
    plain = StableDiffusionPipeline.from_pretrained(exported["sd1"])(seed=SEED, height=64, width=64, **KW).images
    assert np.abs(plain - got).max() > 0.01  # the ControlNet acted


def test_two_controlnets_match_multicontrolnet(checkpoints, exported, nets):
    images = [picture(seed=1), picture(seed=2)]
    options = dict(controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[1.0, 0.75])
    expected = reference(diffusers.StableDiffusionControlNetPipeline, checkpoints["sd1"], nets["sd1"][0],
                         nets["sd1-b"][0])(image=images, generator=seeded(), **KW, **options).images
    pipe = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"],
                                                             controlnet=[nets["sd1"][1], nets["sd1-b"][1]])
    np.testing.assert_allclose(pipe(image=images, seed=SEED, **KW, **options).images, expected, atol=1e-4)


def test_a_control_image_of_another_size_is_resized_as_diffusers_does(checkpoints, exported, nets):
    control = picture(width=40, height=72).convert("L")  # another size, and grayscale: converted to RGB
    expected = reference(diffusers.StableDiffusionControlNetPipeline, checkpoints["sd1"], nets["sd1"][0])(
        image=control, height=64, width=64, generator=seeded(), **KW).images
    pipe = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1])
    got = pipe(image=control, height=64, width=64, seed=SEED, **KW).images
    assert got.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_txt2img_takes_the_control_images_size_by_default(checkpoints, exported, nets):
    control = picture(width=96, height=64)
    expected = reference(diffusers.StableDiffusionControlNetPipeline, checkpoints["sd1"], nets["sd1"][0])(
        image=control, generator=seeded(), **KW).images
    got = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1])(
        image=control, seed=SEED, **KW).images
    assert got.shape == expected.shape == (1, 64, 96, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_img2img_matches_diffusers(checkpoints, exported, nets):
    start, control = picture(seed=5), picture(seed=6)
    expected = reference(diffusers.StableDiffusionControlNetImg2ImgPipeline, checkpoints["sd1"], nets["sd1"][0])(
        image=start, control_image=control, strength=0.7, generator=seeded(), **KW).images
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1])
    np.testing.assert_allclose(pipe(image=start, control_image=control, strength=0.7, seed=SEED, **KW).images,
                               expected, atol=1e-4)


def mask(size=64) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((16, 8, 48, 40), fill=255)
    return m


@pytest.mark.parametrize("base", ["sd1", "sd1-inpaint"])
def test_inpainting_matches_diffusers(checkpoints, exported, tiny, nets, base):
    """A 4-channel UNet (blending) and a 9-channel inpainting one; the ControlNet takes the 4 latent channels."""
    checkpoint = checkpoints["sd1"] if base == "sd1" else tiny.checkpoint(base)
    folder = exported["sd1"] if base == "sd1" else tiny[base]
    start, control = picture(seed=7), picture(seed=8)
    expected = reference(diffusers.StableDiffusionControlNetInpaintPipeline, checkpoint, nets["sd1"][0])(
        image=start, mask_image=mask(), control_image=control, generator=seeded(), **KW).images
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(folder, controlnet=nets["sd1"][1])
    got = pipe(image=start, mask_image=mask(), control_image=control, seed=SEED, **KW).images
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_sdxl_matches_diffusers(tiny, nets):
    control = picture(seed=9)
    options = dict(controlnet_conditioning_scale=0.8, guidance_scale=5.0)
    expected = reference(diffusers.StableDiffusionXLControlNetPipeline, tiny.checkpoint("xl-base"), nets["xl"][0])(
        image=control, generator=seeded(), **KW, **options).images
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny["xl-base"], controlnet=nets["xl"][1])
    np.testing.assert_allclose(pipe(image=control, seed=SEED, **KW, **options).images, expected, atol=1e-4)


def test_sdxl_img2img_and_inpainting_match_diffusers(tiny, nets):
    start, control = picture(seed=17), picture(seed=18)
    ck = tiny.checkpoint("xl-base")
    expected = reference(diffusers.StableDiffusionXLControlNetImg2ImgPipeline, ck, nets["xl"][0])(
        image=start, control_image=control, strength=0.6, generator=seeded(), **KW).images
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(tiny["xl-base"], controlnet=nets["xl"][1])
    np.testing.assert_allclose(pipe(image=start, control_image=control, strength=0.6, seed=SEED, **KW).images,
                               expected, atol=1e-4)
    expected = reference(diffusers.StableDiffusionXLControlNetInpaintPipeline, ck, nets["xl"][0])(
        image=start, mask_image=mask(), control_image=control, generator=seeded(), **KW).images
    pipe = StableDiffusionXLControlNetInpaintPipeline.from_pretrained(tiny["xl-base"], controlnet=nets["xl"][1])
    np.testing.assert_allclose(pipe(image=start, mask_image=mask(), control_image=control, seed=SEED, **KW).images,
                               expected, atol=1e-4)


def test_low_memory_gives_the_same_image_and_can_alternate_the_networks(exported, nets, monkeypatch):
    """Low-memory mode keeps the ControlNet beside the UNet during the loop and releases both after it; with
    alternate_controlnet they take turns every call (one network in memory at a time)."""
    from sdrt.runtime import memory

    control = picture(seed=10)
    kw = dict(image=control, seed=SEED, **KW, controlnet_conditioning_scale=0.9)
    normal = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1])(**kw)
    released, release = [], memory.release
    monkeypatch.setattr(memory, "release", lambda engine: released.append(engine) or release(engine))
    for alternate in (False, True):
        released.clear()
        pipe = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1],
                                                                 low_memory=True, alternate_controlnet=alternate)
        np.testing.assert_allclose(pipe(**kw).images, normal.images, atol=1e-5)
        net = pipe.models.controlnets[0][1]
        assert not net.loaded and not pipe.unet.loaded
        # sequential guidance: 2 calls per step; alternating releases the UNet and the ControlNet at each
        calls = 2 * pipe.scheduler.plan(STEPS).num_evaluations
        assert released.count(net) == (calls if alternate else 1)
        if alternate:  # the UNet is loaded once per call, never only to leave again for the first ControlNet call
            assert released.count(pipe.unet) == calls
    with pytest.raises(InvalidInputError, match="alternate_controlnet .* applies in low-memory mode"):
        StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1],
                                                          alternate_controlnet=True)


def test_pooling_and_bgr_controlnets_match_diffusers(checkpoints, exported, nets, tmp_path):
    """A global-pooling ControlNet (shuffle: its spatial means; guess mode on, as diffusers' pipelines turn it on)
    and one that reads its image as BGR."""
    control = picture(seed=19)
    for name, setting in (("pool", dict(global_pool_conditions=True)),
                          ("bgr", dict(controlnet_conditioning_channel_order="bgr"))):
        model = diffusers.ControlNetModel.from_pretrained(nets["sd1"][0])
        model.register_to_config(**setting)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        onnx_folder = export_controlnet(tmp_path / name, tmp_path / f"{name}-onnx")
        expected = reference(diffusers.StableDiffusionControlNetPipeline, checkpoints["sd1"], tmp_path / name)(
            image=control, generator=seeded(), **KW).images
        got = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=onnx_folder)(
            image=control, seed=SEED, **KW).images
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=name)


# -- the CLI ----------------------------------------------------------------------------------------------------

def test_cli_matches_diffusers_within_two_levels(checkpoints, exported, nets, tmp_path):
    control = picture(seed=11)
    control.save(tmp_path / "control.png")
    expected = reference(diffusers.StableDiffusionControlNetPipeline, checkpoints["sd1"], nets["sd1"][0])(
        prompt=PROMPT, image=control, num_inference_steps=STEPS, generator=seeded(),
        controlnet_conditioning_scale=0.75).images[0]
    out = tmp_path / "out.png"
    assert main(["generate", str(exported["sd1"]), PROMPT, "--controlnet", str(nets["sd1"][1]),
                 "--control-image", str(tmp_path / "control.png"), "--control-scale", "0.75",
                 "--steps", str(STEPS), "--seed", str(SEED), "-o", str(out), "-q"]) == 0
    with Image.open(out) as im:
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
        assert 'Controlnet: "' + nets["sd1"][1].name + ' (scale 0.75, 0-1)"' in im.info["parameters"]
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 2


def test_a_controlnet_pipeline_folder_exports_its_base_and_controlnet(tmp_path):
    """diffusers' own test layout (a 2x VAE, a 2-level conditioning embedding), saved as a
    StableDiffusionControlNetPipeline: sdrt export writes the base and controlnet/ beside it; the CLI then gives
    diffusers' image within 2/255."""
    from sdrt.export.fixtures_controlnet import save_tiny_controlnet_pipeline

    checkpoint = save_tiny_controlnet_pipeline(tmp_path / "ck")
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "controlnet" / "sdrt.json").read_text())["validation"]["passed"]
    control = picture(seed=20)
    control.save(tmp_path / "control.png")
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, image=control, num_inference_steps=STEPS, generator=seeded()).images[0]
    assert main(["generate", str(tmp_path / "out"), PROMPT, "--controlnet", str(tmp_path / "out" / "controlnet"),
                 "--control-image", str(tmp_path / "control.png"), "--steps", str(STEPS), "--seed", str(SEED),
                 "-o", str(tmp_path / "o.png"), "-q"]) == 0
    with Image.open(tmp_path / "o.png") as im:
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 2


def test_cli_runs_several_controlnets_img2img_and_inpainting(exported, nets, tmp_path):
    for k, image in enumerate((picture(seed=12), picture(seed=13), picture(seed=14), mask())):
        image.save(tmp_path / f"{k}.png")
    a, b, start, hole = (str(tmp_path / f"{k}.png") for k in range(4))
    common = ["--steps", "3", "--seed", "1", "-q"]
    argv = ["generate", str(exported["sd1"]), PROMPT, "--controlnet", str(nets["sd1"][1]), "--control-image", a,
            "--controlnet", str(nets["sd1-b"][1]), "--control-image", b, "--control-scale", "0.5",
            "--control-scale", "1.5", "--control-end", "0.7", "-o", str(tmp_path / "multi.png"), *common]
    assert main(argv) == 0
    pipe = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"],
                                                             controlnet=[nets["sd1"][1], nets["sd1-b"][1]])
    api = pipe(PROMPT, image=[Image.open(a), Image.open(b)], controlnet_conditioning_scale=[0.5, 1.5],
               control_guidance_end=0.7, num_inference_steps=3, seed=1).images[0]
    with Image.open(tmp_path / "multi.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(api))
    for extra, name in ((["--image", start], "img2img"), (["--image", start, "--mask", hole], "inpaint")):
        assert main(["generate", str(exported["sd1"]), PROMPT, "--controlnet", str(nets["sd1"][1]),
                     "--control-image", a, *extra, "-o", str(tmp_path / f"{name}.png"), *common]) == 0
    img2img = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][1])(
        PROMPT, Image.open(start), Image.open(a), num_inference_steps=3, seed=1).images[0]
    with Image.open(tmp_path / "img2img.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(img2img))


def test_cli_canny_runs_the_preprocessor_first(exported, nets, tmp_path):
    pytest.importorskip("cv2")
    from sdrt.runtime.control import canny

    source = picture(seed=15)
    source.save(tmp_path / "photo.png")
    canny(source, 50, 150).save(tmp_path / "edges.png")
    common = [str(exported["sd1"]), PROMPT, "--controlnet", str(nets["sd1"][1]), "--steps", "2", "--seed", "4", "-q"]
    assert main(["generate", *common, "--control-image", str(tmp_path / "photo.png"), "--canny",
                 "--canny-thresholds", "50,150", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", *common, "--control-image", str(tmp_path / "edges.png"), "-o",
                 str(tmp_path / "b.png")]) == 0
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_canny_matches_opencv_on_a_drawn_picture():
    cv2 = pytest.importorskip("cv2")
    from sdrt.runtime.control import canny

    source = picture(width=128, height=96, seed=16)
    edges = np.asarray(canny(source))
    expected = cv2.Canny(np.asarray(source), 100, 200)  # controlnet_aux's CannyDetector at its defaults
    assert edges.shape == (96, 128, 3) and expected.any()
    assert all(np.array_equal(edges[..., c], expected) for c in range(3))
    with pytest.raises(InvalidInputError, match="low 200 is above high 100"):
        canny(source, 200, 100)


# -- refusals -----------------------------------------------------------------------------------------------------

def test_a_controlnet_for_another_base_is_refused_naming_both(exported, nets, tiny):
    with pytest.raises(UnsupportedConfigError, match="cross-attention width 64 vs the base's 32") as e:
        StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd2"][1])
    assert str(nets["sd2"][1]) in str(e.value) and str(exported["sd1"]) in str(e.value)
    with pytest.raises(UnsupportedConfigError, match="does not fit the base"):
        StableDiffusionXLControlNetPipeline.from_pretrained(tiny["xl-base"], controlnet=nets["sd1"][1])
    with pytest.raises(ModelFolderError, match="export it first with sdrt export-controlnet"):
        StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"], controlnet=nets["sd1"][0])


def test_a_unet_without_residual_inputs_is_refused(exported, nets, tmp_path):
    """A folder from before the residual inputs (or from optimum): told to export the base again."""
    old = tmp_path / "old"
    shutil.copytree(exported["sd1"], old)
    config_path = old / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("sdrt_control_residuals")
    config_path.write_text(json.dumps(config, indent=2))
    manifest = json.loads((old / "sdrt.json").read_text())
    from sdrt.engines.files import sha256_file

    record = manifest["files"].get("unet/config.json")
    if record is not None:
        record.update(size=config_path.stat().st_size, sha256=sha256_file(config_path))
    (old / "sdrt.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(UnsupportedConfigError, match="takes no ControlNet residuals"):
        StableDiffusionControlNetPipeline.from_pretrained(old, controlnet=nets["sd1"][1])


@pytest.mark.parametrize("options,message", [
    (dict(controlnet_conditioning_scale=[0.5, 1.0, 1.0]), "controlnet_conditioning_scale has 3 entries for 2"),
    (dict(control_guidance_start=[0.0, 0.9], control_guidance_end=[1.0, 0.5]), "must be below"),
    (dict(image=None), "give the control image"),
    (dict(image=[Image.new("RGB", (64, 64))]), "2 ControlNets take 2 control images"),
    (dict(controlnet_conditioning_scale=-1.0), "controlnet_conditioning_scale"),
    (dict(guess_mode="yes"), "guess_mode must be True or False"),
])
def test_bad_control_arguments_are_refused_before_any_engine_runs(exported, nets, options, message):
    pipe = StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"],
                                                             controlnet=[nets["sd1"][1], nets["sd1-b"][1]])

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("an engine ran before the arguments were checked")

    pipe.unet = pipe.text_encoder = Untouchable()
    kwargs = dict(dict(image=[picture(), picture()], num_inference_steps=2, seed=1), **options)
    with pytest.raises(InvalidInputError, match=message):
        pipe(PROMPT, **kwargs)


def test_pipelines_need_a_controlnet_and_a_supported_family(exported, tiny, nets):
    with pytest.raises(InvalidInputError, match="needs controlnet="):
        StableDiffusionControlNetPipeline.from_pretrained(exported["sd1"])
    with pytest.raises(UnsupportedConfigError, match="latent-consistency folder for txt2img is not supported"):
        control_pipeline(tiny["lcm"], "txt2img", controlnet="unused")
    assert isinstance(control_pipeline(tiny["xl-base"], "inpaint", controlnet=nets["xl"][1]),
                      StableDiffusionXLControlNetInpaintPipeline)


@pytest.mark.parametrize("extra,message", [
    (["--control-image", "x.png"], "--control-image applies only with --controlnet"),
    (["--guess-mode", "--control-scale", "2"], "apply only with --controlnet"),
    (["--controlnet", "CN", "--control-image", "a.png", "--control-image", "b.png", "--control-image", "c.png",
      "--controlnet", "CN"], "2 --controlnet take 2 --control-image"),
    (["--controlnet", "CN", "--control-image", "a.png", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale was given 2 times for 1 --controlnet"),
    (["--controlnet", "CN", "--control-image", "a.png", "--refiner", "R"], "does not combine with --refiner"),
    (["--controlnet", "CN", "--control-image", "a.png", "--canny-thresholds", "1,2"], "applies only with --canny"),
    (["--controlnet", "CN", "--control-image", "missing.png"], "cannot read --control-image"),
    (["--controlnet", "CN", "--control-image", "a.png", "--alternate-controlnet"], "applies with --low-memory"),
    (["--alternate-controlnet", "--low-memory"], "--alternate-controlnet applies only with --controlnet"),
])
def test_cli_refuses_bad_control_flags_with_one_line(exported, nets, tmp_path, capsys, extra, message):
    argv = [a.replace("CN", str(nets["sd1"][1])) for a in extra]
    picture().save(tmp_path / "a.png")
    argv = [str(tmp_path / a) if a.endswith(".png") and a != "missing.png" else a for a in argv]
    for name in ("b.png", "c.png"):
        picture().save(tmp_path / name)
    assert main(["generate", str(exported["sd1"]), PROMPT, *argv, "-o", str(tmp_path / "o.png"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
