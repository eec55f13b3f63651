"""The continuous micro-batch driver: Kafka -> Beam -> state store -> Feast, exactly-once in effect.

Why micro-batches. On this machine Beam's Python direct runner does not fire
windows for an unbounded source in streaming mode, `--direct_num_workers` > 1
lost data, `ReadFromKafka` needs a Java expansion service and no Flink / Spark /
Prism job server can be fetched. So the driver runs the pipeline
(`transforms.MicroBatch`) as a succession of small BOUNDED Beam runs, each reading
a bounded slice of every partition, and makes the results durable itself.

One micro-batch (`Driver.run_batch`):

1. Plan: for each (topic, partition) start at the driver's position (the state
   store's offset: never behind what is applied). Every range of the batch gets
   the same arrival-time cut: records with a Kafka timestamp <= the cut (the
   latest time no record can still be in flight to, `plan.Planner.arrival_cut`, or
   under backlog the latest time that keeps the batch within `max_batch_events`,
   found from the broker's time index). So clicks and queries advance together
   and each user's events are merged in arrival order however the stream is cut
   into batches. The broker's end offsets and time index are only hints (which
   partitions have news, where the cut lies); a read stops at the cut, at max
   records / bytes, an idle poll or `max_wait_s`, judged from the records
   themselves (`kafka_source.read_range`), and hands on the offset after the
   last record it actually read.
2. Run the Beam pipeline (ReadKafkaRanges -> ParseEvent -> GroupByUserKeyGroup ->
   UpdateUserSequence -> GroupByItemKeyGroup -> UpdateItemStats) on
   `streaming.runner`; collect new user states, item stats, dead letters and the
   offset after the last record actually read per partition.
3. Send the dead letters and flush (acknowledged by the broker).
4. `StateStore.commit_batch(users, items, offsets)`: ONE SQLite transaction (WAL,
   fsync) with the new states, the offsets they cover and an outbox of keys to push.
5. Push the absolute states to the Feast online store (idempotent), then
   `mark_pushed` (clears the outbox).
6. Commit the offsets to Kafka for `streaming.group_id` (manual assignment, no
   group join), at most every `streaming.kafka_commit_interval_s` and on exit. For
   monitoring and for tools; the state store's offsets win.

Steps 5-6 overlap the next batches (their merges read the states the earlier
batches committed in step 4), per `streaming.push_mode`:

* `process` (default, when the driver opens its own online store): a child
  process (`streaming.pusher`) pushes whatever the outbox names, on the second
  core; the driver only sends it batch ids and, when it answers "covered up to
  batch M", commits those batches' offsets to Kafka and reports them.
* `thread`: the same push in a background thread (it shares the GIL with the
  merges, so it overlaps I/O but not Python work). Used whatever the mode when
  the caller passes its own `online` store object.
* `inline`: push, then return from `run_batch`.

Every push writes what the outbox names, each key once with its newest state,
so batches committed while a push is in flight go out together in the next one
(a pusher that falls behind pushes less per event instead of stalling the
driver; `streaming.max_staged_keys` bounds the keys committed but not yet
confirmed). Pushes run one at a time in commit order, so an older state never
overwrites a newer one online, and `mark_pushed(batch=newest)` clears only
the outbox rows of batches the push read (a batch committed meanwhile keeps its row,
and its keys go out again in the next push).

With online learning (`learning=streaming.online.OnlineLoop`), step 2 also runs the
FineTune stage (test-then-train on the batch's changed users), step 4 also writes
the batch's training examples to the state store's training log, and right after
step 4 the loop publishes a model version when one is due (see streaming/online.py
for what survives a crash).

With A/B attribution (`experiments=streaming.experiment_feed.ExperimentFeed`), right
after step 4 the batch's applied clicks that carry a request id are attributed to
the arms of the served lists they came from, and the per-arm gauges are exported;
a failure there is logged and counted, never fatal to ingestion.

On start (`Driver.open`): re-push whatever the outbox holds (a crash between 4 and
5), then seek every partition to the state store's offset; partitions the store
has never seen start from the group's committed offset, else the earliest.

What a user can rely on:
* **Delivery is at-least-once; the effect on features is exactly-once.** A crash
  anywhere re-reads at most the records after the last committed batch, which
  the store has not applied; per-user merges are also idempotent on `event_id`,
  and pushes write absolute values. Killing the process with SIGKILL at any
  moment and restarting it gives the same online features as an uninterrupted
  run (tests/streaming/test_exactly_once.py does this with real processes).
* **Dead letters are at-least-once**: a crash between 3 and 4 sends that batch's
  dead letters again on restart. Dedup them by (source_topic, partition, offset).
* **Nothing is silently dropped**: every record read is applied, or becomes a
  dead letter with a reason (decode reasons, `duplicate`, `late`), counted per
  reason (`Driver.totals`, Beam counters `unirec:dead_letter.<reason>`).
* A record's features are online when the batch that read it returns from step 5.

Cost of a Beam run. Building and translating the pipeline costs more than running
a small batch; `microbatch.BeamBatchRunner` builds it once and re-runs the same
portable pipeline on the in-process FnApiRunner (~0.2-0.3 s fixed cost per batch
here, measured). Batches grow with load up to `max_batch_events`, so that cost is
amortised under load and stays small in latency when traffic is light. For very
light traffic `streaming.in_process_below` (off by default) runs the same step
functions without Beam. bench/ingest.py measures both throughput and latency.

Running the same PTransforms unbounded on a streaming runner. `MicroBatch`'s
steps are ordinary DoFns. On Flink or Dataflow a user replaces the planned reads
with an unbounded Kafka source (`apache_beam.io.kafka.ReadFromKafka`, which
needs the Java expansion service those runners provide) and the state store with
Beam state:

    python -m my_job --runner=FlinkRunner --flink_master=host:8081 \\
        --streaming --environment_type=LOOPBACK --checkpointing_interval=10000
    python -m my_job --runner=DataflowRunner --project=P --region=R \\
        --temp_location=gs://B/tmp --streaming --enable_streaming_engine

    ReadFromKafka(consumer_config=client_kwargs(kafka_cfg), topics=[clicks, queries],
                  with_metadata=True)
      | ParseEvent (per record)  | key by user_id
      | a stateful DoFn keyed by user_id (ReadModifyWriteStateSpec holding the
        UserSequence; the same `sequence.merge`) | key by item_id
      | a stateful DoFn for `item_stats.apply` | a Feast push DoFn.

There the runner's checkpoints (Flink: Kafka offsets and keyed state snapshotted
together; Dataflow: exactly-once shuffle) take the place of step 4, and pushes stay
idempotent, so the guarantee is the same. Per-user order then comes from Kafka's
per-partition order (events keyed by user), as here.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from unirec.features.config import FeaturesConfig
from unirec.features.state import encode_item
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import KafkaConfig, StreamingConfig
from unirec.streaming.deadletter import send_dead_letters
from unirec.streaming.kafka_source import POOL, ReadRange, new_reader, reader_config
from unirec.streaming.plan import Planner
from unirec.streaming.microbatch import BatchOutputs, BeamBatchRunner, run_in_process
from unirec.streaming.transforms import BatchSpec

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass
class BatchReport:
    """What one micro-batch did (for logs, the CLI and bench/ingest.py)."""

    batch_id: int
    records: int
    users: int
    items: int
    dead_letters: Counter
    path: str                   # "beam" | "in_process"
    seconds: dict[str, float]   # per phase: plan, run, dead_letters, commit, push, kafka_commit
    pushed_at: float            # time.time() when the Feast push had completed
    arrival_ms: list = field(default_factory=list)  # Kafka timestamp of every record read
    consumed: dict = field(default_factory=dict)    # topic -> records read
    dead_letters_by_topic: Counter = field(default_factory=Counter)  # (source topic, reason) -> dead letters

    def __str__(self) -> str:
        total = sum(self.seconds.values())
        dead = ", ".join(f"{k}: {v}" for k, v in sorted(self.dead_letters.items())) or "none"
        return (f"batch {self.batch_id}: {self.records} records in {total:.2f} s "
                f"({self.records / total if total else 0:,.0f}/s, {self.path}), {self.users} users, "
                f"{self.items} items, dead letters: {dead}")


def batch_spec(kafka_cfg: KafkaConfig, streaming_cfg: StreamingConfig, features_cfg: FeaturesConfig) -> BatchSpec:
    return BatchSpec(
        kinds={kafka_cfg.topics.clicks: "click", kafka_cfg.topics.queries: "query"},
        state_path=features_cfg.state_path,
        reader=reader_config(client_kwargs(kafka_cfg), streaming_cfg.idle_poll_ms),
        limits=kafka_cfg.limits, key_groups=streaming_cfg.key_groups, state_batch=streaming_cfg.state_batch,
        max_len=features_cfg.max_sequence_length, max_queries=features_cfg.max_queries,
        allowed_lateness_s=features_cfg.allowed_lateness_s, item_bucket_s=features_cfg.item_bucket_s,
        item_windows_s=tuple(features_cfg.item_windows_s))


class Driver:
    """Runs micro-batches until stopped; see the module docstring for the protocol."""

    def __init__(self, kafka_cfg: KafkaConfig, streaming_cfg: StreamingConfig,
                 features_cfg: FeaturesConfig, *, online=None, on_batch: Callable | None = None,
                 learning=None, experiments=None):
        self.kafka_cfg, self.cfg, self.features_cfg = kafka_cfg, streaming_cfg, features_cfg
        self.spec = batch_spec(kafka_cfg, streaming_cfg, features_cfg)
        self.online = online
        self.learning = learning      # streaming.online.OnlineLoop: FineTune + publishing (None: features only)
        self.experiments = experiments  # streaming.experiment_feed.ExperimentFeed: A/B attribution (None: off)
        self.on_batch = on_batch
        self.positions: dict[TP, int] = {}
        self.totals: Counter = Counter()
        self._last_full = 0.0
        self.planner: Planner | None = None   # where each batch's reads start and stop (open)
        self._stop = False
        self._own_online = online is None
        self._pushes = None         # streaming.pusher.PushProcess | ThreadPusher (push_mode)
        self._inflight: list = []   # committed batches whose push is not confirmed yet
        self._to_commit: dict[TP, int] = {}   # pushed offsets not yet committed to the Kafka group
        self._kafka_committed_at = -math.inf

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Driver:
        from unirec.features.state import StateStore

        kw = client_kwargs(self.kafka_cfg)
        self.store = StateStore(self.features_cfg.state_path)
        if self.online is None:
            from unirec.features.online import OnlineStore

            self.online = OnlineStore(self.features_cfg)
            self.online.apply()
        self.consumer = KafkaConsumer(**kw, group_id=self.cfg.group_id, enable_auto_commit=False)
        self._committer = KafkaConsumer(**kw, group_id=self.cfg.group_id, enable_auto_commit=False)
        self._tails = new_reader(reader_config(kw, self.cfg.idle_poll_ms))   # `Planner.arrival_cut`'s probe
        self.planner = Planner(self.cfg, self.consumer, self._tails, self.positions)
        self.producer = KafkaProducer(**kw, acks="all", linger_ms=5)
        if self.learning is not None:
            import dataclasses

            from unirec.features.online import OnlineStore

            self.spec = dataclasses.replace(self.spec, examples=True,
                                            finetune=self.learning.finetune_spec(self.cfg.runner))
            # its own Feast client: the push thread uses self.online concurrently
            emb_store = OnlineStore(self.features_cfg) if self.learning_pushes_embeddings() else None
            self.learning.open(self.store, online_store=emb_store, producer=self.producer,
                               notice_topic=self.kafka_cfg.topics.model_updates)
        # The push of batch N runs while batch N+1 is read and merged (see streaming/pusher.py).
        from unirec.streaming.pusher import PushProcess, ThreadPusher, tune_gc

        if self.cfg.push_mode == "process" and self._own_online:
            self._pushes = PushProcess(self.features_cfg, nice=self.cfg.push_nice)
        else:
            self._pushes = ThreadPusher(self.features_cfg.state_path, self.online,
                                        inline=self.cfg.push_mode == "inline")
        self.runner = BeamBatchRunner(self.spec, runner=self.cfg.runner, options=self.cfg.runner_options,
                                      work_dir=self.cfg.work_dir)
        self.runner.warm_up()
        if hasattr(self._pushes, "wait_ready"):
            self._pushes.wait_ready()   # its start-up (importing Feast) overlapped the warm-up
        self.recover()
        self.refresh_partitions()
        tune_gc()   # start-up objects frozen, fewer collections per batch (see tune_gc)
        if self.experiments is not None:
            self.experiments.open(dict(self.positions))
        return self

    def learning_pushes_embeddings(self) -> bool:
        from unirec.features.online import OnlineStore

        return isinstance(self.online, OnlineStore)

    def close(self) -> None:
        if getattr(self, "_committer", None) is not None:
            self._commit_kafka({}, force=True)
        for name in ("_pushes", "experiments", "runner", "consumer", "_committer", "_tails", "producer", "store"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        if getattr(self, "spec", None) is not None:
            POOL.close_idle(dict(self.spec.reader))   # the readers its in-process Beam runs pooled

    def __enter__(self) -> Driver:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def stop(self) -> None:
        """Finish the current batch, then return from `run` (signal-handler safe)."""
        self._stop = True

    def recover(self) -> int:
        """Push states committed but not confirmed pushed (after a crash); returns how many."""
        pending = self.store.pending_push()
        if not pending:
            return 0
        self.online.push_users(pending.users)
        self.online.push_items(pending.items)
        self.store.mark_pushed(batch=pending.batch)
        log.info("re-pushed %d users and %d items from the outbox", len(pending.users), len(pending.items))
        return len(pending.users) + len(pending.items)

    def refresh_partitions(self) -> None:
        """Start positions for every partition of both topics (new ones included)."""
        tps = []
        for topic in (self.kafka_cfg.topics.clicks, self.kafka_cfg.topics.queries):
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                raise RuntimeError(f"topic {topic!r} does not exist (run `unirec broker start`; "
                                   "`unirec pipeline run` creates the project's topics)")
            tps += [(topic, p) for p in sorted(parts)]
        stored = self.store.offsets()
        new = [tp for tp in tps if tp not in self.positions]
        missing = [TopicPartition(*tp) for tp in new if tp not in stored]
        earliest = self.consumer.beginning_offsets(missing) if missing else {}
        for tp in new:
            if tp in stored:
                self.positions[tp] = stored[tp]
                continue
            committed = self.consumer.committed(TopicPartition(*tp))
            self.positions[tp] = committed if committed is not None else earliest[TopicPartition(*tp)]

    # ------------------------------------------------------------------ one batch

    def plan(self, *, full: bool) -> list[ReadRange]:
        """Read ranges for the next batch (`plan.Planner.plan`)."""
        return self.planner.plan(full=full)

    @property
    def last_lags(self) -> dict[TP, int]:
        """Unread records per partition at the last plan (for monitoring)."""
        return self.planner.last_lags if self.planner is not None else {}

    def execute(self, ranges: list[ReadRange]) -> BatchOutputs:
        pending = sum(max(0, r.end_hint - r.start) for r in ranges)
        if pending < self.cfg.in_process_below:
            return run_in_process(ranges, self.spec, self.store)
        return self.runner.run(ranges)

    def run_batch(self, *, full: bool = False) -> int:
        """Plan, run, send dead letters, commit state, then push (in the background with
        `streaming.push_mode`); returns the number of records read (0: nothing new)."""
        t = time.perf_counter()
        ranges = self.plan(full=full)
        if not ranges:
            return 0
        secs = {"plan": time.perf_counter() - t}
        t = time.perf_counter()
        out = self.execute(ranges)
        secs["run"], t = time.perf_counter() - t, time.perf_counter()
        if not out.records:
            return 0
        dead = send_dead_letters(self.producer, self.kafka_cfg.topics.dead_letter, out.dead_letters)
        secs["dead_letters"], t = time.perf_counter() - t, time.perf_counter()
        offsets = {tp: o for tp, o in out.offsets.items() if o > self.positions.get(tp, 0)}
        batch_id = self.store.commit_encoded(out.user_rows, [encode_item(s) for s in out.items], offsets,
                                             examples=out.examples if self.learning is not None else None)
        self.positions.update(offsets)
        secs["commit"] = time.perf_counter() - t
        if self.learning is not None:
            t = time.perf_counter()
            self.learning.after_commit(batch_id, out.train, out.examples, dict(self.positions))
            secs["learn"] = time.perf_counter() - t
        if self.experiments is not None:
            self._attribute(out.requested)
        self._stage(batch_id, out, offsets, dead, secs)
        return out.records

    def _attribute(self, clicks: list) -> None:
        """A/B attribution of the batch's applied clicks: its failure never stops ingestion."""
        try:
            self.experiments.after_batch(clicks)
        except Exception as e:  # noqa: BLE001 - telemetry; the features are committed already
            self.totals["experiment_errors"] += 1
            log.warning("A/B attribution failed for this batch: %r", e)

    def _stage(self, batch_id: int, out: BatchOutputs, offsets: dict, dead: Counter, secs: dict) -> None:
        """Hand a committed batch to the pusher and take its answers; wait for the oldest
        batch when more than `max_staged_keys` keys are committed but not yet confirmed."""
        self._inflight.append((batch_id, out, offsets, dead, secs))
        self._pushes.submit(batch_id)
        self._confirmed(self._pushes.poll())
        waiting = sum(len(b[1].user_rows) + len(b[1].items) for b in self._inflight)
        if self._inflight and waiting >= self.cfg.max_staged_keys:
            self._confirmed(self._pushes.wait(self._inflight[0][0]))

    def _confirmed(self, answers: list) -> None:
        """Step 6 for the batches a push covered: commit their offsets to Kafka, report them."""
        for ans in answers:
            self.totals["pushes"] += 1
            self.totals["users_written_online"] += ans.users   # a key touched by several batches of one push counts once
            self.totals["items_written_online"] += ans.items
            done = [b for b in self._inflight if b[0] <= ans.batch]
            if not done:
                continue
            self._inflight = self._inflight[len(done):]
            offsets: dict = {}
            for b in done:
                offsets.update(b[2])
            t = time.perf_counter()
            self._commit_kafka(offsets)
            commit_s = time.perf_counter() - t
            share = 1.0 / len(done)
            for batch_id, out, _offsets, dead, secs in done:
                secs["push"], secs["kafka_commit"] = ans.seconds * share, commit_s * share
                report = self._report(batch_id, out, dead, secs, ans.pushed_at)
                log.info("%s", report)
                if self.on_batch is not None:
                    self.on_batch(report)

    def poll_pushed(self) -> None:
        """Report the batches whose push has completed (re-raises a push's error), and
        commit pushed offsets whose interval has passed (so an idle pipeline's group
        offsets catch up with what it has done)."""
        self._confirmed(self._pushes.poll())
        self._commit_kafka({})

    def wait_pushed(self) -> None:
        """Block until every committed batch is pushed (re-raises a push's error)."""
        if self._inflight:
            self._confirmed(self._pushes.wait(self._inflight[-1][0]))

    def _report(self, batch_id: int, out: BatchOutputs, dead: Counter, secs: dict,
                pushed_at: float) -> BatchReport:
        self.totals["batches"] += 1
        self.totals["records"] += out.records
        self.totals["users_pushed"] += len(out.user_rows)
        self.totals["items_pushed"] += len(out.items)
        for reason, n in dead.items():
            self.totals[f"dead_letter.{reason}"] += n
        consumed: Counter = Counter()
        for topic, _partition, _start, _next, records, *_ in out.progress:
            consumed[topic] += records
        by_topic = Counter((d.source_topic, d.reason) for d in out.dead_letters)
        return BatchReport(batch_id, out.records, len(out.user_rows), len(out.items), dead, out.path, secs,
                           pushed_at, out.arrival_ms, dict(consumed), by_topic)

    def _commit_kafka(self, offsets: dict[TP, int], *, force: bool = False) -> None:
        """Commit pushed offsets to the Kafka group, at most every `kafka_commit_interval_s`
        (and with `force`, on exit). The state store's offsets are what a restart resumes
        from; the group's serve lag monitors, so they may trail by the interval. Each commit
        is a broker write, and the embedded broker rewrites its whole store ~1 s after any
        write (0.7 s of CPU per write at 300k stored records, measured). On 1M stored records
        that is most of its CPU: bench/ingest.py's generated run, back to back, 5 s vs 60 s
        (`--kafka-commit-interval`): broker 101 vs 17 CPU s, 6,314 vs 9,311 events/s; 5 s vs
        30 s (the default since): 89 vs 21 CPU s, 7,293 vs 9,729 events/s."""
        self._to_commit.update(offsets)         # batches are confirmed in order: offsets only grow
        now = time.monotonic()
        if not self._to_commit or (not force and now - self._kafka_committed_at < self.cfg.kafka_commit_interval_s):
            return
        try:
            self._committer.commit({TopicPartition(*tp): OffsetAndMetadata(o, "", -1)
                                    for tp, o in self._to_commit.items()})
            self._to_commit, self._kafka_committed_at = {}, now
            self.totals["kafka_commits"] += 1
        except Exception as e:  # noqa: BLE001 - the state store holds the truth; retried next time
            self.totals["kafka_commit_errors"] += 1
            log.warning("committing offsets to Kafka failed (the state store has them): %s", e)

    # ------------------------------------------------------------------ the loop

    def _waited_out(self, idle_since: float | None, clock: Callable[[], float]) -> bool:
        """With `once`: end offsets still show unread records but nothing became readable
        for well past the arrival grace (end offsets are hints; don't wait forever)."""
        patience = max(5.0, 10 * self.cfg.arrival_grace_ms / 1000)
        return idle_since is not None and clock() - idle_since > patience

    def run(self, *, once: bool = False, max_batches: int | None = None,
            clock: Callable[[], float] = time.monotonic) -> int:
        """Run batches until `stop()`, `max_batches`, or (with `once`) a batch finds nothing
        new; returns when the last batch's push is done."""
        done, idle_since = 0, None
        try:
            while not self._stop and (max_batches is None or done < max_batches):
                full = clock() - self._last_full >= self.cfg.recheck_s
                if full:
                    self._last_full = clock()
                    self.refresh_partitions()
                if self.run_batch(full=full or once):
                    done += 1
                    idle_since = None
                elif once and (not self.planner.lag or self._waited_out(idle_since, clock)):
                    break   # caught up (records younger than the arrival grace are waited for)
                elif once:
                    idle_since = idle_since if idle_since is not None else clock()
                    time.sleep(self.cfg.idle_sleep_s)
                else:
                    self.poll_pushed()
                    if self.learning is not None:
                        self.learning.tick(dict(self.positions))
                    time.sleep(self.cfg.idle_sleep_s)
        finally:
            self.wait_pushed()
            self._commit_kafka({}, force=True)
        return done
