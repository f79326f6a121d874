"""sdrt serve on Ray Serve: a local Ray instance, 2 CPU replicas of the same app on loopback (skipped without
ray[serve]: pip install "sdrt[ray]")."""

from __future__ import annotations

import base64
import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "shapes-demo-onnx"


def test_two_cpu_replicas_serve_the_pipeline_images():
    from ray import serve

    from sdrt.runtime.families import text_to_image_pipeline
    from sdrt.serve.ray import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment({"folders": [str(DEMO)], "max_batch": 4}, replicas=2), name="sdrt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        pids = {httpx.get(url + "/healthz", timeout=30).json()["pid"] for _ in range(40)}
        assert len(pids) == 2  # both replicas answer
        pipe = text_to_image_pipeline(DEMO)
        for seed in (1, 2, 3):
            response = httpx.post(url + "/v1/images/generations", timeout=120,
                                  json={"prompt": "a red circle", "size": "32x32", "steps": 5, "seed": seed})
            assert response.status_code == 200, response.text
            image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
            reference = pipe("a red circle", num_inference_steps=5, seed=seed, height=32, width=32).images[0]
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(reference))
        response = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "size": "33x33"}, timeout=60)
        assert response.status_code == 400 and "multiple of" in response.json()["error"]["message"]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_run_entry_points(monkeypatch):
    """`serve run sdrt.serve.ray:build_app folders=... replicas=2 num_gpus=1` and `sdrt.serve.ray:app` from
    $SDRT_SERVE_FOLDERS bind the deployment with Ray's options (nothing starts until `serve run`)."""
    from ray.serve import Application

    import sdrt.serve.ray as served
    from sdrt.engines.errors import SdrtError

    app = served.build_app({"folders": str(DEMO), "replicas": "2", "num_gpus": "1", "max_batch": "4"})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_gpus"] == 1
    monkeypatch.setenv(served.ENV_FOLDERS, str(DEMO))
    assert isinstance(served.app, Application)
    monkeypatch.delenv(served.ENV_FOLDERS)
    with pytest.raises(SdrtError, match="SDRT_SERVE_FOLDERS"):
        served.build_app({})
