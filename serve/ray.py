"""The sdrt serve app as a Ray Serve deployment: N replicas, each with its own models and continuous batching.

    sdrt serve FOLDER --ray --replicas 2                   (a local Ray instance, or --ray-address)
    SDRT_SERVE_FOLDERS=/models/sd15 serve run sdrt.serve.ray:app
    serve run sdrt.serve.ray:build_app folders=/models/sd15 replicas=2 num_gpus=1

Every replica builds the same FastAPI app (sdrt.serve.app.create_app) from the same settings when Ray starts it,
so the APIs, limits and errors are the ones of a single server; Ray's proxy spreads requests over replicas.
Needs the ray extra (pip install "sdrt[ray]"); ray is imported only when a deployment is made.
"""

from __future__ import annotations

import json
import os
import sys

from sdrt.engines.errors import SdrtError

ENV_FOLDERS = "SDRT_SERVE_FOLDERS"  # for `serve run sdrt.serve.ray:app`: folders, separated by os.pathsep


def _ray_serve():
    try:
        from ray import serve
    except ImportError as e:
        raise SdrtError(f"sdrt serve --ray needs Ray Serve ({e.name} is not installed): pip install \"sdrt[ray]\"") \
            from None
    return serve


def deployment(settings: dict, replicas: int = 1, autoscaling: dict | None = None, num_gpus: float = 0):
    """A bound Ray Serve application of `replicas` replicas (or Ray's autoscaling_config), each running
    create_app(build_server(**settings)); ray_actor_options num_gpus per replica."""
    serve = _ray_serve()

    def build():
        from sdrt.serve.app import create_app
        from sdrt.serve.cli import build_server

        return create_app(build_server(**settings))

    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    options = {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": 1}, **scale}
    return serve.deployment(serve.ingress(build)(), name="sdrt", **options).bind()


def settings_from(args: dict) -> dict:
    """Server settings from `serve run` arguments (strings) or the environment."""
    folders = args.get("folders") or os.environ.get(ENV_FOLDERS, "")
    folders = [f for f in (folders.split(os.pathsep) if isinstance(folders, str) else folders) if f]
    if not folders:
        raise SdrtError(f"no model folders: pass folders=PATH[{os.pathsep}PATH...] or set ${ENV_FOLDERS}")
    settings = {"folders": folders}
    for name, kind in (("provider", str), ("scheduler", str), ("max_batch", int), ("max_queue", int),
                       ("api_key", str)):
        if args.get(name) is not None:
            settings[name] = kind(args[name])
    settings.setdefault("api_key", os.environ.get("SDRT_API_KEY") or None)
    return settings


def build_app(args: dict):
    """Ray Serve's application builder: `serve run sdrt.serve.ray:build_app folders=... replicas=2 num_gpus=1`."""
    autoscaling = args.get("autoscaling")
    return deployment(settings_from(args), replicas=int(args.get("replicas", 1)),
                      autoscaling=json.loads(autoscaling) if autoscaling else None,
                      num_gpus=float(args.get("num_gpus", 0)))


def __getattr__(name: str):
    if name == "app":  # `serve run sdrt.serve.ray:app`, from $SDRT_SERVE_FOLDERS
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(settings: dict, host: str, port: int, replicas: int = 1, address: str | None = None,
        autoscaling: str | None = None, num_gpus: float = 0, blocking: bool = True):
    """`sdrt serve --ray`: start (or join) Ray, serve on host:port until interrupted."""
    serve = _ray_serve()
    import ray

    try:
        scaling = json.loads(autoscaling) if autoscaling else None
    except ValueError as e:
        raise SdrtError(f"--autoscaling must be JSON (Ray Serve's autoscaling_config), got {autoscaling!r}: {e}") \
            from None
    ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    print(f"sdrt serve: Ray Serve, {replicas if scaling is None else 'autoscaled'} replica(s), on "
          f"http://{host}:{port}", file=sys.stderr)
    serve.run(deployment(settings, replicas, scaling, num_gpus), name="sdrt", route_prefix="/", blocking=blocking)
    return 0
