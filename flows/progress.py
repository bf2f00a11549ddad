"""Progress lines for long tasks: what a flow run's log shows while a batch of signs is described
or a stream trains.

By hand, because a progress bar (rich, as the CLI's ``--no-prefect`` path draws) reaches neither a
worker's log nor the flow run's logs on the server; a line now and then does.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from gsp.schema import KINDS

#: A line at least this often while anything finishes (besides one per quarter of the signs).
EVERY_S = 30.0


class DescribeProgress:
    """``on_done(kind)`` for :func:`gsp.generate.describe_planned`, called once per sign and kind
    as it finishes: logs "<what>: 41 s, done Tb 16/16, Ts 12/16, Tg 10/16, Tp 8/16" when another
    quarter of the signs have their parts (Tp, the last kind of a sign), and every ``every_s``
    while kinds finish; the task's own line says when all are done."""

    def __init__(self, what: str, signs: int, logger: logging.Logger | logging.LoggerAdapter,
                 every_s: float = EVERY_S):
        self.what, self.signs, self.logger, self.every_s = what, signs, logger, every_s
        self.done: Counter[str] = Counter()
        self.started = self.last = time.monotonic()
        self.quarters = 0

    def __call__(self, kind: str) -> None:
        self.done[kind] += 1
        now = time.monotonic()
        quarters = 4 * self.done["Tp"] // max(self.signs, 1)
        if self.done["Tp"] >= self.signs:
            return
        if quarters > self.quarters or now - self.last >= self.every_s:
            self.quarters, self.last = max(quarters, self.quarters), now
            self.logger.info("%s: %.0f s, done %s", self.what, now - self.started,
                             ", ".join(f"{k} {self.done[k]}/{self.signs}" for k in KINDS))


class TrainingProgress:
    """``on_epoch`` and ``on_step`` for :func:`mc.train.train`: one line per epoch, and within an
    epoch a line at least every ``every_s`` (an epoch at full size takes minutes)."""

    def __init__(self, stream: str, logger: logging.Logger | logging.LoggerAdapter, every_s: float = EVERY_S):
        self.stream, self.logger, self.every_s = stream, logger, every_s
        self.last = time.monotonic()

    def step(self, at: dict) -> None:
        now = time.monotonic()
        if at["step"] < at["steps"] and now - self.last >= self.every_s:
            self.last = now
            self.logger.info("%s: epoch %d/%d, step %d/%d, loss %.3f so far", self.stream, at["epoch"],
                             at["epochs"], at["step"], at["steps"], at["loss"])

    def epoch(self, record: dict, epochs: int) -> None:
        self.last = time.monotonic()
        self.logger.info("%s: epoch %d/%d, loss %.3f, train top-1 %.3f, lr %.3g (%.0f s)", self.stream,
                         record["epoch"], epochs, record["loss"], record["train_top1"], record["lr"],
                         record["seconds"])
