"""The FineTune stage: user sequences changed by a micro-batch -> test-then-train on the model.

    UpdateUserSequence --"examples"--> GatherExamples (one list per batch) --> FineTune --"train"--> stats

* **Examples.** `new_tail(old, new)` counts the events at the end of a user's new
  sequence that this batch brought (events arrive in time order almost always and
  are appended; a late event inserted further back makes every event after it
  count as new, so it is trained on in its true position). A user whose new clicks do
  not all fit the stored sequence (`features.max_sequence_length`: a burst longer than
  it, or a late click older than all it keeps) gets an example merged without the cap,
  so that no new click goes unscored and untrained (`transforms.update_users`; on
  ML-100k replayed in 2,000-click batches that was 9% of the last 30%'s clicks, from 37
  users). `example_of` turns the
  state into a `model.online.Example` of plain columns (JSON-able: the driver also
  writes the batch's examples into the state store's training log, see
  `features.state`).
* **One learner per pipeline, shared across runs.** The learner (model, optimiser,
  replay buffer) must live across micro-batches, and each micro-batch is a new Beam
  run. `FineTune` gets it through Beam's `apache_beam.utils.shared.Shared` handle
  (as RunInference shares a model): the driver acquires the handle once with its
  learner and keeps a strong reference, so every run's `FineTune.setup` in this
  process gets that same object. A worker process that has no learner yet builds one
  from the registry's latest version (`open_learner`), which is what a remote
  worker would do; the driver only routes the stage through Beam on the in-process
  FnApiRunner, where the learner it publishes from is the one that trained. On
  other runners (Dask) the driver calls the same `learn` function on the batch's
  examples right after the Beam run: workers there are separate processes and the
  optimiser state must not fork.
* **Beam's state sampler.** Every bundle's sampling thread (the msec counters) sleeps
  up to 200 ms between samples, and the bundle's end waits for it to wake: the
  FineTune bundle, seconds long, ended ~0.1 s (up to 0.2 s) after its last step,
  idle. `beam_tuning.short_state_sampling` makes the period 20 ms for this process's
  bundles (Beam has no option for it), when the DoFn is built and on a worker's `setup`.
* **One bundle.** `GatherExamples` combines the examples of all key groups into
  one element, so the learner sees the whole micro-batch at once (every new event
  is scored before any step trains on it or on a later event of its user, see
  model/online.py), and one training step sees users of every key group.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from unirec.features.sequence import UserSequence
from unirec.model.online import Example, OnlineLearner
from unirec.streaming.beam_tuning import tune

log = logging.getLogger(__name__)
NAMESPACE = "unirec"


def new_tail(old: UserSequence | None, new: UserSequence, n_applied: int) -> int:
    """How many events at the end of `new`'s clicks hold every click this batch added
    (`n_applied` of them; old rows are matched from the end, the rest are new)."""
    if n_applied <= 0 or not len(new):
        return 0
    if old is None or not len(old):
        return min(n_applied, len(new))
    rows = lambda s: list(zip(s.ts, s.item_ids, s.labels, s.click_query_ids))
    o, n = rows(old), rows(new)
    keep = len(n) - n_applied                      # the common case: appended after the old rows
    if 0 < keep <= len(o) and n[:keep] == o[len(o) - keep:]:
        return n_applied
    j, first_new, found = len(o) - 1, len(n), 0
    for i in range(len(n) - 1, -1, -1):
        if j >= 0 and n[i] == o[j]:
            j -= 1
            continue
        first_new, found = i, found + 1
        if found == n_applied:
            break
    return len(n) - first_new


def example_of(state: UserSequence, n_new: int) -> dict:
    """The user's sequence as a JSON-able `Example` dict (the last `n_new` events are new)."""
    return Example(state.user_id, list(state.item_ids), list(state.labels), list(state.ts), list(state.surfaces),
                   [state.query_text_of(i) for i in range(len(state))], int(n_new)).to_dict()


def learn(learner: OnlineLearner, example_dicts: Sequence[dict], *, evaluate: bool | None = None) -> dict:
    """Test-then-train one batch's examples; returns the learner's figures."""
    return learner.process([Example.from_dict(d) for d in example_dicts], evaluate=evaluate)


@dataclass(frozen=True)
class FineTuneSpec:
    """What the FineTune DoFn needs (picklable): the shared handle and how to build a
    learner where none exists (a worker process)."""

    handle: Shared
    model: Any                          # ModelConfig
    train: Any                          # TrainConfig
    online: Any                         # OnlineConfig
    registry_path: str
    catalogue: str | None = None        # items.jsonl with titles / genres (item text pieces)
    cache_dir: str = ".cache/unirec"    # the sentence encoder's files and vectors (`model.sentence_encoder`)


def _catalogue(catalogue: str | None) -> dict[str, dict]:
    """The items of an items.jsonl catalogue (none if it is not given or unreadable)."""
    if not catalogue:
        return {}
    from unirec.data import load_items

    try:
        return load_items(catalogue)
    except OSError as e:
        log.warning("item catalogue %s unreadable (%s): new items start without text", catalogue, e)
        return {}


def pieces_lookup(catalogue: str | None, mc) -> Any:
    """item id -> hashed title/genre pieces from an items.jsonl catalogue (empty if unknown).
    Every item's text is hashed here, once, while the catalogue is read (setup), not when
    the item first shows up in a micro-batch (hashing is ~0.2 ms of Python per item)."""
    items = _catalogue(catalogue)
    if not items:
        return None
    from unirec.model.text import hash_pieces
    from unirec.model.vocab import item_text

    pieces = {i: hash_pieces(item_text(it), mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_item_pieces)
              for i, it in items.items()}
    return lambda item_id: pieces.get(item_id, [])


def sentence_lookup(catalogue: str | None, mc, cache_dir: str) -> Any:
    """item id -> the frozen MiniLM vector of its catalogue text (None if unknown), with
    `model.sentence_encoder`: the whole catalogue is encoded at setup (once per catalogue
    and model: cached on disk, `model.sentence.encode_cached`); None without the option."""
    if not mc.sentence_encoder:
        return None
    from unirec.model import sentence
    from unirec.model.vocab import item_text

    encoder = sentence.query_vectors(mc, cache_dir).encoder     # the one the queries use
    texts = {i: t for i, it in _catalogue(catalogue).items() if (t := item_text(it)).strip()}
    ids = sorted(texts)
    vectors = sentence.encode_cached(encoder, [texts[i] for i in ids], cache_dir) if ids else None
    rows = {i: k for k, i in enumerate(ids)}
    return lambda item_id: None if item_id not in rows else vectors[rows[item_id]]


def open_learner(spec: FineTuneSpec) -> OnlineLearner:
    """The registry's latest version as a learner (model, item table, optimiser), else a fresh one."""
    from unirec.ops.registry import Registry, RegistryError

    from unirec.model.sentence import query_vectors

    pieces_of = pieces_lookup(spec.catalogue, spec.model)
    sentence_of = sentence_lookup(spec.catalogue, spec.model, spec.cache_dir)
    qv = query_vectors(spec.model, spec.cache_dir)
    try:
        reg = Registry(spec.registry_path)
        if reg.latest() is not None:
            v = reg.load()
            learner = OnlineLearner.from_arrays(spec.model, spec.train, spec.online, item_ids=v.item_ids,
                                                weights=v.ranking, table_arrays=v.extra["idtable"],
                                                trainer_arrays=v.extra.get("trainer"), pieces_of=pieces_of,
                                                sentence_of=sentence_of, query_vectors=qv)
            learner.version = v.manifest.version
            learner.state_batch = int(v.manifest.metrics.get("state_batch") or 0)
            return learner
    except (RegistryError, KeyError) as e:
        log.warning("cannot resume from the registry at %s (%s): starting a fresh model", spec.registry_path, e)
    learner = OnlineLearner.fresh(spec.model, spec.train, spec.online, pieces_of=pieces_of,
                                  sentence_of=sentence_of, query_vectors=qv)
    learner.version, learner.state_batch = None, 0
    return learner


class LearnerSlot:
    """What the Shared handle holds: the current learner, swapped (never mutated in
    place) when the pipeline reloads it from the registry."""

    def __init__(self, learner: OnlineLearner):
        self.learner = learner


def shared_slot(spec: FineTuneSpec) -> LearnerSlot:
    """This process's learner slot (built from the registry if the process has none)."""
    return spec.handle.acquire(lambda: LearnerSlot(open_learner(spec)))


class FineTune(beam.DoFn):
    """[[example dict], ...] (the whole batch) -> one dict of test-then-train figures and losses."""

    def __init__(self, spec: FineTuneSpec):
        self.spec = spec
        tune()

    def setup(self):
        tune()
        self.slot = shared_slot(self.spec)

    def process(self, lists):
        examples = [d for chunk in lists for d in chunk]
        if not examples:
            return
        stats = learn(self.slot.learner, examples)
        Metrics.counter(NAMESPACE, "finetune_steps").inc(stats.get("steps", 0))
        Metrics.counter(NAMESPACE, "finetune_sequences").inc(stats.get("sequences", 0))
        yield stats
