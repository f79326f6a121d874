"""Reproducible pictures (`sdrt generate --from-png`, a seed per image) and the habits of other tools' users
(sd.cpp/A1111 flags, output formats, --help, pipes), on the bundled demo model (32x32 px, a second a run)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import image as imageio
from sdrt.runtime.cli import build_parser, main
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.reproduce import scheduler_name
from sdrt.runtime.schedulers import SCHEDULER_NAMES

DEMO = str(Path(__file__).resolve().parent.parent / "models" / "shapes-demo-onnx")
PROMPT = "a red circle on a blue background"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def settings(path) -> dict:
    return imageio.parse_parameters(imageio.read_parameters(path))[2]


def run(*argv) -> int:
    return main(["generate", *map(str, argv), "-q"])


# -- reproducible pictures ----------------------------------------------------------------------------------------

def test_from_png_makes_the_same_image_bit_for_bit(tmp_path):
    """Every non-default option goes into the PNG and comes back out of it: the same pixels, the same text."""
    first = tmp_path / "first.png"
    options = ["--steps", "3", "--scheduler", "euler-a", "--guidance", "4.5", "--guidance-interval", "0.5,20",
               "--clip-skip", "1", "--emphasis", "none", "--negative", "green, (blurry:1.3)", "--rng", "numpy",
               "--tile-size", "16", "--tile-overlap", "8", "--low-memory", "--size", "32x48", "--seed", "11"]
    assert run(DEMO, PROMPT, "-o", first, *options) == 0
    made = settings(first)
    assert made["Sampler"] == "euler-a" and made["RNG"] == "numpy" and made["Clip skip"] == "2"
    assert made["Seed"] == "11" and made["Size"] == "32x48" and made["VAE tiling"] == "16/8"
    assert made["Low memory"] == "True" and made["Emphasis"] == "None" and made["Guidance interval"] == "0.5-20.0"
    assert made["Model hash"] == hashlib.sha256(Path(DEMO, "unet", "model.onnx").read_bytes()).hexdigest()[:10]
    assert made["Version"].startswith("sdrt ")

    again = tmp_path / "again.png"
    assert run("--from-png", first, DEMO, "-o", again) == 0
    assert np.array_equal(pixels(again), pixels(first))
    assert imageio.read_parameters(again) == imageio.read_parameters(first)

    # A flag given with --from-png wins over the picture's: another seed, another image.
    other = tmp_path / "other.png"
    assert run("--from-png", first, "-m", DEMO, "-o", other, "--seed", "12") == 0
    assert settings(other)["Seed"] == "12" and settings(other)["Sampler"] == "euler-a"
    assert not np.array_equal(pixels(other), pixels(first))


def test_scheduler_options_are_recorded_and_made_again(tmp_path):
    """Options that differ from the folder's scheduler_config.json go into the text as --scheduler-option takes them."""
    from sdrt.runtime.pipeline import StableDiffusionPipeline
    from sdrt.runtime.reproduce import generate_settings
    from sdrt.runtime.schedulers import load_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(DEMO)
    assert "Scheduler options" not in pipe(PROMPT, num_inference_steps=1, seed=1).parameters[0]
    pipe.scheduler = load_scheduler(dict(pipe.folder.scheduler_config, timestep_spacing="trailing"), name="euler")
    text = pipe(PROMPT, num_inference_steps=1, seed=1).parameters[0]
    assert "Sampler: euler," in text and "Scheduler options: timestep_spacing=trailing," in text
    options, _ = generate_settings(*imageio.parse_parameters(text))
    assert options["scheduler"] == "euler" and options["scheduler_option"] == ["timestep_spacing=trailing"]
    parser = build_parser()
    if "--scheduler-option" not in parser._subparsers._group_actions[0].choices["generate"]._option_string_actions:
        return  # the command line's --scheduler-option (issue 18, section 2) is not there yet
    options = ["--steps", "3", "-s", "2", "--scheduler", "euler", "--scheduler-option", "timestep_spacing=trailing"]
    assert run(DEMO, PROMPT, "-o", tmp_path / "a.png", *options) == 0
    assert run("--from-png", tmp_path / "a.png", DEMO, "-o", tmp_path / "b.png") == 0
    assert run(DEMO, PROMPT, "-o", tmp_path / "plain.png", *options[:-2]) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "plain.png"))


def test_step_caching_is_recorded_and_made_again(tmp_path):
    import shutil

    pytest.importorskip("onnx")  # sdrt deepcache splits the UNet with onnx
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    assert main(["deepcache", str(folder)]) == 0
    assert run(folder, PROMPT, "--steps", "4", "-s", "3", "--cache-interval", "2", "-o", tmp_path / "a.png") == 0
    assert settings(tmp_path / "a.png")["Cache interval"] == "2"
    assert run("--from-png", tmp_path / "a.png", folder, "-o", tmp_path / "b.png") == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


def test_each_image_of_a_batch_has_its_own_seed(tmp_path):
    """-b 3 -s 5: the images of seeds 5, 6, 7, each the image of a run of one with that seed, numbered by %d."""
    assert run(DEMO, PROMPT, "--steps", "2", "-b", "3", "-s", "5", "-o", tmp_path / "batch_%02d.png") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["batch_00.png", "batch_01.png", "batch_02.png"]
    assert [settings(tmp_path / name)["Seed"] for name in names] == ["5", "6", "7"]
    assert run(DEMO, PROMPT, "--steps", "2", "-s", "6", "-o", tmp_path / "alone.png") == 0
    assert np.array_equal(pixels(tmp_path / "batch_01.png"), pixels(tmp_path / "alone.png"))
    assert not np.array_equal(pixels(tmp_path / "batch_00.png"), pixels(tmp_path / "alone.png"))
    assert run("--from-png", tmp_path / "batch_02.png", DEMO, "-o", tmp_path / "again.png") == 0
    assert np.array_equal(pixels(tmp_path / "batch_02.png"), pixels(tmp_path / "again.png"))


def test_api_keeps_one_generator_for_a_batch_unless_given_a_seed_per_image():
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO)
    call = dict(num_inference_steps=2, guidance_scale=3.0, output_type="uint8")
    listed = pipe(PROMPT, num_images_per_prompt=2, seed=[3, 4], **call)
    alone = pipe(PROMPT, seed=4, **call)
    shared = pipe(PROMPT, num_images_per_prompt=2, seed=3, **call)  # diffusers: one generator for the batch
    assert listed.seeds == [3, 4] and shared.seeds == [3, 3] and "Seed: 4" in listed.parameters[1]
    assert np.array_equal(listed.images[1], alone.images[0])
    assert not np.array_equal(shared.images[1], alone.images[0])
    with pytest.raises(InvalidInputError, match="seed has 3 entries for 2 images"):
        pipe(PROMPT, num_images_per_prompt=2, seed=[1, 2, 3], **call)


def test_img2img_and_inpainting_seed_per_image_match_single_runs():
    """A picture's latents are drawn per image too (diffusers' list of generators encodes it once per image)."""
    from sdrt.runtime.img2img import StableDiffusionImg2ImgPipeline
    from sdrt.runtime.inpaint import StableDiffusionInpaintPipeline

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(32)[:, None] < 16, 255, 0).repeat(32, 1).astype(np.uint8))
    call = dict(num_inference_steps=3, strength=0.7, output_type="uint8")
    for pipe, inputs in ((StableDiffusionImg2ImgPipeline.from_pretrained(DEMO), (picture,)),
                         (StableDiffusionInpaintPipeline.from_pretrained(DEMO), (picture, mask))):
        listed = pipe(PROMPT, *inputs, num_images_per_prompt=2, seed=[8, 9], **call)
        alone = pipe(PROMPT, *inputs, seed=9, **call)
        assert np.array_equal(listed.images[1], alone.images[0]), type(pipe).__name__
        assert not np.array_equal(listed.images[0], alone.images[0])


def test_a_random_seed_is_said_and_recorded(tmp_path, capsys):
    for flags in ([], ["--seed", "-1"]):
        out = tmp_path / f"r{len(flags)}.png"
        assert run(DEMO, PROMPT, "--steps", "1", "-o", out, *flags) == 0
        said = capsys.readouterr().err
        seed = settings(out)["Seed"]
        assert f"seed {seed} (random)" in said and seed != "-1"


def test_api_images_keep_their_parameters_when_saved(tmp_path):
    from sdrt.runtime.pipeline import StableDiffusionPipeline

    out = StableDiffusionPipeline.from_pretrained(DEMO)(PROMPT, num_inference_steps=1, seed=1)
    image = out.images[0]
    assert image.info["parameters"] == out.parameters[0]
    for name in ("plain.png", "plain.jpg", "plain.webp"):  # Pillow's own save, no arguments
        image.save(tmp_path / name)
        assert imageio.read_parameters(tmp_path / name) == out.parameters[0], name
    image.save(tmp_path / "theirs.png", pnginfo=imageio.png_info("theirs"))  # what the caller gives wins
    imageio.save_image(image, tmp_path / "other.jpg", "other")
    assert imageio.read_parameters(tmp_path / "theirs.png") == "theirs"
    assert imageio.read_parameters(tmp_path / "other.jpg") == "other"


def test_from_png_refuses_what_a_picture_cannot_carry(tmp_path, capsys):
    text = "a cat\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 32x32"
    cases = {"Denoising strength: 0.5": "give it again as --image",
             'Controlnet: "canny (scale 1, 0-1)"': "give --controlnet",
             "Loras: style:0.5": "give --lora-dir", "RNG: NV": "random stream 'nv'"}
    for extra, message in cases.items():
        picture = tmp_path / "in.png"
        imageio.save_png(Image.new("RGB", (8, 8)), picture, f"{text}, {extra}")
        assert run("--from-png", picture, DEMO, "-o", tmp_path / "out.png") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out.png").exists()
    imageio.save_png(Image.new("RGB", (8, 8)), tmp_path / "bare.png")
    assert run("--from-png", tmp_path / "bare.png", DEMO) == 2
    assert "holds no generation parameters" in capsys.readouterr().err


def resolved(*argv):
    """sdrt generate's arguments as cmd_generate completes them (reproduce.resolve_arguments), without running."""
    from sdrt.runtime.cli import _given
    from sdrt.runtime.reproduce import resolve_arguments

    argv = ["generate", *map(str, argv)]
    args = build_parser().parse_args(argv)
    args.explicit = _given(build_parser(), argv)
    resolve_arguments(args)
    return args


def test_from_png_finds_the_loras_by_name_and_warns_of_another_model(tmp_path, recwarn):
    """LoRAs the prompt's tags do not name come from --lora-dir; a hash or version that differs is a warning."""
    for name in ("style_a", "style_b"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    text = ("a cat <lora:style_b:0.7>\nSteps: 2, Sampler: euler, CFG scale: 7, Seed: 1, Size: 32x32, "
            "Model hash: 0123456789, Model: elsewhere, Loras: \"style_a:0.5, style_b:0.7\", Version: sdrt 0.0.1")
    imageio.save_png(Image.new("RGB", (8, 8)), tmp_path / "in.png", text)
    args = resolved("--from-png", tmp_path / "in.png", DEMO, "--lora-dir", tmp_path, "--steps", "5")
    assert args.lora == [(str(tmp_path / "style_a.safetensors"), 0.5)]  # style_b: the prompt's tag
    assert args.prompt == "a cat <lora:style_b:0.7>" and args.steps == 5 and args.seed == 1
    assert args.scheduler == "euler" and args.size == (32, 32) and not args.random_seed
    said = " ".join(str(w.message) for w in recwarn)
    assert "has the hash 9c875194d8: the image will differ" in said and "made with sdrt 0.0.1" in said
    assert "--provider" not in said
    imageio.save_png(Image.new("RGB", (8, 8)), tmp_path / "gpu.png", text + ", Provider: cuda")
    recwarn.clear()
    assert resolved("--from-png", tmp_path / "gpu.png", DEMO, "--lora-dir", tmp_path).provider == "cpu"
    assert "made with --provider cuda; this run uses cpu" in " ".join(str(w.message) for w in recwarn)
    assert resolved("--from-png", tmp_path / "in.png", DEMO, "--lora", "x.safetensors:1").lora == \
        [("x.safetensors", 1.0)]  # --lora given: the picture's LoRAs are not added


def test_a1111_and_sdcpp_sampler_names():
    assert scheduler_name("euler_a") == scheduler_name("Euler a") == "euler-a"
    assert scheduler_name("dpm++2m") == scheduler_name("DPM++ 2M") == "dpm++2m"
    assert scheduler_name("DPM++ 2M Karras") == scheduler_name("DPM++ 2M", "Karras") == "dpm++2m-karras"
    assert scheduler_name("DPM++ 2M SDE", "Karras") == "dpm++2m-sde-karras"
    assert scheduler_name("PLMS") == "pndm" and scheduler_name("k_lms") == "lms"
    for name in SCHEDULER_NAMES:
        assert scheduler_name(name) == name
    with pytest.raises(InvalidInputError, match="unknown scheduler 'DPM2 a'"):
        scheduler_name("DPM2 a")


def test_an_a1111_infotext_reads_as_sdrt_options():
    from sdrt.runtime.reproduce import generate_settings

    text = ("a cat, (photo:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 7, Seed: 1, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, RNG: CPU, "
            "Hires upscale: 2, Version: v1.10.1")
    with pytest.warns(UserWarning, match="sdrt does not take, left out: Hires upscale"):
        options, facts = generate_settings(*imageio.parse_parameters(text))
    assert options == {"prompt": "a cat, (photo:1.2)", "negative": "blurry", "steps": 20, "guidance": 7.0,
                       "seed": 1, "clip_skip": 1, "rng": "torch", "scheduler": "dpm++2m-karras", "size": (512, 768)}
    assert facts == {"model": "v1-5", "model_hash": "6ce0161689", "version": "v1.10.1"}
    from sdrt.runtime.reproduce import controlnets, loras

    assert controlnets("canny (scale 0.75, 0-1), my depth (scale 1, 0.2-0.5)") == [
        ("canny", 0.75, 0.0, 1.0), ("my depth", 1.0, 0.2, 0.5)]
    assert loras("style a:0.8, b:1") == {"style a": 0.8, "b": 1.0}


# -- the command line's habits --------------------------------------------------------------------------------------

def test_sdcpp_and_a1111_flags_make_the_same_image(tmp_path):
    assert run(DEMO, PROMPT, "-o", tmp_path / "ours.png", "--negative", "green", "--guidance", "4", "--size", "32x48",
               "--seed", "3", "--scheduler", "euler-a", "--steps", "2", "--num-images", "1") == 0
    assert main(["generate", "-q", "-m", DEMO, "-p", PROMPT, "-o", str(tmp_path / "theirs.png"), "-n", "green",
                 "--cfg-scale", "4", "-W", "32", "-H", "48", "-s", "3", "--sampling-method", "euler_a",
                 "--steps", "2", "-b", "1"]) == 0
    assert main(["generate", DEMO, "-o", str(tmp_path / "after.png"), "--negative-prompt", "green", "--cfg-scale",
                 "4", "--size", "32x48", "-s", "3", "--sampler", "Euler a", "--steps", "2", "-q", PROMPT]) == 0
    for name in ("theirs.png", "after.png"):  # the prompt may also stand after the options
        assert np.array_equal(pixels(tmp_path / name), pixels(tmp_path / "ours.png"))
        assert imageio.read_parameters(tmp_path / name) == imageio.read_parameters(tmp_path / "ours.png")


def test_formats_follow_the_extension_with_a1111s_metadata(tmp_path):
    for name, fmt in (("a.jpg", "JPEG"), ("b.jpeg", "JPEG"), ("c.webp", "WEBP"), ("new/folder/d.png", "PNG")):
        assert run(DEMO, PROMPT, "--steps", "1", "--seed", "1", "-o", tmp_path / name) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt
            if fmt == "PNG":
                text = im.text["parameters"]
            else:  # A1111: EXIF UserComment, "UNICODE\0" and UTF-16 big-endian (piexif's "unicode")
                comment = im.getexif().get_ifd(0x8769)[0x9286]
                assert comment.startswith(b"UNICODE\0")
                text = comment[8:].decode("utf-16-be")
        assert text.startswith(PROMPT + "\nSteps: 1")
    assert run(DEMO, PROMPT, "--steps", "1", "--seed", "1", "-o", tmp_path / "low.jpg", "--quality", "5") == 0
    assert (tmp_path / "low.jpg").stat().st_size < (tmp_path / "a.jpg").stat().st_size


def test_bad_outputs_are_refused_before_generating(tmp_path, capsys, monkeypatch):
    import sdrt.runtime.families as families

    monkeypatch.setattr(families, "text_to_image_pipeline", lambda *a, **k: pytest.fail("generated"))
    (tmp_path / "file").write_text("")
    for output, extra, message in (("a.gif", [], "not .gif"), ("a.png", ["--quality", "80"], "--quality applies"),
                                   ("file/x.png", [], "is not a folder"), ("o%d.png", ["-b", "2", "--num-images",
                                                                                       "2"], None)):
        if message is None:
            continue
        assert run(DEMO, PROMPT, "-o", tmp_path / output, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_help_says_every_option_its_default_and_the_schedulers(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    for command in ("generate", "bench", "demo", "info"):
        for action in sub[command]._actions:
            assert action.help, f"sdrt {command} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SCHEDULER_NAMES)
    assert "(default: out.png)" in text and "(default: torch)" in text and "--sampling-method" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("sdrt ")
    assert parser.parse_args(["bench", DEMO, "--num-images", "3"]).batch == 3
    assert parser.parse_args(["generate", DEMO, "x", "--batch", "3"]).num_images == 3


def test_info_into_a_closed_pipe_exits_quietly():
    reader = subprocess.Popen([sys.executable, "-m", "sdrt.runtime.cli", "info", DEMO, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head` does once it has its lines
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 0 and err == ""


def test_bench_plot_without_out_writes_the_chart_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", DEMO, "--steps", "1", "--runs", "1", "--warmup", "0", "--no-cold-start", "--plot",
                 "-q"]) == 0
    charts = list(tmp_path.glob("bench-*.png"))
    assert len(charts) == 1 and str(charts[0].name) in capsys.readouterr().err


def test_quantize_without_onnx_says_which_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["quantize", DEMO, str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sdrt[export]'" in err and "onnx" in err and "Traceback" not in err
