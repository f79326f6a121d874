"""Prometheus metrics of one server (its own registry, so that several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.queue_depth = Gauge("sdrt_queue_depth", "Requests waiting to be admitted", ["model"], registry=registry)
        self.in_flight = Gauge("sdrt_requests_in_flight", "Requests being denoised", ["model"], registry=registry)
        self.batch_requests = Histogram("sdrt_batch_requests", "Requests in one batched UNet call", ["model"],
                                        buckets=SIZES, registry=registry)
        self.batch_rows = Histogram("sdrt_batch_rows", "Rows (images x guidance halves) in one batched UNet call",
                                    ["model"], buckets=SIZES, registry=registry)
        self.gathered_calls = Histogram("sdrt_gathered_requests", "Requests in one batched text-encoder / VAE call",
                                        ["model", "engine"], buckets=SIZES, registry=registry)
        self.stage_seconds = Histogram("sdrt_stage_seconds", "Latency per stage: queue (wait to be admitted), start "
                                       "(text encoders, initial latents), unet_step (one batched UNet call), finish "
                                       "(VAE decode), request (the HTTP request)", ["model", "stage"],
                                       buckets=SECONDS, registry=registry)
        self.images = Counter("sdrt_images_served", "Images returned", ["model", "api"], registry=registry)
        self.requests = Counter("sdrt_http_requests", "Generation requests answered, by status", ["api", "status"],
                                registry=registry)

    def queue(self, model: str, waiting: int, active: int) -> None:
        self.queue_depth.labels(model).set(waiting)
        self.in_flight.labels(model).set(active)

    def batch(self, model: str, requests: int, rows: int) -> None:
        self.batch_requests.labels(model).observe(requests)
        self.batch_rows.labels(model).observe(rows)

    def gathered(self, model: str, engine: str, requests: int) -> None:
        self.gathered_calls.labels(model, engine).observe(requests)

    def stage(self, model: str, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(model, stage).observe(seconds)

    def served(self, model: str, api: str, images: int) -> None:
        self.images.labels(model, api).inc(images)

    def answered(self, api: str, status: int) -> None:
        self.requests.labels(api, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
