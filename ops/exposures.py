"""Exposure records out of the request path: a bounded queue, one sender thread, Kafka.

`ExposureLog.send` never blocks and never raises: a full queue drops the record,
a failing sender is counted, and the request that produced the record has
already been answered. `KafkaSender` publishes to the exposures topic keyed by
user id (so one user's exposures stay in order on one partition), with acks=1:
exposures are telemetry for attribution, not the source of truth, and a lost one
only removes one trial from an arm's statistics.

**Sent in batches, every `flush_s`.** The first version woke its sender thread
for every record (`queue.Queue.put` + notify), and each send woke kafka-python's
own I/O thread; each wake-up takes the GIL from the request path (cProfile of the
request path, in-process, with a no-op sender: the `put`'s notify alone cost
~0.5 ms per request, the woken thread's turn with the GIL). Now `send` is a
`deque.append` (no lock, no wake-up) and the sender thread wakes every
`flush_s` (50 ms) to hand everything queued to the producer at once, which then
goes out in one produce request per partition. kafka-python costs ~0.04 ms of
CPU per record sent that way (measured: 5,000 exposure records in bursts of 40
to the embedded broker). An exposure reaches Kafka at most ~`flush_s` + the
producer's `linger_ms` later; attribution reads them by request id, not by time.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

import orjson

log = logging.getLogger(__name__)


class ExposureLog:
    """Bounded queue + one sender thread: `send` never blocks and never raises.

    `sender(record)` does the actual send (e.g. `KafkaSender`); it may raise, which
    is counted as `failed`. Records queued or being handed to the sender beyond
    `maxsize` are dropped (`dropped`). The thread wakes every `flush_s` and sends
    all that queued meanwhile (see the module doc)."""

    def __init__(self, sender: Callable[[dict], None], metrics, maxsize: int = 10000, flush_s: float = 0.05):
        self.sender, self.metrics, self.maxsize, self.flush_s = sender, metrics, maxsize, flush_s
        self.q: deque = deque()          # append / popleft are atomic: no lock on the request path
        self._inflight = 0               # taken by the sender thread, not yet handed over
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="exposure-log", daemon=True)
        self.thread.start()

    def send(self, record: dict) -> None:
        if len(self.q) + self._inflight >= self.maxsize:
            self.metrics.exposures.labels("dropped").inc()
        else:
            self.q.append(record)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.flush_s)
            self._send_queued()
            if stopping:
                return

    def _send_queued(self) -> None:
        batch = []
        while self.q:
            self._inflight += 1
            batch.append(self.q.popleft())
        for rec in batch:
            try:
                self.sender(rec)
            except Exception as e:  # noqa: BLE001 - a broken broker must never reach a request
                self.metrics.exposures.labels("failed").inc()
                log.debug("exposure not sent: %s", e)
            self._inflight -= 1

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
