"""Gather: an engine whose calls from several threads at once run as one batched call.

The server starts (text encoders, VAE encoder) and finishes (VAE decoder) the requests admitted or done at the
same step boundary, each in its own thread through the unchanged generation core (Generator.start / finish).
Their engine calls meet here: once every party is either waiting in `run` or done, the waiting feeds whose
inputs have the same shapes past the batch axis are concatenated, run once, and each party gets its rows.
Rows are independent in these networks, so each result equals the call made alone (on onnxruntime's CPU
provider bit for bit; tests/test_serve.py checks).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import numpy as np


def feed_key(feed: dict) -> tuple:
    """Feeds with equal keys can be concatenated along the batch axis."""
    return tuple(sorted((name, np.shape(v)[1:], np.asarray(v).dtype.str) for name, v in feed.items()))


def run_concatenated(run: Callable[[dict], dict], feeds: list[dict]) -> list[dict]:
    """`run` once on the row-wise concatenation of `feeds` (all of one feed_key); each feed's rows of every output."""
    if len(feeds) == 1:
        return [run(feeds[0])]
    rows = [len(next(iter(feed.values()))) for feed in feeds]
    outputs = run({name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]})
    total = sum(rows)
    if any(np.ndim(value) == 0 or len(value) != total for value in outputs.values()):
        return [run(feed) for feed in feeds]  # an output without the batch axis: one call each
    bounds = np.cumsum(rows)[:-1]
    split = {name: np.split(value, bounds) for name, value in outputs.items()}
    return [{name: parts[k] for name, parts in split.items()} for k in range(len(feeds))]


class Meeting:
    """Where the calls of n threads meet: once every party waits in some Gather's `run` or has left, the waiting
    feeds run, one batched call per (engine, input shapes). One Meeting serves all the engines of a model, so that
    a party waiting on one engine never holds up the others."""

    def __init__(self, on_batch: Callable[[str, int], None] | None = None):
        self._on_batch = on_batch  # (engine name, feeds in one call): metrics
        self._cond = threading.Condition()
        self._parties = 0
        self._left = 0
        self._waiting: list[tuple] = []  # (Gather, slot)

    @contextmanager
    def parties(self, n: int):
        """The next calls of n threads meet; each calls `leave()` when it makes no more (in a finally)."""
        with self._cond:
            self._parties, self._left, self._waiting = n, 0, []
        try:
            yield self
        finally:
            with self._cond:
                self._parties = 0

    def leave(self) -> None:
        with self._cond:
            if self._parties:
                self._left += 1
                self._flush()

    def call(self, gather: "Gather", feed: dict) -> dict:
        with self._cond:
            if self._parties > 1:
                slot = {"feed": feed}
                self._waiting.append((gather, slot))
                self._flush()
                while "out" not in slot and "error" not in slot:
                    self._cond.wait()
                if "error" in slot:
                    raise slot["error"]
                return slot["out"]
        return gather.engine.run(feed)

    def _flush(self) -> None:
        """With the lock held: when every party waits or has left, run the waiting feeds, grouped by engine and
        input shapes."""
        if not self._waiting or len(self._waiting) + self._left < self._parties:
            return
        waiting, self._waiting = self._waiting, []
        groups: dict[tuple, list[tuple]] = {}
        for gather, slot in waiting:
            groups.setdefault((id(gather), feed_key(slot["feed"])), []).append((gather, slot))
        for members in groups.values():
            gather, slots = members[0][0], [slot for _, slot in members]
            try:
                outputs = run_concatenated(gather.engine.run, [slot["feed"] for slot in slots])
                if self._on_batch is not None:
                    self._on_batch(gather.name, len(slots))
                for slot, out in zip(slots, outputs):
                    slot["out"] = out
            except BaseException as e:  # noqa: BLE001 (handed to each waiting party)
                for slot in slots:
                    slot["error"] = e
        self._cond.notify_all()


class Gather:
    """An engine (any attribute is the wrapped engine's) whose `run` meets the other parties' calls in `meeting`;
    outside `meeting.parties(n)`, calls go straight through."""

    def __init__(self, engine, meeting: Meeting, name: str):
        self.__dict__.update(engine=engine, meeting=meeting, name=name)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feed: dict) -> dict:
        return self.meeting.call(self, feed)
