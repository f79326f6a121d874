"""sdrt serve: the OpenAI and A1111 APIs through their own clients, continuous batching bit for bit against the
pipeline run alone (and the CLI's PNG), errors as JSON, the API key, the bounded queue, cancellation, metrics.

The server runs in-process (uvicorn in a thread on a free loopback port) over the bundled demo model."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from sdrt.runtime.families import image_to_image_pipeline, inpaint_pipeline, text_to_image_pipeline  # noqa: E402
from sdrt.serve.app import create_app  # noqa: E402
from sdrt.serve.cli import build_server  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "shapes-demo-onnx"
NAME = DEMO.name


class Running:
    """A server in a thread: `url`, `server` (sdrt.serve.app.Server); stop() ends it."""

    def __init__(self, **options):
        self.server = build_server([str(DEMO)], **options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(self.server), host="127.0.0.1", port=self.port, log_level="error")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._uvicorn.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def model(self):
        return self.server.models[NAME]

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self):
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.server.close()


@pytest.fixture(scope="module")
def running():
    server = Running()
    yield server
    server.stop()


_pipelines: dict = {}


def pipeline(kind: str = "txt2img", scheduler: str | None = None):
    """The normal pipeline (what `sdrt generate` runs), one per (task, scheduler)."""
    key = (kind, scheduler)
    if key not in _pipelines:
        factory = {"txt2img": text_to_image_pipeline, "img2img": image_to_image_pipeline,
                   "inpaint": inpaint_pipeline}[kind]
        _pipelines[key] = factory(DEMO, scheduler=scheduler)
    return _pipelines[key]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)


def decode(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


def alone(prompt, seed, steps, guidance=7.5, scheduler=None, negative=None, n=1, size=32):
    return pipeline("txt2img", scheduler)(prompt, negative_prompt=negative, num_inference_steps=steps,
                                          guidance_scale=guidance, seed=seed, height=size, width=size,
                                          num_images_per_prompt=n)


# -- the OpenAI Images API, through the openai client ---------------------------------------------------


def test_openai_generations_equal_the_pipeline(running):
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    result = client.images.generate(model=NAME, prompt="a red circle on a blue background", n=2, size="32x32",
                                    response_format="b64_json",
                                    extra_body={"seed": 7, "steps": 6, "guidance_scale": 5.0,
                                                "negative_prompt": "green", "scheduler": "euler-a"})
    reference = alone("a red circle on a blue background", 7, 6, 5.0, "euler-a", "green", n=2)
    assert len(result.data) == 2
    other = client.images.generate(model="dall-e-2", prompt="a red circle on a blue background", size="32x32", n=2,
                                   extra_body={"seed": 7, "steps": 6, "guidance_scale": 5.0, "negative_prompt": "green",
                                               "scheduler": "euler-a"})  # OpenAI's model names: the default model
    assert [d.b64_json for d in other.data] == [d.b64_json for d in result.data]
    for item, image, parameters in zip(result.data, reference.images, reference.parameters):
        served = decode(item.b64_json)
        np.testing.assert_array_equal(pixels(served), pixels(image))
        assert served.info["parameters"] == parameters  # the same infotext as sdrt generate writes


def test_openai_edits_inpaint_and_img2img_equal_the_pipelines(running):
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    picture = alone("a white square on a black background", 1, 5).images[0]
    # OpenAI's mask: transparent where to edit (the left half here)
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))
    buffers = {}
    for name, img in (("image", picture), ("mask", mask)):
        buffers[name] = io.BytesIO()
        img.save(buffers[name], "PNG")
        buffers[name].name = f"{name}.png"
        buffers[name].seek(0)
    result = client.images.edit(model=NAME, image=buffers["image"], mask=buffers["mask"], prompt="a red circle",
                                extra_body={"seed": 3, "steps": 6})
    white_left = Image.new("L", (32, 32), 0)
    white_left.paste(255, (0, 0, 16, 32))
    reference = pipeline("inpaint")("a red circle", picture, white_left, num_inference_steps=6, seed=3)
    np.testing.assert_array_equal(pixels(decode(result.data[0].b64_json)), pixels(reference.images[0]))

    buffers["image"].seek(0)
    result = client.images.edit(model=NAME, image=buffers["image"], prompt="a red circle",
                                extra_body={"seed": 4, "steps": 8, "strength": 0.5})
    reference = pipeline("img2img")("a red circle", picture, strength=0.5, num_inference_steps=8, seed=4)
    np.testing.assert_array_equal(pixels(decode(result.data[0].b64_json)), pixels(reference.images[0]))


# -- the A1111 API, through webuiapi -------------------------------------------------------------------


def test_webuiapi_txt2img_images_equal_the_cli(running, tmp_path):
    from sdrt.runtime.cli import main

    api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
    assert [m["model_name"] for m in api.get_sd_models()] == [NAME]
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    result = api.txt2img(prompt="a green triangle", negative_prompt="red", seed=11, batch_size=2, steps=5,
                         cfg_scale=6.0, width=32, height=32, sampler_name="Euler a")
    assert result.info["all_seeds"] == [11, 12]  # A1111: image k has seed + k
    assert len(result.images) == 2
    for k, image in enumerate(result.images):
        out = tmp_path / f"cli-{k}.png"
        assert main(["generate", str(DEMO), "a green triangle", "--negative", "red", "--seed", str(11 + k),
                     "--steps", "5", "--guidance", "6", "--size", "32x32", "--scheduler", "euler-a", "-o", str(out),
                     "--quiet"]) == 0
        cli = Image.open(out)
        np.testing.assert_array_equal(pixels(image), pixels(cli))
        assert result.info["infotexts"][k] == cli.info["parameters"]
        assert api.png_info(image).info == cli.info["parameters"]


def test_webuiapi_img2img_with_and_without_mask(running):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
    picture = alone("a blue circle on a yellow background", 2, 5).images[0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = api.img2img(images=[picture], mask_image=mask, prompt="a red square", seed=5, steps=6, cfg_scale=7.5,
                         denoising_strength=0.9, width=32, height=32, sampler_name="DDIM", eta=0.0)
    reference = pipeline("inpaint", "ddim")("a red square", picture, mask, strength=0.9, num_inference_steps=6,
                                             seed=5)
    np.testing.assert_array_equal(pixels(result.images[0]), pixels(reference.images[0]))
    result = api.img2img(images=[picture], prompt="a red square", seed=6, steps=6, denoising_strength=0.6,
                         width=32, height=32, sampler_name="DPM++ 2M Karras")
    reference = pipeline("img2img", "dpm++2m-karras")("a red square", picture, strength=0.6, num_inference_steps=6,
                                                       guidance_scale=7.0, seed=6)
    np.testing.assert_array_equal(pixels(result.images[0]), pixels(reference.images[0]))


# -- continuous batching ------------------------------------------------------------------------------

MIX = [  # seeds, step counts, schedulers, guidance on and off, arriving at staggered times through both APIs
    dict(api="openai", prompt="a red circle", seed=1, steps=30, guidance=7.5, scheduler=None),
    dict(api="a1111", prompt="a blue square", seed=2, steps=12, guidance=1.0, scheduler="euler-a"),
    dict(api="openai", prompt="a small white triangle in the top left", seed=3, steps=20, guidance=3.0,
         scheduler="ddim"),
    dict(api="a1111", prompt="a yellow circle on a black background", seed=4, steps=9, guidance=5.0,
         scheduler="heun"),
    dict(api="openai", prompt="a green square", seed=5, steps=25, guidance=8.0, scheduler="dpm++2m-karras"),
    dict(api="a1111", prompt="a black triangle", seed=6, steps=16, guidance=7.5, scheduler="lms"),
    dict(api="openai", prompt="a red square", seed=7, steps=14, guidance=7.5, scheduler=None, size=48),  # own group
]
A1111_NAMES = {"euler-a": "Euler a", "heun": "Heun", "lms": "LMS", None: None}


def _send(url: str, case: dict) -> Image.Image:
    if case["api"] == "openai":
        size = case.get("size", 32)
        body = {"model": NAME, "prompt": case["prompt"], "size": f"{size}x{size}", "seed": case["seed"],
                "steps": case["steps"], "guidance_scale": case["guidance"], "scheduler": case["scheduler"]}
        response = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return decode(response.json()["data"][0]["b64_json"])
    body = {"prompt": case["prompt"], "seed": case["seed"], "steps": case["steps"], "cfg_scale": case["guidance"],
            "width": 32, "height": 32, "sampler_name": A1111_NAMES[case["scheduler"]]}
    response = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return decode(response.json()["images"][0])


def test_continuous_batching_equals_each_request_alone(running):
    """Requests of different seeds, steps, schedulers and guidance scales, arriving at staggered times, share UNet
    calls (the metrics show batches of more than one request; a request of another size runs beside them in its
    own call) and each image equals the request run alone."""
    calls_before = running.metric("sdrt_batch_requests_count")
    rows_before = running.metric("sdrt_batch_requests_sum")
    with ThreadPoolExecutor(len(MIX)) as pool:
        futures = []
        for case in MIX:
            futures.append(pool.submit(_send, running.url, case))
            time.sleep(0.03)  # staggered: each joins the batch in flight at the next step boundary
        served = [f.result() for f in futures]
    calls = running.metric("sdrt_batch_requests_count") - calls_before
    requests_stepped = running.metric("sdrt_batch_requests_sum") - rows_before
    evaluations = sum(2 * c["steps"] if c["scheduler"] == "heun" else c["steps"] for c in MIX) - 1  # heun: 2n-1
    assert requests_stepped == evaluations  # every evaluation of every request ran, once
    assert calls < evaluations * 0.75, (calls, evaluations)  # ... in shared UNet calls
    for case, image in zip(MIX, served):
        reference = alone(case["prompt"], case["seed"], case["steps"], case["guidance"], case["scheduler"],
                          size=case.get("size", 32))
        np.testing.assert_array_equal(pixels(image), pixels(reference.images[0]), err_msg=str(case))


def test_batched_text_encoder_and_vae_rows_are_bitwise_equal():
    """The premise of batching: onnxruntime's CPU kernels give each row the same bits whatever the batch."""
    from sdrt.engines.spec import zero_residuals

    models = pipeline().models
    rng = np.random.default_rng(0)
    n = 7
    feed = {"sample": rng.standard_normal((n, 4, 8, 8)).astype(np.float32),
            "timestep": np.array([981, 1, 500, 21, 999, 3, 250], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((n, 77, 64)).astype(np.float32),
            **zero_residuals(pipeline().folder.spec("unet"), n, 32, 32)}
    full = models.unet.run(feed)["out_sample"]
    for a, b in ((0, 1), (1, 3), (3, 7)):
        part = models.unet.run({k: v[a:b] for k, v in feed.items()})["out_sample"]
        np.testing.assert_array_equal(part, full[a:b])
    ids = models.tokenizer(["a red circle", "", "a blue square on a white background"])
    full = models.text_encoder.run({"input_ids": ids})["last_hidden_state"]
    np.testing.assert_array_equal(models.text_encoder.run({"input_ids": ids[1:2]})["last_hidden_state"], full[1:2])
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    full = models.vae_decoder.run({"latent_sample": latents})["sample"]
    np.testing.assert_array_equal(models.vae_decoder.run({"latent_sample": latents[2:]})["sample"], full[2:])


# -- errors, limits, auth, queue, cancellation ----------------------------------------------------------


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "size": "33x32"}, 400, "multiple of"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "--max-pixels"),
    ({"prompt": "x", "n": 100}, 400, "--max-images"),
    ({"prompt": "x", "steps": 10_000}, 400, "--max-steps"),
    ({"prompt": "x" * 5000}, 400, "--max-prompt-chars"),
    ({"prompt": "x", "steps": "many"}, 400, "steps must be an integer"),
    ({"prompt": "x", "scheduler": "warp"}, 400, "unknown scheduler"),
    ({"prompt": "x", "model": "nope"}, 404, "no model named"),
    ({"n": 1}, 400, "prompt is required"),
])
def test_bad_requests_get_json_errors(running, body, status, words):
    response = httpx.post(running.url + "/v1/images/generations", json=body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert "Traceback" not in response.text


def test_a1111_negative_seeds_are_torchs_as_on_the_command_line(running):
    """-1 is A1111's random seed; other negative seeds run as `sdrt generate --seed` runs them (torch's)."""
    body = {"prompt": "a red circle", "seed": -2, "steps": 3, "cfg_scale": 7.5, "width": 32, "height": 32,
            "sampler_name": "Euler a"}
    response = httpx.post(running.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    want = alone("a red circle", -2, 3, scheduler="euler-a").images[0]
    np.testing.assert_array_equal(pixels(decode(response.json()["images"][0])), pixels(want))
    response = httpx.post(running.url + "/sdapi/v1/txt2img", json={"prompt": "x", "seed": -(2**70), "steps": 2})
    assert response.status_code == 400 and "seed must be in" in response.json()["detail"]


def test_a1111_errors_and_body_limit(running):
    response = httpx.post(running.url + "/sdapi/v1/txt2img", content=b"{not json")
    assert response.status_code == 400 and "JSON" in response.json()["detail"]
    response = httpx.post(running.url + "/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Warp 9"})
    assert response.status_code == 400 and "samplers" in response.json()["detail"]
    response = httpx.post(running.url + "/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True})
    assert response.status_code == 400 and "hires" in response.json()["detail"]
    limit = running.server.limits.max_body_bytes
    response = httpx.post(running.url + "/sdapi/v1/img2img", content=b"x" * (limit + 1),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "--max-body-mb" in response.json()["error"]["message"]


def test_internal_errors_are_short_json(running, monkeypatch):
    def broken(run, latents):
        raise RuntimeError("a bug")

    monkeypatch.setattr(running.model.generator, "finish", broken)
    response = httpx.post(running.url + "/v1/images/generations",
                          json={"prompt": "x", "size": "32x32", "steps": 1, "seed": 0})
    assert response.status_code == 500
    assert response.json()["error"]["message"].startswith("internal error (RuntimeError)")
    assert "Traceback" not in response.text


def test_api_key():
    running = Running(api_key="s3cret")
    try:
        assert httpx.get(running.url + "/healthz").status_code == 200  # probes need no key
        response = httpx.get(running.url + "/v1/models")
        assert response.status_code == 401 and "Bearer" in response.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong").models.list()
        assert openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret").models.list().data[0].id == NAME
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port, username="any", password="s3cret")
        assert api.get_sd_models()[0]["model_name"] == NAME  # A1111's --api-auth: the key as the password
    finally:
        running.stop()


class SlowUNet:
    """The UNet, slowed down, so that a request is still running when the test acts."""

    def __init__(self, engine, seconds: float):
        self.engine, self.seconds = engine, seconds

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feed):
        time.sleep(self.seconds)
        return self.engine.run(feed)


@pytest.fixture
def slow(running):
    models = running.model.generator.models
    unet = models.unet
    models.unet = SlowUNet(unet, 0.05)
    yield running
    models.unet = unet


def test_requests_admitted_together_share_text_encoder_and_vae_calls(slow):
    """Requests that start at the same step boundary run one text-encoder call (and one VAE-encoder call for the
    pictures of img2img and inpainting), and those that end together one VAE-decoder call; each image still
    equals its pipeline's."""
    from sdrt.serve.limits import Limits

    model = slow.model
    picture = alone("a white square on a black background", 1, 3).images[0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))
    gathered = []
    meeting = model.batcher.meeting
    meeting._on_batch = lambda engine, feeds: gathered.append((engine, feeds))
    try:
        first = model.submit("txt2img", Limits(), prompt="a red circle", num_inference_steps=20, seed=0,
                             height=32, width=32)
        while first.loop is None or first.loop.i < 2:  # the batcher is busy with it: the next three wait
            time.sleep(0.01)
        cases = [("txt2img", "a blue square", 1, dict(height=32, width=32)),
                 ("img2img", "a green triangle", 2, dict(image=picture, strength=1.0)),
                 ("inpaint", "a white circle", 3, dict(image=picture, mask_image=mask))]
        jobs = [model.submit(task, Limits(), prompt=prompt, num_inference_steps=5, seed=seed, **extra)
                for task, prompt, seed, extra in cases]
        outputs = [job.future.result(timeout=60) for job in jobs]
        first.future.result(timeout=60)
    finally:
        meeting._on_batch = model.batcher._gathered
    assert ("text_encoder", 3) in gathered and ("vae_decoder", 3) in gathered, gathered
    assert ("vae_encoder", 2) in gathered, gathered
    references = [alone("a blue square", 1, 5),
                  pipeline("img2img")("a green triangle", picture, strength=1.0, num_inference_steps=5, seed=2),
                  pipeline("inpaint")("a white circle", picture, mask, num_inference_steps=5, seed=3)]
    for output, reference in zip(outputs, references):
        np.testing.assert_array_equal(pixels(output.images[0]), pixels(reference.images[0]))


def test_a_request_whose_client_disconnects_is_cancelled(slow):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/images/generations", json={"prompt": "x", "size": "32x32", "steps": 100},
                   timeout=0.5)
    deadline = time.time() + 3  # 100 steps would take 5 s and more
    while httpx.get(slow.url + "/healthz").json()["models"][NAME]["in_flight"]:
        assert time.time() < deadline, "the cancelled request is still running"
        time.sleep(0.05)


def test_interrupt_ends_requests_in_flight_with_what_they_have(slow):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=slow.port)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(api.txt2img, prompt="a red circle", steps=100, width=32, height=32, seed=1)
        deadline = time.time() + 10
        while api.get_progress()["state"]["sampling_step"] < 3:
            assert time.time() < deadline
            time.sleep(0.02)
        api.interrupt()
        result = future.result(timeout=10)
    assert result.info["interrupted"] is True and len(result.images) == 1


def test_a_burst_of_four_times_the_queue_loses_and_mixes_up_nothing():
    running = Running(max_queue=3, max_batch=2)
    models = running.model.generator.models
    models.unet = SlowUNet(models.unet, 0.01)
    try:
        cases = [dict(api="openai" if k % 2 else "a1111", prompt=f"a red circle {k}", seed=100 + k, steps=4 + k % 3,
                      guidance=7.5, scheduler=None) for k in range(12)]

        def send(case):
            try:
                return _send(running.url, case)
            except AssertionError:
                return None

        def raw(case):
            return httpx.post(running.url + "/v1/images/generations",
                              json={"model": NAME, "prompt": case["prompt"], "size": "32x32", "seed": case["seed"],
                                    "steps": case["steps"]}, timeout=120)

        with ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(raw, cases))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert 429 in statuses and 200 in statuses
        for response in responses:
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert "--max-queue" in response.json()["error"]["message"]
        for case, response in zip(cases, responses):
            if response.status_code == 200:
                image = decode(response.json()["data"][0]["b64_json"])
                np.testing.assert_array_equal(pixels(image), pixels(alone(case["prompt"], case["seed"],
                                                                          case["steps"]).images[0]))
        assert httpx.get(running.url + "/healthz").json()["models"][NAME] == {"waiting": 0, "in_flight": 0}
    finally:
        running.stop()


def test_health_progress_and_metrics(running):
    assert httpx.get(running.url + "/healthz").json()["status"] == "ok"
    progress = httpx.get(running.url + "/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state"} <= set(progress)
    text = httpx.get(running.url + "/metrics").text
    for name in ("sdrt_queue_depth", "sdrt_batch_requests_bucket", "sdrt_stage_seconds_bucket",
                 "sdrt_images_served_total", "sdrt_gathered_requests_bucket"):
        assert name in text, name


def test_serve_without_the_extra_names_it():
    from conftest import run_without_torch

    result = run_without_torch("""
import sys
class _NoWeb:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ImportError(f"{name} is blocked in this test", name=name.split(".")[0])
sys.meta_path.insert(0, _NoWeb())
from sdrt.runtime.cli import main
sys.exit(main(["serve", sys.argv[1]]))
""", str(DEMO))
    assert result.returncode == 2, result.stderr
    assert 'pip install "sdrt[serve]"' in result.stderr and "Traceback" not in result.stderr


def test_the_sdrt_serve_command(capsys):
    """`sdrt serve FOLDER` starts, answers, and stops on Ctrl-C; bad options are one-line errors."""
    import signal
    import subprocess
    import sys

    from sdrt.runtime.cli import main

    assert main(["serve", str(DEMO), "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sdrt.runtime.cli", "serve", str(DEMO), "--port", str(port),
                                "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.time() < deadline, process.stderr.read()
            time.sleep(0.1)
        response = httpx.post(url + "/v1/images/generations", headers={"Authorization": "Bearer k"},
                              json={"prompt": "a red circle", "size": "32x32", "steps": 3, "seed": 9})
        assert response.status_code == 200
        np.testing.assert_array_equal(pixels(decode(response.json()["data"][0]["b64_json"])),
                                      pixels(alone("a red circle", 9, 3).images[0]))
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
