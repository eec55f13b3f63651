"""Id maps: string item ids <-> model rows, and each item's hashed text pieces.

Row 0 of the item table is reserved: it is the padding row and the row of any
item id the vocabulary has not seen ("unknown"). It is never a retrieval
candidate. Item text = title + genres, hashed with `unirec.model.text.hash_pieces`
(the same function the queries go through, so query and item pieces land in
the same buckets of the shared word-piece table).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from unirec.model.text import hash_pieces

UNKNOWN = 0


def item_text(item: dict) -> str:
    """The text an item is known by: its title and its genres."""
    return " ".join([str(item.get("title", ""))] + [str(g) for g in item.get("genres", ())])


class _IdMap:
    """The read interface shared by `Vocab` and `ItemTable`: `item_ids[r - 1]` <-> row r."""

    item_ids: list
    index: dict[str, int]

    @property
    def n_rows(self) -> int:
        return len(self.item_ids) + 1

    def row(self, item_id: str) -> int:
        return self.index.get(str(item_id), UNKNOWN)

    def rows(self, item_ids) -> np.ndarray:
        return np.array([self.row(i) for i in item_ids], dtype=np.int64)

    def item_id(self, row: int) -> str | None:
        return self.item_ids[row - 1] if 1 <= row <= len(self.item_ids) else None


@dataclass
class Vocab(_IdMap):
    """Item id map plus the padded (n_rows, max_pieces) piece matrix of item texts (and,
    with `model.sentence_encoder`, the (n_rows, 384) frozen sentence vectors of those texts)."""

    item_ids: list[str]                      # row r (r >= 1) <-> item_ids[r - 1]
    pieces: torch.Tensor                     # (n_rows, P) int64, 0 = padding
    sentence: torch.Tensor | None = None     # (n_rows, 384) float32, row 0 and text-less items all 0
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {iid: r + 1 for r, iid in enumerate(self.item_ids)}

    @classmethod
    def build(cls, items: dict[str, dict], *, n_buckets: int, ngram: int, max_pieces: int,
              encode: Callable[[list[str]], np.ndarray] | None = None) -> "Vocab":
        """Rows in sorted-id order (numeric ids sort numerically) so a vocab is reproducible.
        `encode` (texts -> (n, dim) vectors, e.g. `model.sentence.encode_cached`) adds `sentence`."""
        ids = sorted(items, key=lambda s: (len(s), s))
        texts = [item_text(items[i]) for i in ids]
        hashed = [hash_pieces(t, n_buckets, ngram=ngram, max_pieces=max_pieces) for t in texts]
        pieces = torch.zeros(len(ids) + 1, max(1, max((len(t) for t in hashed), default=1)), dtype=torch.int64)
        for r, t in enumerate(hashed, start=1):
            pieces[r, : len(t)] = torch.tensor(t, dtype=torch.int64)
        sentence = None
        if encode is not None:
            has_text = [j for j, t in enumerate(texts) if t.strip()]
            vectors = encode([texts[j] for j in has_text])
            sentence = torch.zeros(len(ids) + 1, vectors.shape[1])
            sentence[torch.tensor(has_text, dtype=torch.int64) + 1] = torch.from_numpy(vectors)
        return cls(ids, pieces, sentence)

    def state_dict(self) -> dict:
        out = {"item_ids": list(self.item_ids), "pieces": self.pieces}
        return out if self.sentence is None else out | {"sentence": self.sentence}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        return cls(list(state["item_ids"]), state["pieces"], state.get("sentence"))


class ItemTable(_IdMap):
    """A growing, expiring item id map for online learning (Monolith's idea, done with
    a free list instead of a collisionless hash table: same effect at this size).

    * A new item id gets a row on first sight (`assign`), no restart: a free row if
      there is one (rows freed by `expire` are reused, lowest first), else the table
      doubles (the caller grows the model's embedding to match).
    * `expire(now)` (the learner calls it once per micro-batch, before assigning, so it
      can forget buffered windows that hold the freed rows) frees the rows of items whose last event is older than
      `now - expire_after_s` (0 = never): they stop being retrieval candidates at
      once and their rows are reused by the next new items. Expiry is by *event*
      time, so replaying old data expires as the live stream would.
    * Row 0 stays reserved (padding / unknown). `item_ids[r - 1]` is None for a free row.
    Counters: `added`, `expired`, `grown` (since construction; the learner reports deltas).
    The same read interface as `Vocab` (`row`, `rows`, `item_id`, `n_rows`, `pieces`,
    `sentence` when `sentence_dim` is given), plus `live` (bool per row) and `last_seen`
    (event time per row). `sentence_of(item_id)`: the item text's frozen sentence vector
    (`model.sentence`), or None when there is no text (the row stays 0; without
    `sentence_of`, every new row does).
    """

    def __init__(self, capacity: int, max_pieces: int, *, expire_after_s: float = 0.0,
                 pieces_of: Callable[[str], list[int]] | None = None,
                 sentence_dim: int = 0, sentence_of: Callable[[str], np.ndarray | None] | None = None):
        self.max_pieces, self.expire_after_s = max_pieces, expire_after_s
        self.pieces_of = pieces_of or (lambda item_id: [])
        self.sentence_of = sentence_of or (lambda item_id: None)
        self.item_ids: list[str | None] = []
        self.index: dict[str, int] = {}
        self.pieces = torch.zeros(1, max_pieces, dtype=torch.int64)
        self.sentence = torch.zeros(1, sentence_dim) if sentence_dim else None
        self.last_seen = np.zeros(1, dtype=np.int64)
        self.free: list[int] = []
        self.added = self.expired = self.grown = 0
        self.changed = True               # rows added / freed since the model last refreshed
        self._resize(max(2, capacity))

    @property
    def live(self) -> np.ndarray:
        live = np.zeros(self.n_rows, dtype=bool)
        live[self._live_rows()] = True
        return live

    def _live_rows(self) -> np.ndarray:
        return np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    # -- growth and expiry
    def _resize(self, n_rows: int) -> None:
        old = self.n_rows
        self.item_ids.extend([None] * (n_rows - old))
        pieces = torch.zeros(n_rows, self.max_pieces, dtype=torch.int64)
        pieces[: self.pieces.shape[0]] = self.pieces
        self.pieces = pieces
        if self.sentence is not None:
            sentence = torch.zeros(n_rows, self.sentence.shape[1])
            sentence[: self.sentence.shape[0]] = self.sentence
            self.sentence = sentence
        self.last_seen = np.concatenate([self.last_seen, np.zeros(n_rows - len(self.last_seen), np.int64)])
        self.free = sorted(set(self.free) | set(range(old, n_rows)), reverse=True)  # pop() = lowest row

    def assign(self, item_ids, ts) -> tuple[np.ndarray, list[int]]:
        """Rows for `item_ids` seen at event times `ts`, allocating rows for new ids;
        returns (rows, newly assigned rows) - the caller re-initialises the new rows."""
        index = self.index
        get = index.get                            # a non-str id misses here and is looked up as str below
        rows = np.array([get(i, 0) for i in item_ids], dtype=np.int64)
        new = []
        for k in np.flatnonzero(rows == 0):        # only unknown ids pay for the slow path
            iid = str(item_ids[k])
            r = index.get(iid)                     # the same new id twice in one call
            if r is None:
                r = self._allocate(int(ts[k]))
                index[iid], self.item_ids[r - 1] = r, iid
                p = self.pieces_of(iid)[: self.max_pieces]
                row = self.pieces.numpy()[r]           # the tensor's memory (numpy writes: ~10x cheaper)
                row[:] = 0
                row[: len(p)] = p
                if self.sentence is not None:
                    vec = self.sentence_of(iid)
                    self.sentence[r] = 0.0 if vec is None else torch.as_tensor(vec)
                self.added += 1
                self.changed = True
                new.append(r)
            rows[k] = r
        if len(rows):
            np.maximum.at(self.last_seen, rows, np.asarray(ts, dtype=np.int64))
        return rows, new

    def _allocate(self, now: int) -> int:
        if not self.free:
            self.grown += 1
            self._resize(2 * self.n_rows - 1)
        return self.free.pop()

    def expire(self, now: int) -> list[int]:
        """Free the rows of items unseen since `now - expire_after_s`; returns the rows."""
        if self.expire_after_s <= 0 or not self.index:
            return []
        cutoff = now - self.expire_after_s
        rows = self._live_rows()
        stale = rows[self.last_seen[rows] < cutoff].tolist()
        for r in stale:
            del self.index[self.item_ids[r - 1]]
            self.item_ids[r - 1] = None
            self.pieces[r] = 0
            if self.sentence is not None:
                self.sentence[r] = 0.0
        if stale:
            self.free = sorted(set(self.free) | set(stale), reverse=True)
            self.expired += len(stale)
            self.changed = True
        return stale

    # -- persistence (plain arrays: safetensors-friendly)
    def arrays(self) -> dict[str, np.ndarray]:
        live = sorted(self.index.values())
        return {"rows": np.array(live, dtype=np.int64), "last_seen": self.last_seen[live].copy(),
                "capacity": np.array([self.n_rows], dtype=np.int64),
                "counters": np.array([self.added, self.expired, self.grown], dtype=np.int64)}

    def live_ids(self) -> list[str]:
        """Ids of the live rows in row order (aligned with `arrays()["rows"]`)."""
        return [self.item_ids[r - 1] for r in sorted(self.index.values())]

    @classmethod
    def restore(cls, ids: list[str], arrays: dict[str, np.ndarray], pieces: torch.Tensor, max_pieces: int, *,
                expire_after_s: float = 0.0, pieces_of=None, sentence: torch.Tensor | None = None,
                sentence_of=None) -> "ItemTable":
        """The table a snapshot saved; `sentence` (the saved (rows, dim) vectors) with
        `sentence_of` (for items added from here on) when the model uses them."""
        t = cls(int(arrays["capacity"][0]), max_pieces, expire_after_s=expire_after_s, pieces_of=pieces_of,
                sentence_dim=0 if sentence is None else sentence.shape[1], sentence_of=sentence_of)
        rows = [int(r) for r in arrays["rows"]]
        for iid, r, seen in zip(ids, rows, arrays["last_seen"]):
            t.index[iid], t.item_ids[r - 1], t.last_seen[r] = r, iid, int(seen)
        n = min(t.n_rows, pieces.shape[0])
        t.pieces[:n, : min(max_pieces, pieces.shape[1])] = pieces[:n, :max_pieces]
        if sentence is not None:
            t.sentence[: min(t.n_rows, sentence.shape[0])] = sentence[: t.n_rows]
        t.free = sorted(set(range(1, t.n_rows)) - set(rows), reverse=True)
        t.added, t.expired, t.grown = (int(x) for x in arrays.get("counters", np.zeros(3, np.int64)))
        return t


def live_mask(vocab) -> torch.Tensor:
    """(N_rows,) True for rows that hold an item (a growing table also has free rows);
    row 0 (padding / unknown) is never live."""
    live = getattr(vocab, "live", None)
    if live is None:
        live = torch.ones(vocab.n_rows, dtype=torch.bool)
    live = torch.as_tensor(live, dtype=torch.bool).clone()
    live[0] = False
    return live
