"""Batcher: continuous (iteration-level) batching of one model's generations, as LLM servers batch tokens.

A worker thread runs the model step by step. At every step boundary it
  1. drops the requests whose client went away (cancelled) and ends the interrupted ones early,
  2. admits waiting requests, up to `max_batch` images in flight, and starts them together: each through the
     unchanged generation core (Generator.start) in its own thread, their text-encoder (and VAE-encoder) calls
     meeting in one batched call each (sdrt.serve.gather),
  3. runs ONE UNet call for all requests whose feeds have the same shapes (the same latent size; guided and
     unguided requests alike, the CFG layout is per request): every row with its own timestep, every request
     with its own plan, scheduler state, generator, guidance scale and number of steps
     (sdrt.runtime.core.loop.Denoising does each request's part, exactly as the one-request loop does),
  4. finishes the requests whose schedule ended (Generator.finish, the VAE-decoder calls batched the same way)
     and hands each its PipelineOutput.
So a request joins at the next step boundary and leaves when its own schedule ends. The waiting queue is
bounded: past `max_queue`, submit refuses with QueueFullError (HTTP 429 with Retry-After).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from sdrt.runtime.core.generate import Generator, Run
from sdrt.runtime.core.loop import Denoising
from sdrt.serve.errors import ClientGoneError, QueueFullError, ServeError
from sdrt.serve.gather import Gather, Meeting, feed_key, run_concatenated

GATHERED = ("text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder")


@dataclass(eq=False)
class Job:
    """One request in the batcher: its prepared Run, and the Future its PipelineOutput goes to."""

    run: Run
    submitted: float
    future: Future = field(default_factory=Future)
    loop: Denoising | None = None  # set when admitted and started
    started: float | None = None
    cancelled: str | None = None  # why (the client disconnected): dropped at the next step boundary
    interrupted: bool = False  # end now and decode what there is (A1111's interrupt)

    @property
    def images(self) -> int:
        return self.run.batch

    @property
    def progress(self) -> tuple[int, int]:
        """(evaluations done, evaluations planned)."""
        total = self.run.plan.num_evaluations
        return (0 if self.loop is None else self.loop.i), total

    def cancel(self, reason: str) -> None:
        self.cancelled = reason


class Batcher:
    """Runs one Generator's requests with continuous batching (batching=False: one request at a time)."""

    def __init__(self, generator: Generator, name: str, max_batch: int = 8, max_queue: int = 32,
                 batching: bool = True, metrics=None):
        self.generator, self.name = generator, name
        self.max_batch, self.max_queue, self.batching = max_batch, max_queue, batching
        self.metrics = metrics
        models = generator.models
        self.meeting = Meeting(on_batch=self._gathered)
        for attr in GATHERED:
            engine = getattr(models, attr, None)
            if engine is not None and not isinstance(engine, Gather):
                setattr(models, attr, Gather(engine, self.meeting, attr))
        self._workers = max(2, max_batch)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=f"sdrt-{name}")
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._seconds = deque(maxlen=32)  # recent seconds from admission to result, for Retry-After
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"sdrt-batcher-{name}", daemon=True)
        self._thread.start()

    # -- the callers' side (request threads) ------------------------------------------------------------

    def submit(self, request, tasks) -> Job:
        """Check the request (InvalidInputError, before anything queues) and queue it; QueueFullError when the
        queue is at its bound."""
        run = self.generator.prepare(request, tasks)
        job = Job(run, time.perf_counter())
        with self._cond:
            if self._closed:
                raise ServeError("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the queue of model {self.name!r} is full ({self.max_queue} requests waiting); retry after "
                    f"{self.retry_after()} s, or start the server with a larger --max-queue", self.retry_after())
            self._waiting.append(job)
            self._cond.notify_all()
        self._observe_queue()
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: recent time per request x the batches waiting."""
        per_request = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
        batches = math.ceil(max(1, len(self._waiting)) / (self.max_batch if self.batching else 1))
        return max(1, math.ceil(per_request * batches))

    def interrupt(self) -> int:
        """End every request in flight at the next step boundary, decoding what it has (A1111's interrupt)."""
        with self._cond:
            for job in self._active:
                job.interrupted = True
            return len(self._active)

    def jobs(self) -> tuple[list[Job], list[Job]]:
        """(waiting, in flight), a snapshot."""
        with self._cond:
            return list(self._waiting), list(self._active)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False)

    # -- the worker thread ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    for job in [*self._waiting, *self._active]:
                        self._fail(job, ServeError("the server shut down before this request finished"))
                    self._waiting.clear()
                    self._active.clear()
                    return
                admitted = self._admit()
            self._observe_queue()
            try:
                self._start(admitted)
                self._step()
            except BaseException as e:  # noqa: BLE001 (a bug of ours: fail the requests, keep serving)
                with self._cond:
                    for job in self._active:
                        self._fail(job, e)
                    self._active.clear()

    def _admit(self) -> list[Job]:
        """With the lock held: the waiting jobs that join now (cancelled ones are dropped)."""
        admitted: list[Job] = []
        in_flight = sum(job.images for job in self._active)
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                self._fail(job, ClientGoneError(job.cancelled))
                continue
            busy = bool(self._active or admitted)
            if busy and (not self.batching or in_flight + job.images > self.max_batch):
                break
            self._waiting.popleft()
            admitted.append(job)
            in_flight += job.images
        return admitted

    def _together(self, function, jobs: list[Job]) -> list:
        """function(job) for each job, each in its own thread, their gathered engine calls batched; results or
        exceptions, in order. (Never more parties than threads: a party without one would hold the others.)"""
        size = self._workers
        if len(jobs) > size:
            return [r for k in range(0, len(jobs), size) for r in self._together(function, jobs[k:k + size])]

        def party(job):
            try:
                return function(job)
            finally:
                self.meeting.leave()

        with self.meeting.parties(len(jobs)):
            futures = [self._pool.submit(party, job) for job in jobs]
            results = []
            for future in futures:
                try:
                    results.append(future.result())
                except BaseException as e:  # noqa: BLE001
                    results.append(e)
        return results

    def _start(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        t0 = time.perf_counter()
        for job in jobs:
            self._observe("queue", t0 - job.submitted)
        results = self._together(lambda job: self.generator.start(job.run), jobs)
        self._observe("start", time.perf_counter() - t0)
        for job, latents in zip(jobs, results):
            if isinstance(latents, BaseException):
                self._fail(job, latents)
                continue
            try:
                job.loop = Denoising(job.run, latents, resident=False)
            except BaseException as e:  # noqa: BLE001
                self._fail(job, e)
                continue
            job.started = t0
            with self._cond:
                self._active.append(job)

    def _step(self) -> None:
        """One evaluation of every request in flight: one UNet call per group of equal input shapes."""
        with self._cond:
            active = list(self._active)
        done, stepping = [], []
        for job in active:
            if job.cancelled:
                self._drop(job, ClientGoneError(job.cancelled))
            elif job.interrupted or job.loop.done:
                done.append(job)
            else:
                stepping.append(job)
        groups: dict[tuple, list[tuple[Job, int, dict]]] = {}
        feeds_of: dict[Job, list] = {}
        for job in stepping:
            try:
                feeds = list(job.loop.calls())
            except BaseException as e:  # noqa: BLE001
                self._drop(job, e)
                continue
            feeds_of[job] = [None] * len(feeds)
            for k, feed in enumerate(feeds):
                groups.setdefault(feed_key(feed), []).append((job, k, feed))
        unet = self.generator.models.unet
        failed: set = set()
        for members in groups.values():
            t0 = time.perf_counter()
            try:
                outputs = run_concatenated(unet.run, [feed for _, _, feed in members])
            except BaseException as e:  # noqa: BLE001
                for job, _, _ in members:
                    failed.add(job)
                    self._drop(job, e)
                continue
            self._observe("unet_step", time.perf_counter() - t0)
            if self.metrics is not None:
                self.metrics.batch(self.name, len({id(job) for job, _, _ in members}),
                                   sum(len(feed["sample"]) for _, _, feed in members))
            for (job, k, _), out in zip(members, outputs):
                feeds_of[job][k] = out["out_sample"]
        for job, outputs in feeds_of.items():
            if job in failed:
                continue
            try:
                job.loop.advance(outputs)
            except BaseException as e:  # noqa: BLE001
                self._drop(job, e)
                continue
            if job.loop.done or job.interrupted:
                done.append(job)
        if done:
            with self._cond:
                for job in done:
                    self._active.remove(job)
            self._finish(done)

    def _finish(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        for job in jobs:
            job.loop.close()
        results = self._together(lambda job: self.generator.finish(job.run, job.loop.latents), jobs)
        self._observe("finish", time.perf_counter() - t0)
        now = time.perf_counter()
        for job, output in zip(jobs, results):
            if isinstance(output, BaseException):
                self._fail(job, output)
                continue
            output.timings.update(queue=job.started - job.submitted, total=now - job.submitted,
                                  steps=job.run.plan.num_inference_steps,
                                  unet_evaluations=job.loop.i, interrupted=job.interrupted)
            self._seconds.append(now - job.started)
            if not job.future.done():
                job.future.set_result(output)

    def _drop(self, job: Job, error: BaseException) -> None:
        with self._cond:
            if job in self._active:
                self._active.remove(job)
        self._fail(job, error)

    @staticmethod
    def _fail(job: Job, error: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(error)

    # -- metrics ----------------------------------------------------------------------------------------

    def _observe(self, stage: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.stage(self.name, stage, seconds)

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            with self._cond:
                waiting, active = len(self._waiting), len(self._active)
            self.metrics.queue(self.name, waiting, active)

    def _gathered(self, engine: str, feeds: int) -> None:
        if self.metrics is not None:
            self.metrics.gathered(self.name, engine, feeds)
