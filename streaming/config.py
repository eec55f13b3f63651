"""The `kafka:` and `streaming:` sections of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class KafkaTopics:
    """Topic names. `ensure_topics` creates every non-null one."""

    clicks: str = "clicks"             # click/v1 events, keyed by user_id
    queries: str = "queries"           # query/v1 events, keyed by user_id
    dead_letter: str = "dead-letter"   # dead-letter/v1 records (unirec.streaming.deadletter)
    model_updates: str = "model-updates"  # model-update/v1 notices, one per published version (ops/publish.py)
    exposures: str = "exposures"       # exposure/v1 records of served lists, keyed by user_id (unirec.ops.serving)


@dataclass(frozen=True)
class EventLimits:
    """What `unirec.streaming.events.decode` accepts beyond the schema itself."""

    max_bytes: int = 65536             # larger payloads are rejected as `oversize` before parsing
    max_future_skew_s: int = 300       # ts may lead the consumer's clock by at most this (producer clock skew)
    max_id_chars: int = 128            # event_id / user_id / item_id / query_id length
    max_text_chars: int = 1024         # query text length

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_future_skew_s", "max_id_chars", "max_text_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"limits.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EmbeddedBroker:
    """The noida-db broker that `unirec broker start` runs on the bootstrap host:port (loopback only)."""

    run_dir: str = ".unirec/broker"    # pid file, log and the broker's data dir (relative to the working dir)
    start_timeout_s: float = 30.0      # `start` fails if the broker does not answer metadata requests by then
    stop_timeout_s: float = 15.0       # `stop` sends SIGTERM, then SIGKILL after this long


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaConfig:
    """Where the events live. Pointing `bootstrap_servers` (plus security settings,
    secrets as `${ENV}`) at a real cluster is the only change needed to leave the
    embedded broker."""

    bootstrap_servers: str = "127.0.0.1:19092"   # comma-separated host:port list
    client_id: str = "unirec"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None  # required with SASL_*
    sasl_username: str | None = None             # e.g. "${KAFKA_USERNAME}"
    sasl_password: str | None = None             # e.g. "${KAFKA_PASSWORD}"
    ssl_cafile: str | None = None                # CA bundle to verify the brokers (SSL / SASL_SSL)
    ssl_certfile: str | None = None              # client certificate (mutual TLS)
    ssl_keyfile: str | None = None               # client private key (mutual TLS)
    request_timeout_ms: int = 30000
    topics: KafkaTopics = field(default_factory=KafkaTopics)
    partitions: int = 3                          # for topics the project creates; existing ones are left alone
    replication_factor: int = 1                  # 1 for the embedded broker; 3 on a real cluster
    limits: EventLimits = field(default_factory=EventLimits)
    embedded: EmbeddedBroker = field(default_factory=EmbeddedBroker)

    def __post_init__(self) -> None:
        if not [s for s in self.bootstrap_servers.split(",") if s.strip()]:
            raise ValueError("bootstrap_servers: must name at least one host:port")
        if self.partitions < 1 or self.replication_factor < 1:
            raise ValueError("partitions and replication_factor: must be >= 1")
        if self.security_protocol.startswith("SASL_"):
            missing = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if not getattr(self, n)]
            if missing:
                raise ValueError(f"{missing[0]}: required with security_protocol {self.security_protocol}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile: give both or neither")


BeamRunner = Literal["FnApiRunner", "DirectRunner", "DaskRunner", "FlinkRunner", "DataflowRunner"]
PushMode = Literal["process", "thread", "inline"]


@dataclass(frozen=True)
class StreamingConfig:
    """The continuous micro-batch driver and its Beam pipeline (streaming/driver.py).

    A micro-batch covers one arrival-time cut over every partition, chosen so that it
    holds about `max_batch_events` records at most; a partition stops early after an
    empty poll of `idle_poll_ms`, at `max_batch_bytes`, or when `max_wait_s` has
    passed: small batches when traffic is light (latency), large ones under load
    (throughput; Beam's per-run cost is amortised)."""

    group_id: str = "unirec-pipeline"   # Kafka group whose committed offsets the driver writes (assign + commit, no group join)
    max_batch_events: int = 50000       # records per micro-batch, over every partition of both topics
    max_batch_bytes: int = 64 << 20     # payload bytes one partition may contribute to a micro-batch
    max_wait_s: float = 1.0             # a micro-batch stops reading after this long
    idle_poll_ms: int = 20              # a partition is done for this batch after an empty poll this long
    idle_sleep_s: float = 0.05          # pause between checks when nothing is pending
    recheck_s: float = 5.0              # run a batch at least this often even if end offsets say nothing is new
    key_groups: int = 16                # users / items are hashed into this many key groups (Flink's max parallelism)
    state_batch: int = 2000             # users (items) per state-store read inside the merge steps
    runner: BeamRunner = "FnApiRunner"  # Beam runner that executes each bounded micro-batch
    runner_options: tuple[str, ...] = ()  # extra Beam options, e.g. ["--dask_client_address=127.0.0.1:8786"]
    in_process_below: int = 0           # batches with fewer pending records run the same steps in-process, no Beam (0: never)
    push_mode: PushMode = "process"     # Feast pushes: in a child process (own core), a thread, or inline (no overlap)
    max_staged_keys: int = 300000       # committed keys waiting for a push in flight; beyond this the driver waits
    push_nice: int = 5                  # the push process's niceness (0-19): under contention the driver goes first
    arrival_grace_ms: int = 250         # a producer's records reach the broker up to this late (linger + a round trip):
                                        # a batch reads records stamped up to the oldest partition tail, or at least
                                        # this long ago, so a query never misses the batch of the clicks sent after it
    work_dir: str = ".cache/unirec/pipeline"  # per-batch output files of the Beam run (deleted after each batch)
    kafka_commit_interval_s: float = 30.0  # offsets go to the Kafka group at most this often, and on exit: the state
                                           # store holds the truth, the group's offsets serve lag monitors (0: every
                                           # batch). Each commit makes the embedded broker rewrite its whole store (most
                                           # of its CPU at 1M records: 7,293 events/s at 5 s vs 9,729 at 30 s, ingest
                                           # bench); on a real cluster 5 s, Kafka's auto-commit default, costs nothing

    def __post_init__(self) -> None:
        for name in ("max_batch_events", "max_batch_bytes", "idle_poll_ms", "key_groups", "state_batch",
                     "max_staged_keys"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_wait_s", "idle_sleep_s", "recheck_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.arrival_grace_ms < 0:
            raise ValueError(f"arrival_grace_ms: must be >= 0, got {self.arrival_grace_ms}")
        if not 0 <= self.push_nice <= 19:
            raise ValueError(f"push_nice: must be within 0..19, got {self.push_nice}")
        if self.in_process_below < 0:
            raise ValueError(f"in_process_below: must be >= 0, got {self.in_process_below}")
        if self.kafka_commit_interval_s < 0:
            raise ValueError(f"kafka_commit_interval_s: must be >= 0, got {self.kafka_commit_interval_s}")
