"""create_app: the FastAPI app of `sdrt serve` over a set of ServedModels.

Every error is JSON, never a traceback: {"error": {"message", "type", "code"}, "detail": message} (OpenAI's
shape; A1111 clients read `detail`), with 400 for bad input, 401 without the API key, 404 for an unknown
model, 413 for a body over the limit, 429 (with Retry-After) when the queue is full, 500 for anything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from sdrt.engines.errors import SdrtError
from sdrt.runtime.errors import CancelledError, InsufficientMemoryError, InvalidInputError
from sdrt.serve.errors import ClientGoneError, QueueFullError, RequestTooLargeError, UnknownModelError
from sdrt.serve.limits import Limits
from sdrt.serve.metrics import Metrics

log = logging.getLogger("sdrt.serve")
API_KEY_ENV = "SDRT_API_KEY"
OPEN_PATHS = ("/healthz",)  # answered without the API key (load balancers' probes)
OPENAI_MODELS = ("dall-e-", "gpt-image-")  # OpenAI's image models' names, answered by the default model


@dataclass
class Server:
    """What the routes share: the models by name (the first is the default), limits, metrics, the API key."""

    models: dict  # name -> ServedModel
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    api_key: str | None = None
    default_model: str | None = None  # A1111's sd_model_checkpoint option

    def model(self, name: str | None):
        if not name:
            return self.models[self.default_model or next(iter(self.models))]
        if not isinstance(name, str):
            raise InvalidInputError(f"a model name must be a string, got {name!r}; GET /v1/models lists them")
        if name in self.models:
            return self.models[name]
        for served in self.models.values():  # A1111 titles may carry a hash: "name [abc123]"
            if name.split(" [")[0] == served.name:
                return served
        if name.startswith(OPENAI_MODELS):  # clients written for OpenAI name its models: the default one serves
            return self.model(None)
        raise UnknownModelError(f"no model named {name!r}; this server has {', '.join(self.models)} (GET /v1/models)")

    async def generate(self, request: Request, model, task: str, api: str, **given):
        """Submit (checks in a worker thread), wait for the result; cancel the job when the client disconnects."""
        t0 = time.perf_counter()
        job = await run_in_threadpool(model.submit, task, self.limits, **given)
        result = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({result}, timeout=0.2)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel("the client disconnected")
                    raise ClientGoneError("the client disconnected")
        except asyncio.CancelledError:  # the handler was cancelled (a sibling image of the request failed)
            job.cancel("the request was abandoned")
            raise
        output = result.result()
        self.metrics.stage(model.name, "request", time.perf_counter() - t0)
        self.metrics.served(model.name, api, len(output.images))
        return output

    def close(self) -> None:
        for model in self.models.values():
            model.close()


def error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}, "detail": message}


class Gate:
    """ASGI middleware: the API key (Authorization: Bearer KEY; Basic with the key as password, for A1111 clients'
    --api-auth) and the body size limit, answered before the app reads anything."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.server.api_key
        if key and scope.get("path") not in OPEN_PATHS and not authorized(headers.get("authorization", ""), key):
            return await self._refuse(send, 401, "missing or wrong API key: send the header "
                                      "'Authorization: Bearer KEY' (the key sdrt serve was started with)",
                                      "authentication_error", {"www-authenticate": "Bearer"})
        limit = self.server.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send, 413, too_large(int(length), limit), "request_too_large")
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLargeError(too_large(received, limit))
            return message

        await self.app(scope, limited, send)

    @staticmethod
    async def _refuse(send, status: int, message: str, kind: str, extra: dict | None = None):
        body = json.dumps(error_body(status, message, kind)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def too_large(size: int, limit: int) -> str:
    return (f"the request body is over this server's limit of {limit} bytes ({size} or more); send smaller "
            "pictures, or start the server with a larger --max-body-mb")


def authorized(header: str, key: str) -> bool:
    import base64
    import hmac

    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), key.encode())
    if scheme.lower() == "basic":
        try:
            password = base64.b64decode(value.strip()).decode().partition(":")[2]
        except ValueError:
            return False
        return hmac.compare_digest(password.encode(), key.encode())
    return False


def create_app(server: Server) -> FastAPI:
    from sdrt.serve import a1111, openai_api

    app = FastAPI(title="sdrt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def answer(request: Request, status: int, message: str, kind: str, headers: dict | None = None):
        api = "a1111" if request.url.path.startswith("/sdapi") else "openai" \
            if request.url.path.startswith("/v1") else "other"
        server.metrics.answered(api, status)
        return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, e: QueueFullError):
        return answer(request, 429, str(e), "rate_limit_exceeded", {"Retry-After": str(e.retry_after)})

    @app.exception_handler(SdrtError)
    async def sdrt_error(request: Request, e: SdrtError):
        refused = isinstance(e, (InvalidInputError, InsufficientMemoryError))  # the request asks too much
        status = getattr(e, "status", None) or (400 if refused else 499 if isinstance(e, CancelledError) else 500)
        kind = "invalid_request_error" if status in (400, 413) else type(e).__name__
        return answer(request, status, str(e), kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
                             for err in e.errors())
        return answer(request, 400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return answer(request, e.status_code, str(e.detail), "http_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("sdrt serve: internal error on %s", request.url.path)
        return answer(request, 500, f"internal error ({type(e).__name__}); the server log has the details",
                      "server_error")

    @app.get("/healthz")
    async def healthz():
        queues = {}
        for name, model in server.models.items():
            waiting, active = model.batcher.jobs()
            queues[name] = {"waiting": len(waiting), "in_flight": len(active)}
        return {"status": "ok", "models": queues, "pid": os.getpid()}  # pid: which replica answered (Ray)

    @app.get("/metrics")
    async def metrics():
        for model in server.models.values():
            model.batcher._observe_queue()
        return Response(server.metrics.text(), media_type=server.metrics.content_type)

    app.include_router(openai_api.router(server))
    app.include_router(a1111.router(server))
    app.add_middleware(Gate, server=server)
    return app


def api_key_from(value: str | None) -> str | None:
    """--api-key, else $SDRT_API_KEY; None (no key) when neither is set."""
    return value or os.environ.get(API_KEY_ENV) or None
