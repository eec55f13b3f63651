"""Online learning inside the micro-batch driver: the FineTune stage, the training log,
publishing, and recovery after a crash.

Per micro-batch (see `streaming.driver` for the feature path it rides on):

1. Beam run: `UpdateUserSequence` emits the changed users' training examples;
   `FineTune` test-then-trains the learner on them (one bundle, see
   `streaming.finetune`) and returns the figures.
2. `StateStore.commit_batch(..., examples=...)`: the examples are written to the
   training log in the same transaction as the features and the offsets.
3. `after_commit`: the figures go to the monitor; if a publish is due
   (`registry.publish.every_steps` / `every_seconds`), the learner's snapshot goes
   through `ops.publish.Publisher` (gate -> registry -> Feast -> notice) with the
   offsets and state-store batch the training covered. An accepted version prunes
   the training log up to that batch.

**Crash safety** (tests/streaming/test_online.py kills real processes):

* The registry only ever holds complete versions (temp dir, fsync, rename, then
  `latest`), so a SIGKILL during a publish leaves the previous version current.
* On start the learner loads `latest` (weights, item table, optimiser moments)
  and re-trains on the training log after that version's `state_batch`: every
  example committed since the last publish is trained on again, in order. Kafka
  offsets can therefore be committed as soon as the features are (the examples
  are durable in the log); they are never committed past an uncommitted batch.
* What a user can rely on: a feature is never applied twice; every event is a
  training example of the model lineage at least once; after a crash, examples of
  the batch in flight and of the log are trained on again by a model that had
  lost them (so a reader never sees a version that skipped data, and a model may
  see an example twice only across a crash: in-memory progress since the last
  publish is lost, not double-counted in any published version). Test-then-train
  figures of re-trained log batches are not recomputed (they were reported).
* Refusals: `loss_not_finite` / `grad_norm_*` mean the in-memory weights are
  poisoned: the learner is reloaded from `latest` and the log up to this batch is
  dropped (those examples are counted as `examples_dropped`). `metric_regressed`
  keeps learning and tries again at the next publish. `parent_moved` (an operator
  rolled back) reloads the learner from the new `latest`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from apache_beam.utils.shared import Shared

from unirec.model.config import ModelConfig, OnlineConfig, TrainConfig
from unirec.ops import gate
from unirec.ops.config import RegistryConfig
from unirec.ops.publish import Publisher, PublishResult
from unirec.ops.registry import Registry
from unirec.streaming.finetune import FineTuneSpec, LearnerSlot, learn, open_learner, shared_slot

log = logging.getLogger(__name__)


@dataclass
class OnlineState:
    batches: int = 0
    published: int = 0
    refused: int = 0
    examples_dropped: int = 0
    replayed_batches: int = 0
    last_stats: dict | None = None


class OnlineLoop:
    """Owns the learner and the publisher for one driver."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, online_cfg: OnlineConfig,
                 registry_cfg: RegistryConfig, *, catalogue: str | None = None, monitor: Any = None,
                 on_stats: Any = None, cache_dir: str = ".cache/unirec"):
        """`catalogue` overrides `online_cfg.catalogue` (an items.jsonl for new items' text);
        `cache_dir` (data.cache_dir) holds the sentence encoder's files, if the model uses it."""
        import torch

        torch.set_num_threads(max(1, train_cfg.threads))
        self.mc, self.tc, self.oc, self.rc = model_cfg, train_cfg, online_cfg, registry_cfg
        self.registry = Registry.from_config(registry_cfg)
        self.handle = Shared()
        catalogue = catalogue if catalogue is not None else online_cfg.catalogue
        if model_cfg.sentence_encoder:    # fetch its files now: a DataError here, not inside a Beam worker
            from unirec.model import sentence

            sentence.fetch(cache_dir, model_cfg.sentence_encoder_path)
        self.spec = FineTuneSpec(self.handle, model_cfg, train_cfg, online_cfg, str(self.registry.root),
                                 catalogue if catalogue and os.path.exists(catalogue) else None, cache_dir)
        self.slot: LearnerSlot | None = None      # strong reference: keeps the shared learner alive
        self.monitor, self.on_stats = monitor, on_stats
        self.state = OnlineState()
        self.history: list[dict] = []              # per batch: watermark + test-then-train figures
        self.versions: list[dict] = []             # per publish attempt
        self.watermark: int | None = None
        self.publisher: Publisher | None = None

    @property
    def learner(self):
        return self.slot.learner

    # ------------------------------------------------------------------ lifecycle
    def open(self, store, *, online_store=None, producer=None, notice_topic: str | None = None) -> None:
        """Load the learner (latest version or fresh), replay the training log, set up publishing."""
        self.store = store
        self.slot = shared_slot(self.spec)
        push = None if online_store is None else online_store.push_item_embeddings
        send = None
        if producer is not None and notice_topic:
            send = lambda key, value: producer.send(notice_topic, key=key, value=value).get(timeout=30)
        self.publisher = Publisher(self.registry, self.rc.publish, push_embeddings=push, send_notice=send)
        self.replay_log()

    def replay_log(self) -> int:
        """Re-train on the training log after the loaded version's batch (after a crash)."""
        n = 0
        for batch, examples in self.store.train_log_after(self.learner.state_batch):
            learn(self.learner, examples, evaluate=False)
            self.learner.state_batch = batch
            n += 1
        if n:
            log.info("re-trained on %d logged batches after %s", n, self.learner.version or "a fresh model")
        self.state.replayed_batches += n
        return n

    def finetune_spec(self, runner: str) -> FineTuneSpec | None:
        """The FineTune stage runs inside the Beam pipeline on the in-process runner only
        (see `streaming.finetune`); elsewhere `after_commit` calls `learn` itself."""
        return self.spec if runner == "FnApiRunner" else None

    # ------------------------------------------------------------------ per batch
    def after_commit(self, batch_id: int, train: list | None, examples: list, positions: dict) -> dict | None:
        """Figures of the batch (learning here if the pipeline did not), then publish if due."""
        learner = self.learner
        if train is None and examples:
            train = [learn(learner, examples)]
        stats = train[0] if train else None
        learner.state_batch = batch_id
        if examples and self.monitor is not None:
            new = [(e, k) for e in examples for k in range(len(e["item_ids"]) - e["n_new"], len(e["item_ids"]))]
            self._notify("on_events", dict(item_ids=[e["item_ids"][k] for e, k in new],
                                           user_ids=[e["user_id"] for e, _ in new],
                                           query_texts=[e["queries"][k] for e, k in new if e["queries"][k]],
                                           watermark=max(e["ts"][-1] for e in examples)))
        if stats:
            self.state.batches += 1
            self.state.last_stats = stats
            if stats.get("watermark") is not None:
                self.watermark = max(self.watermark or 0, int(stats["watermark"]))
            self.history.append({"t": time.time(), "batch": batch_id, "watermark": stats.get("watermark"),
                                 "events": stats.get("events"), "steps": stats.get("steps", 0),
                                 "loss": stats.get("loss")} | (stats.get("eval") or {}))
            self._notify("on_train", stats)
            if self.on_stats is not None:
                self.on_stats(stats)
        figures = learner.publish_figures()
        if gate.due(figures["steps"], figures["seconds"], self.rc.publish):
            self.publish(batch_id, positions, figures)
        return stats

    def tick(self, positions: dict) -> PublishResult | None:
        """Publish if due while no batch arrives (the last steps of a burst must not wait
        for the next event)."""
        figures = self.learner.publish_figures()
        if gate.due(figures["steps"], figures["seconds"], self.rc.publish):
            return self.publish(self.learner.state_batch, positions, figures)
        return None

    def publish(self, batch_id: int, positions: dict, figures: dict | None = None) -> PublishResult:
        learner = self.learner
        figures = figures or learner.publish_figures()
        offsets: dict[str, dict[int, int]] = {}
        for (topic, part), off in positions.items():
            offsets.setdefault(topic, {})[part] = off
        snap = learner.snapshot()
        res = self.publisher.publish(snap, figures, parent=learner.version, watermark=self.watermark,
                                     offsets=offsets, state_batch=batch_id, model_config=self.mc)
        rec = {"t": time.time(), "batch": batch_id, "accepted": res.accepted, "version": res.version,
               "reasons": list(res.reasons), "watermark": self.watermark, "seconds": res.seconds,
               "metrics": figures["metrics"]}
        self.versions.append(rec)
        prev = self.publisher.previous
        if res.accepted:
            self.state.published += 1
            learner.version = res.version
            self.store.prune_train_log(batch_id)
            self.publisher.remember(snap)
        else:
            self.state.refused += 1
            if set(res.reasons) & {"loss_not_finite", "grad_norm_not_finite", "grad_norm_exploding"}:
                self.reload(drop_upto=batch_id)
            elif "parent_moved" in res.reasons:
                self.reload(drop_upto=None)
        learner.published()
        self._notify("on_publish", {
            "version": res.version, "accepted": res.accepted, "reason": ",".join(res.reasons),
            "metrics": figures["metrics"], "watermark": self.watermark, "item_ids": snap["item_ids"],
            "item_embeddings": snap["item_embeddings"], "prev_item_ids": prev[0] if prev else None,
            "prev_item_embeddings": prev[1] if prev else None})
        return res

    def reload(self, *, drop_upto: int | None) -> None:
        """Replace the learner with the registry's latest version (or a fresh model)."""
        new = open_learner(self.spec)
        if drop_upto is not None:
            dropped = sum(len(ex) for b, ex in self.store.train_log_after(new.state_batch) if b <= drop_upto)
            self.store.prune_train_log(drop_upto)
            self.state.examples_dropped += dropped
            log.error("learner reloaded from %s after a poisoned update; %d logged examples dropped",
                      new.version, dropped)
        new.state_batch = max(new.state_batch, drop_upto or 0)
        self.slot.learner = new

    def _notify(self, method: str, payload: dict) -> None:
        fn = getattr(self.monitor, method, None) if self.monitor is not None else None
        if fn is None:
            return
        try:
            fn(**payload) if method == "on_events" else fn(payload)
        except Exception as e:  # noqa: BLE001 - monitoring never stops learning
            log.warning("monitor.%s failed: %s", method, e)

    def summary(self) -> dict:
        return {"batches": self.state.batches, "versions_published": self.state.published,
                "publishes_refused": self.state.refused, "replayed_log_batches": self.state.replayed_batches,
                "examples_dropped": self.state.examples_dropped, "latest": self.learner.version,
                "learner": dict(self.learner.totals), "items_live": len(self.learner.table),
                "items_expired": self.learner.table.expired, "table_rows": self.learner.table.n_rows}


def from_config(cfg, *, monitor: Any = None, catalogue: str | None = None) -> OnlineLoop:
    """The online loop of a PipelineConfig (its model, train, online and registry sections;
    data.cache_dir for the sentence encoder's files)."""
    return OnlineLoop(cfg.model, cfg.train, cfg.online, cfg.registry, catalogue=catalogue, monitor=monitor,
                      cache_dir=cfg.data.cache_dir)
