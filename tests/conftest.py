"""Shared fixtures: a real embedded Kafka broker, started the way a user starts it.

* `kafka_broker` (session): `unirec.streaming.broker.start` runs noida-db on a
  free loopback port with its run dir (pid file, log, data) in a tmp dir;
  yields the `KafkaConfig` that points at it; stops it at the end.
* `kafka_cfg` (per test): that config with fresh topic names (unique suffix),
  already created, so tests sharing the broker never see each other's records.
* `start_kafka` (per test): a factory for brokers of the test's own (restarts,
  kills), all stopped after the test.
* `pipeline_process` (per test): `unirec pipeline run` as a child process with its
  log lines in a queue (for SIGKILL tests).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from unirec.streaming import broker
from unirec.streaming.config import EmbeddedBroker, KafkaConfig, KafkaTopics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_config(run_dir: Path, port: int | None = None, **kw) -> KafkaConfig:
    """A KafkaConfig for an embedded broker on `port` (default: a free one) in `run_dir`."""
    return KafkaConfig(
        bootstrap_servers=f"127.0.0.1:{port or free_port()}",
        embedded=EmbeddedBroker(run_dir=str(run_dir), start_timeout_s=30.0, stop_timeout_s=10.0),
        **kw,
    )


def start_broker(run_dir: Path, attempts: int = 3) -> KafkaConfig:
    """Start a broker on a free port; retry on another port if one was taken meanwhile."""
    for attempt in range(attempts):
        cfg = broker_config(run_dir)
        try:
            broker.start(cfg)
            return cfg
        except broker.BrokerError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def unique_topics(prefix: str = "") -> KafkaTopics:
    suffix = uuid.uuid4().hex[:8]
    return KafkaTopics(clicks=f"{prefix}clicks-{suffix}", queries=f"{prefix}queries-{suffix}",
                       dead_letter=f"{prefix}dead-letter-{suffix}", model_updates=f"{prefix}model-updates-{suffix}",
                       exposures=f"{prefix}exposures-{suffix}")  # fmt: skip


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory):
    cfg = start_broker(tmp_path_factory.mktemp("kafka-broker"))
    try:
        yield cfg
    finally:
        broker.stop(cfg)


@pytest.fixture
def kafka_cfg(kafka_broker: KafkaConfig):
    """Fresh topics on the shared broker, deleted after the test: the embedded broker
    rewrites its whole store after every write and answers no fetch meanwhile (seconds
    at a few 100k records), so a store that kept every test's records would stall the
    reads of later tests and cost the suite broker CPU."""
    cfg = dataclasses.replace(kafka_broker, topics=unique_topics())
    broker.ensure_topics(cfg)
    yield cfg
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(**broker.client_kwargs(cfg))
    try:
        existing = set(admin.list_topics())
        admin.delete_topics([t for t in broker.topic_names(cfg) if t in existing])
    except KafkaError as e:   # only costs later tests time: say so, do not fail this one
        warnings.warn(f"could not delete the test's topics: {e!r}")
    finally:
        admin.close()


@pytest.fixture
def start_kafka(tmp_path: Path):
    """`start_kafka(run_dir=None) -> KafkaConfig`: a broker of the test's own (for
    restart tests; `broker.stop(cfg)` / `broker.start(cfg)` keep its port and data).
    Every broker started this way is stopped after the test."""
    started: list[KafkaConfig] = []

    def _start(run_dir: Path | None = None) -> KafkaConfig:
        cfg = start_broker(run_dir or tmp_path / f"kafka-{len(started)}")
        started.append(cfg)
        return cfg

    yield _start
    for cfg in started:
        broker.stop(cfg)


@pytest.fixture
def own_kafka_cfg(start_kafka) -> KafkaConfig:
    """Like `kafka_cfg`, on a broker of the test's own: for tests that time single reads.
    The embedded broker rewrites its whole store about a second after any write, which
    takes seconds once the shared broker holds the suite's records, and stalls reads."""
    cfg = dataclasses.replace(start_kafka(), topics=unique_topics())
    broker.ensure_topics(cfg)
    return cfg


# ---------------------------------------------------------------- `unirec pipeline run` as a real process

def unirec_command() -> list[str]:
    script = Path(sys.executable).with_name("unirec")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from unirec.cli import main; main()"]


class Pipeline:
    """`unirec pipeline run` as a child process, with its log lines in a queue."""

    def __init__(self, config: Path, *args: str):
        self.proc = subprocess.Popen([*unirec_command(), "-c", str(config), "pipeline", "run", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=config.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for_batch(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if " batch " in line:
                return
        raise AssertionError("the pipeline applied no batch:\n" + "".join(self.log[-30:]))


@pytest.fixture
def pipeline_process():
    """`pipeline_process(config, *args) -> Pipeline`: `unirec pipeline run` in a child process
    (killed after the test if still running)."""
    started: list[Pipeline] = []

    def _start(config: Path, *args: str) -> Pipeline:
        started.append(Pipeline(config, *args))
        return started[-1]

    yield _start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()


@pytest.fixture
def killed_while_replaying(pipeline_process):
    """`killed_while_replaying(config, kafka_cfg, lines, rng, rate=, max_sleep_s=, timeout_s=)`:
    replay `lines` into Kafka while `unirec pipeline run` runs, and SIGKILL the pipeline
    at a random moment after its first batch; returns whether the kill landed."""
    from unirec.streaming.replay import replay

    def _run(config: Path, kafka_cfg, lines, rng, *, rate: float, max_sleep_s: float, timeout_s: float) -> bool:
        producer = threading.Thread(target=replay, args=(lines, kafka_cfg), kwargs={"rate": rate})
        producer.start()
        run = pipeline_process(config)
        try:
            run.wait_for_batch(timeout_s=timeout_s)
            time.sleep(rng.uniform(0.0, max_sleep_s))   # somewhere inside the batch protocol
            run.proc.send_signal(signal.SIGKILL)
            return run.proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
            producer.join()

    return _run


@pytest.fixture
def read_dead_letters():
    """`read_dead_letters(kafka_cfg) -> [DeadLetter]`: everything on the dead-letter topic so far."""
    from kafka import KafkaConsumer

    from unirec.streaming.broker import client_kwargs
    from unirec.streaming.deadletter import DeadLetter

    def _read(kafka_cfg) -> list:
        consumer = KafkaConsumer(kafka_cfg.topics.dead_letter, **client_kwargs(kafka_cfg),
                                 auto_offset_reset="earliest", consumer_timeout_ms=3000, group_id=None)
        try:
            return [DeadLetter.from_bytes(r.value) for r in consumer]
        finally:
            consumer.close()

    return _read


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded (idle OpenMP threads spin on a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
