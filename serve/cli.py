"""`sdrt serve FOLDER [FOLDER...]`: its options, and starting the server (uvicorn, or Ray Serve with --ray).

This module imports no web framework at import time: `sdrt --help` and every other command run on the base
install; the serve extra is needed (and named) only when the server starts.
"""

from __future__ import annotations

import argparse
import sys

from sdrt.engines.errors import SdrtError

EXTRA = 'pip install "sdrt[serve]"'
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sdrt.serve.limits import Limits

    d = Limits()
    p.add_argument("folders", nargs="+", metavar="FOLDER", help="exported model folders; each is served under "
                   "its folder name (the OpenAI 'model', A1111's sd_model_checkpoint); the first is the default")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; use 0.0.0.0 only with "
                   "--api-key behind TLS)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (A1111's default, 7860)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $SDRT_API_KEY; "
                   "none when unset)")
    p.add_argument("--provider", default="cpu", help="cpu, cuda[:N], tensorrt-ep, tensorrt, or an onnxruntime "
                   "provider name")
    p.add_argument("--scheduler", default=None, help="every model's default scheduler (requests may pick another)")
    p.add_argument("--verify", choices=("size", "sha256", "none"), default="size",
                   help="check the folders' files at start against sdrt.json: sizes, or full sha256 (cached per "
                        "file change), or not at all")
    p.add_argument("--emphasis", choices=("original", "none"), default="original",
                   help="prompt syntax, as sdrt generate --emphasis")
    p.add_argument("--preload", action="store_true", help="load every network at start (default: at first use)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="images in flight per model, denoised together "
                   "(default 8)")
    g.add_argument("--no-batching", action="store_true", help="one request at a time (for comparison)")
    g.add_argument("--max-queue", type=int, default=32, help="requests waiting per model before 429 (default 32)")
    g = p.add_argument_group("request limits (over them: 400, or 413 for the body)")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"width x height (default {d.max_pixels})")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")
    g.add_argument("--max-images", type=int, default=d.max_images, help=f"per request (default {d.max_images})")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"default {d.max_prompt_chars}")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"default {d.max_body_bytes / 2**20:g}")
    g = p.add_argument_group("Ray Serve (needs sdrt[ray])")
    g.add_argument("--ray", action="store_true", help="deploy on Ray Serve, each replica batching on its own")
    g.add_argument("--replicas", type=int, default=1, help="replicas of the app, each with every model loaded")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    g.add_argument("--autoscaling", default=None, metavar="JSON", help="Ray Serve's autoscaling_config, as JSON "
                   "(replaces --replicas)")
    g.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (ray_actor_options num_gpus)")


def options(args) -> dict:
    """The server's settings from the parsed options (plain values: a Ray replica rebuilds the server from them)."""
    from sdrt.runtime.errors import InvalidInputError

    for name in ("max_batch", "max_queue", "max_pixels", "max_steps", "max_images", "max_prompt_chars", "port",
                 "replicas"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.port > 65535:
        raise InvalidInputError(f"--port must be <= 65535 (a TCP port), got {args.port}")
    if not 0 < args.max_body_mb < float("inf"):  # NaN too
        raise InvalidInputError(f"--max-body-mb must be a finite number > 0, got {args.max_body_mb}")
    from sdrt.serve.app import api_key_from

    return dict(
        folders=[str(f) for f in args.folders], provider=args.provider, scheduler=args.scheduler,
        verify=args.verify, emphasis=args.emphasis, preload=args.preload, max_batch=args.max_batch,
        max_queue=args.max_queue, batching=not args.no_batching, api_key=api_key_from(args.api_key),
        limits=dict(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_prompt_chars=args.max_prompt_chars, max_body_bytes=int(args.max_body_mb * 2**20)),
    )


def build_server(folders, provider="cpu", scheduler=None, verify="size", emphasis="original", preload=False,
                 max_batch=8, max_queue=32, batching=True, api_key=None, limits=None):
    """A Server over the folders (the models open now; sessions load at first use unless preload)."""
    from sdrt.runtime.errors import InvalidInputError
    from sdrt.serve.app import Server
    from sdrt.serve.limits import Limits
    from sdrt.serve.metrics import Metrics
    from sdrt.serve.models import ServedModel

    metrics = Metrics()
    models = {}
    try:
        for folder in folders:
            model = ServedModel(folder, provider=provider, scheduler=scheduler, verify=verify, emphasis=emphasis,
                                max_batch=max_batch, max_queue=max_queue, batching=batching, metrics=metrics)
            if model.name in models:
                model.close()
                raise InvalidInputError(f"two folders are named {model.name!r}; each model is served under its "
                                        "folder name: rename one")
            models[model.name] = model
            if preload:
                for engine in model.generator.models.engines():
                    engine.load()
    except BaseException:
        for model in models.values():
            model.close()
        raise
    return Server(models, limits=Limits(**(limits or {})), metrics=metrics, api_key=api_key)


def require_extra() -> None:
    import importlib.util

    for module in ("fastapi", "uvicorn", "prometheus_client", "python_multipart"):  # FastAPI's forms need the last
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise SdrtError(f"sdrt serve needs the serve extra ({module} is not installed): {EXTRA}")


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on (an unknown host, a port in use or privileged)."""
    import socket

    from sdrt.runtime.errors import InvalidInputError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise InvalidInputError(f"cannot listen on {host}:{port} ({e.strerror or e}); give another --host or "
                                "--port") from e


def serve(args) -> int:
    require_extra()
    settings = options(args)
    if args.host not in LOOPBACK and not settings["api_key"]:
        print(f"sdrt serve: warning: listening on {args.host} without an API key: anyone who reaches this port "
              "can generate; pass --api-key (or set SDRT_API_KEY)", file=sys.stderr)
    if args.ray:
        from sdrt.serve.ray import run

        return run(settings, host=args.host, port=args.port, replicas=args.replicas, address=args.ray_address,
                   autoscaling=args.autoscaling, num_gpus=args.num_gpus)
    import uvicorn

    from sdrt.serve.app import create_app

    check_address(args.host, args.port)  # before the models open; uvicorn would log it and exit 3
    server = build_server(**settings)
    try:
        print(f"sdrt serve: {', '.join(server.models)} on http://{args.host}:{args.port} (OpenAI: /v1, A1111: "
              "/sdapi/v1, /healthz, /metrics)", file=sys.stderr)
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.close()
    return 0
