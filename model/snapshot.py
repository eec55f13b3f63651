"""A published model version as a ready-to-use model: for serving and for resuming learning.

A version (see `unirec.ops.registry`) holds the retrieval-side item vectors of the
live items with their ids, the model weights as a flat tensor dict ("ranking":
trunk, heads, embedding tables, plus `item_pieces`), and the item table
(`idtable`: row of each live id, last-seen time, capacity). `model_from_arrays`
turns those arrays back into a `UnifiedRecommender` whose rows match the
table, so the published item vectors and `model.item_embeddings()` agree row for
row. `load_snapshot` takes any object with a `load(version)` method returning such
arrays (the registry: checksums verified, safetensors only); this module imports
neither the registry nor anything beyond torch and numpy.

Older versions: loading is strict (a missing or unexpected weight is an error)
except for exactly these, each logged when it happens:
* `repeat_logit` missing (saved before the learned repeat logit existed): it
  starts at 0, as a new model's does - no offset on items of the context
  window, which is how such a version was trained and served;
* `feedback_tokens` missing from the manifest's model config (saved before the
  one-token-per-event layout): such a version was trained with a feedback
  token after each item, so it is read with `feedback_tokens=True`.

Refused with a clear error: a version with queries but without the late-fusion
weights (`query_fuse.*`, `start_state`) was trained with a query token before
each search click (the layout before late fusion, see `model/batching.py`);
its search state came out of a token this code no longer builds, so there is
nothing faithful to serve or resume - retrain it (`unirec train --offline`).
Versions built without queries (`use_queries: false`) load as before.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unirec.model.batching import REC, SEARCH, History
from unirec.model.config import ModelConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.text import hash_pieces
from unirec.model.vocab import ItemTable

log = logging.getLogger(__name__)
# weights a version may lack (added later; initialised as a new model's)
OPTIONAL_WEIGHTS = ("repeat_logit", "semantic_scale")


def model_config_from(d: dict) -> ModelConfig:
    """ModelConfig from a manifest's dict (keys this code does not know are ignored)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    if "feedback_tokens" not in kw:
        log.info("model config without feedback_tokens (saved before the one-token-per-event layout): "
                 "reading it with feedback_tokens=True")
        kw["feedback_tokens"] = True
    return ModelConfig(**kw)


def load_weights(model: UnifiedRecommender, weights: dict) -> None:
    """Strict `load_state_dict`, except that a weight in OPTIONAL_WEIGHTS may be missing
    (it keeps the value the model was built with, and a log line says so)."""
    if model.cfg.use_queries and "query_fuse.0.weight" not in weights:
        raise ValueError("this version was trained with query tokens in the sequence (the layout before "
                         "late fusion of queries) and has no query_fuse weights; this code cannot read its "
                         "search state: retrain it (`unirec train --offline`)")
    state = model.state_dict()
    missing = [k for k in OPTIONAL_WEIGHTS if k in state and k not in weights]
    if missing:
        log.info("version has no %s (saved before it existed): initialised as a new model's",
                 ", ".join(missing))
        weights = dict(weights) | {k: state[k] for k in missing}
    model.load_state_dict(weights)


def model_from_arrays(mc: ModelConfig, item_ids: list[str], weights: dict, table_arrays: dict, *,
                      expire_after_s: float = 0.0, pieces_of: Callable[[str], list[int]] | None = None,
                      sentence_of: Callable[[str], np.ndarray | None] | None = None
                      ) -> tuple[UnifiedRecommender, ItemTable]:
    """(model, item table) from a version's weights and id table arrays (`item_sentence`:
    the items' frozen sentence vectors, in versions trained with `sentence_encoder`)."""
    weights = {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}
    if mc.sentence_encoder and "item_sentence" not in weights:
        raise ValueError("the model config has sentence_encoder on, but this version holds no item_sentence "
                         "vectors")
    table = ItemTable.restore(list(item_ids), table_arrays, weights["item_pieces"], mc.max_item_pieces,
                              expire_after_s=expire_after_s, pieces_of=pieces_of,
                              sentence=weights.get("item_sentence") if mc.sentence_encoder else None,
                              sentence_of=sentence_of)
    model = UnifiedRecommender(mc, table)
    model.resize_items(table.n_rows)
    load_weights(model, {k: v for k, v in weights.items() if k not in ("item_pieces", "item_sentence")})
    model.refresh_items()
    table.changed = False
    return model, table


@dataclass
class Snapshot:
    model: UnifiedRecommender           # eval mode
    table: ItemTable                    # item id <-> row
    version: str
    manifest: Any                       # the registry's Manifest
    item_embeddings: np.ndarray         # (n_live, d) published retrieval vectors, rows of `item_ids`
    item_ids: list[str]

    def history(self, item_ids: Sequence[str], labels: Sequence[int], ts: Sequence[int],
                surfaces: Sequence[str], query_texts: Sequence[str | None]) -> History:
        return history_from_columns(item_ids, labels, ts, surfaces, query_texts, self.table, self.model.cfg)


def load_snapshot(registry, version: str = "latest") -> Snapshot:
    """Load and verify a version (registry.load) and build its model, in eval mode."""
    v = registry.load(version)
    mc = model_config_from(v.manifest.model_config)
    model, table = model_from_arrays(mc, v.item_ids, v.ranking, v.extra["idtable"])
    model.eval()
    return Snapshot(model, table, v.manifest.version, v.manifest, v.item_embeddings, list(v.item_ids))


@functools.lru_cache(maxsize=65536)
def _query_pieces(text: str, n_buckets: int, ngram: int, max_pieces: int) -> tuple[int, ...]:
    # a user's queries come back with every later event of theirs: hash each text once
    return tuple(hash_pieces(text, n_buckets, ngram=ngram, max_pieces=max_pieces))


def history_from_columns(item_ids: Sequence[str], labels: Sequence[int], ts: Sequence[int],
                         surfaces: Sequence[str], query_texts: Sequence[str | None], table, mc: ModelConfig,
                         rows: np.ndarray | None = None, query_vectors=None) -> History:
    """A model History from plain columns (e.g. a Feast user sequence); items the table
    does not know map to row 0 (unknown) - reading never allocates rows. `rows`: the
    items' rows if the caller has them (`ItemTable.assign`). `query_vectors` (texts ->
    sentence vectors, `model.sentence.QueryVectors`): the search queries' vectors too."""
    texts = [q if s == "search" else None for q, s in zip(query_texts, surfaces)]
    queries = [None if q is None else (list(_query_pieces(q, mc.n_buckets, mc.ngram, mc.max_query_pieces)) or None)
               for q in texts]
    rows = table.rows(item_ids) if rows is None else rows
    return History(rows, np.asarray(labels, dtype=np.int64), np.asarray(ts, dtype=np.int64),
                   np.array([SEARCH if s == "search" else REC for s in surfaces], dtype=np.int64), queries,
                   None if query_vectors is None else query_vectors(texts))
