"""Exposure records out of the request path: a bounded queue, one sender thread, Kafka.

`ExposureLog.send` never blocks and never raises: a full queue drops the record,
a failing sender is counted, and the request that produced the record has
already been answered. `KafkaSender` publishes to the exposures topic keyed by
user id (so one user's exposures stay in order on one partition), with acks=1:
exposures are telemetry for attribution, not the source of truth, and a lost one
only removes one trial from an arm's statistics.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

import orjson

log = logging.getLogger(__name__)


class ExposureLog:
    """Bounded queue + one sender thread: `send` never blocks and never raises.

    `sender(record)` does the actual send (e.g. `kafka_sender`); it may raise, which
    is counted as `failed`. A full queue drops the record (`dropped`)."""

    def __init__(self, sender: Callable[[dict], None], metrics, maxsize: int = 10000):
        self.sender, self.metrics = sender, metrics
        self.q: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="exposure-log", daemon=True)
        self.thread.start()

    def send(self, record: dict) -> None:
        try:
            self.q.put_nowait(record)
        except queue.Full:
            self.metrics.exposures.labels("dropped").inc()

    def _run(self) -> None:
        while not (self._stop.is_set() and self.q.empty()):
            try:
                rec = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self.sender(rec)
            except Exception as e:  # noqa: BLE001 - a broken broker must never reach a request
                self.metrics.exposures.labels("failed").inc()
                log.debug("exposure not sent: %s", e)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.thread.join(timeout_s)
        close = getattr(self.sender, "close", None)
        if close:
            close(timeout_s)


class KafkaSender:
    """Sends exposure records to `topic` keyed by user id, through one lazily created
    KafkaProducer (acks=1: telemetry, not the source of truth). Delivery errors reported
    by the producer's callbacks are counted as `failed`; successes as `sent`."""

    def __init__(self, kafka_cfg, topic: str, metrics):
        self.cfg, self.topic, self.metrics = kafka_cfg, topic, metrics
        self.producer = None
        self._retry_at = 0.0

    def __call__(self, rec: dict) -> None:
        if self.producer is None:
            if time.monotonic() < self._retry_at:
                raise RuntimeError("Kafka producer unavailable (retrying later)")
            from unirec.streaming.replay import make_producer
            if not self._reachable():
                # kafka-python's constructor blocks ~30 s on a dead bootstrap address, busy
                # in this process while requests are served: probe with a plain connect first.
                self._retry_at = time.monotonic() + 5.0
                raise RuntimeError(f"Kafka at {self.cfg.bootstrap_servers} does not accept connections")
            try:
                self.producer = make_producer(self.cfg, acks=1, enable_idempotence=False, linger_ms=20,
                                              batch_size=64 * 1024, max_block_ms=2000)
            except Exception:
                self._retry_at = time.monotonic() + 5.0
                raise
        fut = self.producer.send(self.topic, key=rec["user_id"].encode(), value=orjson.dumps(rec))
        fut.add_callback(lambda _: self.metrics.exposures.labels("sent").inc())
        fut.add_errback(lambda _: self.metrics.exposures.labels("failed").inc())

    def _reachable(self, timeout_s: float = 0.5) -> bool:
        """Whether any bootstrap server accepts a TCP connection."""
        servers = self.cfg.bootstrap_servers
        for server in (servers.split(",") if isinstance(servers, str) else servers):
            host, _, port = server.strip().rpartition(":")
            try:
                socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s).close()
                return True
            except (OSError, ValueError):
                continue
        return False

    def close(self, timeout_s: float) -> None:
        if self.producer is not None:
            self.producer.flush(timeout_s)
            self.producer.close(timeout_s)
