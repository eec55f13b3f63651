"""Publishing a fine-tuned model: gate -> registry -> Feast `item_embedding` -> `model-updates` notice.

`Publisher.publish(snapshot, figures, ...)` is called by the pipeline when a publish
is due (`gate.due`: every N steps or T seconds). In order:

1. **Gate** (`gate.check`): refuse on a non-finite loss, a non-finite or exploding
   gradient norm (the largest since the last publish), or a test-then-train
   NDCG@10 more than the margin below the current version's. A refusal is
   returned (and counted by the caller); nothing is written.
2. **Registry** (`registry.publish`): the version is written to a temporary
   directory, fsynced, renamed, and only then does `latest` move. The manifest
   records the data watermark, the Kafka offsets the training covered, the
   state-store batch it covers (`metrics.state_batch`, where a restart resumes the
   training log), the figures and the config hash. Publishing is a compare-and-swap
   on the parent: if an operator rolled `latest` back meanwhile, `ParentMismatch`
   is reported as `parent_moved` and the caller reloads the learner from `latest`.
3. **Feast**: the live items' vectors go to the `item_embedding` view with the
   version name. This happens after the registry commit, so a version seen online
   always exists; a crash in between leaves the online vectors one version behind
   until the next publish (counted, never half-written per item).
4. **Notice** on the `model-updates` topic: a small JSON record
   (`model-update/v1`: version, parent, created_at, watermark, offsets, metrics,
   registry path) for servers that prefer a push to polling `latest`. Sent after the
   registry commit; best effort (a failure is logged and counted, the version stands).

Steps 3 and 4 never undo step 2: the registry is the source of truth.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unirec.ops import gate
from unirec.ops.config import PublishConfig
from unirec.ops.registry import LATEST, Manifest, ParentMismatch, Registry

log = logging.getLogger(__name__)
NOTICE_SCHEMA = "model-update/v1"


@dataclass
class PublishResult:
    accepted: bool
    version: str | None = None
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    manifest: Manifest | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)   # Feast / notice failures (the version stands)


def notice(m: Manifest, registry_root: str) -> bytes:
    """The `model-update/v1` record for a published version."""
    return json.dumps({"schema": NOTICE_SCHEMA, "version": m.version, "parent": m.parent,
                       "created_at": m.created_at, "watermark": m.watermark,
                       "offsets": {t: {str(p): o for p, o in ps.items()} for t, ps in m.offsets.items()},
                       "metrics": m.metrics, "config_hash": m.config_hash, "registry": registry_root},
                      sort_keys=True, allow_nan=False).encode()


class Publisher:
    """Gate and publish snapshots of one learner; keeps the previous version's vectors
    for drift (`previous`)."""

    def __init__(self, registry: Registry, cfg: PublishConfig, *,
                 push_embeddings: Callable[[list, np.ndarray, str, int], Any] | None = None,
                 send_notice: Callable[[bytes, bytes], Any] | None = None):
        self.registry, self.cfg = registry, cfg
        self.push_embeddings, self.send_notice = push_embeddings, send_notice
        self.previous: tuple[list[str], np.ndarray] | None = None
        self.counts = {"published": 0, "refused": 0, "feast_errors": 0, "notice_errors": 0}

    def current_metrics(self) -> Mapping[str, Any] | None:
        return None if self.registry.latest() is None else self.registry.show(LATEST).metrics

    def publish(self, snapshot: dict, figures: dict, *, parent: str | None, watermark: int | None,
                offsets: Mapping[str, Mapping[int, int]], state_batch: int, model_config: Any) -> PublishResult:
        """Gate the candidate (figures from `OnlineLearner.publish_figures`), then publish."""
        t0 = time.perf_counter()
        decision = gate.check(figures["metrics"], self.current_metrics(), figures["grad_norm"], figures["loss"],
                              self.cfg)
        if not decision.ok:
            self.counts["refused"] += 1
            log.warning("publish %s", decision)
            return PublishResult(False, None, decision.reasons, decision.details,
                                 seconds={"gate": time.perf_counter() - t0})
        metrics = dict(figures["metrics"]) | {"state_batch": int(state_batch), "loss": figures["loss"],
                                              "grad_norm": figures["grad_norm"]}
        try:
            m = self.registry.publish(item_embeddings=snapshot["item_embeddings"], item_ids=snapshot["item_ids"],
                                      ranking=snapshot["ranking"], watermark=watermark, offsets=offsets,
                                      metrics=metrics, model_config=model_config, parent=parent,
                                      extra=snapshot.get("extra"))
        except ParentMismatch as e:
            self.counts["refused"] += 1
            log.warning("publish refused: %s", e)
            return PublishResult(False, None, ("parent_moved",), (str(e),), seconds={"gate": time.perf_counter() - t0})
        secs = {"registry": time.perf_counter() - t0}
        self.counts["published"] += 1
        res = PublishResult(True, m.version, manifest=m, seconds=secs)
        t = time.perf_counter()
        if self.push_embeddings is not None:
            try:
                self.push_embeddings(snapshot["item_ids"], snapshot["item_embeddings"], m.version, int(time.time()))
            except Exception as e:  # noqa: BLE001 - the registry holds the version; Feast catches up next time
                self.counts["feast_errors"] += 1
                res.errors.append(f"feast: {e}")
                log.warning("pushing %s's item embeddings to Feast failed: %s", m.version, e)
        secs["feast"], t = time.perf_counter() - t, time.perf_counter()
        if self.send_notice is not None:
            try:
                self.send_notice(m.version.encode(), notice(m, str(self.registry.root)))
            except Exception as e:  # noqa: BLE001 - best effort, see module doc
                self.counts["notice_errors"] += 1
                res.errors.append(f"notice: {e}")
                log.warning("model-updates notice for %s failed: %s", m.version, e)
        secs["notice"] = time.perf_counter() - t
        return res

    def remember(self, snapshot: dict) -> tuple[list[str], np.ndarray] | None:
        """Keep this snapshot's vectors as the previous version's; returns the one before."""
        before, self.previous = self.previous, (list(snapshot["item_ids"]), snapshot["item_embeddings"])
        return before
