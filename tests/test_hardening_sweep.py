"""Bad inputs found by a sweep of every user-facing surface (issue 19): each is refused with sdrt's typed error (CLI:
exit 2 and one line) before the work, and nothing is left half-written."""

from __future__ import annotations

import errno
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from sdrt.engines.errors import SdrtError
from sdrt.runtime import image as imageio
from sdrt.runtime.cli import main
from sdrt.runtime.demo import default_model
from sdrt.runtime.errors import InvalidInputError, OutputWriteError
from sdrt.runtime.schedulers import load_scheduler

DEMO = str(default_model())


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


class Stop(SdrtError):
    """Raised in place of loading a pipeline: the checks before it passed."""


@pytest.fixture
def no_pipeline(monkeypatch):
    import sdrt.runtime.families as families

    def refuse(*args, **kwargs):
        raise Stop("the pipeline would load now")

    monkeypatch.setattr(families, "text_to_image_pipeline", refuse)


# -- output paths ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,message", [
    ("a\0b.png", "NUL character"),
    ("a" * 300 + ".png", "File name too long"),
    ("out.png/", "ends with a slash"),
])
def test_impossible_file_names_are_refused_before_generating(tmp_path, capsys, no_pipeline, name, message):
    code = main(["generate", DEMO, "x", "-q", "-o", f"{tmp_path}/{name}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and one_line(err), err
    with pytest.raises(InvalidInputError, match=message):
        imageio.check_output_path(f"{tmp_path}/{name}")


def test_a_write_that_fails_is_a_typed_error_and_leaves_nothing(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # what /sys, a read-only mount or a full disk answer at the rename
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(OutputWriteError, match="cannot write .*out.png: Read-only file system") as caught:
        imageio.save_image(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    assert isinstance(caught.value, OSError) and isinstance(caught.value, SdrtError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,error,message", [
    ("a\0b.png", InvalidInputError, "NUL character"),
    ("a" * 300 + ".png", OutputWriteError, "File name too long"),
])
def test_save_image_refuses_impossible_names_typed(tmp_path, name, error, message):
    with pytest.raises(error, match=message):
        imageio.save_image(Image.new("RGB", (8, 8)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_reports_a_failed_write_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    code = main(["generate", DEMO, "a red circle", "--steps", "1", "-q", "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left" in err and one_line(err), err
    assert list(tmp_path.iterdir()) == []


def test_many_numbered_names_are_checked_without_a_call_each(tmp_path, capsys, monkeypatch, no_pipeline):
    calls = []
    check = imageio.check_output_path
    monkeypatch.setattr(imageio, "check_output_path", lambda path, *a: calls.append(path) or check(path, *a))
    (tmp_path / "out-7.png").mkdir()  # a name taken by a folder is still found
    code = main(["generate", DEMO, "x", "-q", "-b", "100000", "-o", str(tmp_path / "out.png")])
    assert code == 2 and "out-7.png is a directory" in capsys.readouterr().err
    assert len(calls) <= 3


# -- sizes and options -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["-W", "0"], "width must be an integer >= 1, got 0"),
    (["-H", "0"], "height must be an integer >= 1, got 0"),
    (["-W", "-16"], "width must be an integer >= 1, got -16"),
])
def test_a_zero_width_or_height_is_refused_not_replaced_by_the_default(tmp_path, capsys, flags, message):
    code = main(["generate", DEMO, "x", "--steps", "1", "-q", "-o", str(tmp_path / "o.png"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and one_line(err), err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--eta", "nan"], "--eta: eta must be a finite number"),
    (["--guidance-rescale", "2"], "--guidance-rescale: guidance_rescale must be in [0, 1]"),
    (["--guidance-interval", "nan,1"], "--guidance-interval: guidance_interval[0] must be a finite number"),
    (["--seed", str(2**64)], "--seed: seed must be in"),
    (["--size", "0x32"], "--size: width must be an integer >= 1"),
])
def test_api_messages_name_the_option_that_sets_them(tmp_path, capsys, flags, message):
    code = main(["generate", DEMO, "x", "--steps", "1", "-q", "-o", str(tmp_path / "o.png"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and one_line(err), err


@pytest.mark.parametrize("option,message", [
    (dict(rescale_betas_zero_snr="maybe"), "rescale_betas_zero_snr must be true or false"),
    (dict(clip_sample=1), "clip_sample must be true or false"),
    (dict(set_alpha_to_one="false"), "set_alpha_to_one must be true or false"),
    (dict(steps_offset=-100), "steps_offset must be >= 0"),
])
def test_scheduler_options_of_the_wrong_kind_are_refused(option, message):
    with pytest.raises(InvalidInputError, match=message):
        load_scheduler({"_class_name": "DDIMScheduler", **option})


def test_a_missing_lora_dir_is_refused_even_without_tags(tmp_path, capsys, no_pipeline):
    code = main(["generate", DEMO, "x", "-q", "-o", str(tmp_path / "o.png"), "--lora-dir", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "--lora-dir" in err and "is not a folder" in err and one_line(err), err


def test_a_bad_scheduler_option_on_the_command_line_is_one_line(tmp_path, capsys, no_pipeline):
    code = main(["generate", DEMO, "x", "-q", "-o", str(tmp_path / "o.png"),
                 "--scheduler-option", "rescale_betas_zero_snr=maybe"])
    err = capsys.readouterr().err
    assert code == 2 and "must be true or false" in err and one_line(err), err


def test_export_refuses_unknown_components_before_reading_the_source(tmp_path, capsys):
    pytest.importorskip("torch")
    code = main(["export", str(tmp_path / "no-such-checkpoint.safetensors"), str(tmp_path / "out"),
                 "--components", ""])
    err = capsys.readouterr().err
    assert code == 2 and "unknown components" in err and one_line(err), err
    assert not (tmp_path / "out").exists()


# -- pictures ------------------------------------------------------------------------------------------------------

def test_pictures_become_pixels_in_one_float_copy():
    """A large --image must not take four float copies of itself before the memory check (it was killed at 20000
    px); the values stay diffusers' 2 * (x / 255) - 1, bit for bit."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)) for _ in range(2)]
    tracemalloc.start()
    try:
        pixels = imageio.from_pil(pictures)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    reference = np.stack([np.asarray(p, dtype=np.float32) for p in pictures])
    reference = np.ascontiguousarray((2.0 * (reference / 255.0) - 1.0).transpose(0, 3, 1, 2))
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    np.testing.assert_array_equal(pixels, reference)
    assert peak < 1.5 * pixels.nbytes, f"peak {peak} for {pixels.nbytes} bytes of pixels"


# -- sdrt serve ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sdrt.serve.app import create_app
    from sdrt.serve.cli import build_server

    server = build_server([DEMO])
    with TestClient(create_app(server), raise_server_exceptions=False) as test_client:
        yield test_client
    server.close()


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("path,request_kwargs,message", [
    ("/sdapi/v1/txt2img", dict(content=b"[" * 100_000 + b"]" * 100_000, headers=JSON), "must be a JSON object"),
    ("/v1/images/generations", dict(content=b"[" * 100_000 + b"]" * 100_000, headers=JSON), "must be a JSON object"),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "x", "scheduler": "nope"}), "scheduler 'nope'"),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "x", "override_settings": {"sd_model_checkpoint": 5}}),
     "a model name must be a string"),
    ("/sdapi/v1/options", dict(json={"sd_model_checkpoint": 5}), "a model name must be a string"),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "x", "subseed_strength": "x"}), "subseed_strength must be a number"),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "x", "subseed_strength": [1]}), "subseed_strength must be a number"),
    ("/v1/images/generations", dict(json={"prompt": "x", "model": 5}), "model must be a string"),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "x", "send_images": "no"}), "send_images must be true or false"),
])
def test_serve_answers_malformed_requests_with_400_json(client, path, request_kwargs, message):
    response = client.post(path, **request_kwargs)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize("flags,message", [
    (["--port", "99999"], "--port must be <= 65535"),
    (["--max-body-mb", "nan"], "--max-body-mb must be a finite number > 0"),
    (["--max-body-mb", "inf"], "--max-body-mb must be a finite number > 0"),
])
def test_serve_refuses_impossible_settings_before_starting(capsys, flags, message):
    code = main(["serve", DEMO, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and one_line(err), err


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_a_huge_picture_is_refused_for_memory_before_its_pixels_are_made(monkeypatch, task):
    from sdrt.runtime.errors import InsufficientMemoryError
    from sdrt.runtime.families import image_to_image_pipeline, inpaint_pipeline

    picture = Image.new("RGB", (4096, 4096))
    if task == "img2img":
        pipe, inputs = image_to_image_pipeline(DEMO), (picture,)
    else:
        pipe, inputs = inpaint_pipeline(DEMO), (picture, Image.new("L", picture.size, 255))
    monkeypatch.setattr(imageio, "from_pil", lambda *a, **k: pytest.fail("pixels made before the memory check"))
    monkeypatch.setenv("SDRT_AVAILABLE_MEMORY", str(2**30))
    with pytest.warns(RuntimeWarning, match="far past the size"), pytest.raises(InsufficientMemoryError):
        pipe("x", *inputs, num_inference_steps=2, strength=1.0)


def test_serve_refuses_an_address_it_cannot_listen_on_in_one_line(capsys):
    import socket

    pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", DEMO, "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and one_line(err), err
    assert main(["serve", DEMO, "--host", "999.1.1.1", "--api-key", "k"]) == 2
    assert "cannot listen on 999.1.1.1" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK"])
def test_an_image_in_another_mode_is_made_rgb_as_a1111_does(tmp_path, capsys, mode):
    """--image in grayscale, with transparency, 16-bit, palette or CMYK runs (the API takes RGB only): the result
    equals the run on the RGB picture A1111 would make of it (alpha flattened onto white, 16 bits scaled)."""
    rng = np.random.default_rng(1)
    if mode == "I;16":
        values = (rng.random((32, 32)) * 65535).astype(np.uint16)
        picture, rgb = Image.fromarray(values), Image.fromarray(np.round(values / 257.0).astype(np.uint8)).convert("RGB")
    elif mode == "RGBA":
        picture = Image.fromarray((rng.random((32, 32, 4)) * 255).astype(np.uint8), "RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", (32, 32), "white"), picture).convert("RGB")
    else:
        picture = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).convert(mode)
        rgb = picture.convert("RGBA").convert("RGB") if mode == "P" else picture.convert("RGB")
    source = tmp_path / ("in.tif" if mode == "CMYK" else "in.png")
    picture.save(source)
    rgb.save(tmp_path / "rgb.png")
    outs = []
    for name in (source.name, "rgb.png"):
        out = tmp_path / f"out-{name}.png"
        assert main(["generate", DEMO, "a red circle", "--image", str(tmp_path / name), "-o", str(out),
                     "--steps", "3", "--seed", "4", "--quiet"]) == 0, capsys.readouterr().err
        outs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(outs[0], outs[1])
