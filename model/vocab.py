"""Id maps: string item ids <-> model rows, and each item's hashed text pieces.

Row 0 of the item table is reserved: it is the padding row and the row of any
item id the vocabulary has not seen ("unknown"). It is never a retrieval
candidate. Item text = title + genres, hashed with `unirec.model.text.hash_pieces`
(the same function the queries go through, so query and item pieces land in
the same buckets of the shared word-piece table).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unirec.model.text import hash_pieces

UNKNOWN = 0


def item_text(item: dict) -> str:
    """The text an item is known by: its title and its genres."""
    return " ".join([str(item.get("title", ""))] + [str(g) for g in item.get("genres", ())])


@dataclass
class Vocab:
    """Item id map plus the padded (n_rows, max_pieces) piece matrix of item texts."""

    item_ids: list[str]                      # row r (r >= 1) <-> item_ids[r - 1]
    pieces: torch.Tensor                     # (n_rows, P) int64, 0 = padding
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {iid: r + 1 for r, iid in enumerate(self.item_ids)}

    @property
    def n_rows(self) -> int:
        return len(self.item_ids) + 1

    def row(self, item_id: str) -> int:
        return self.index.get(str(item_id), UNKNOWN)

    def rows(self, item_ids) -> np.ndarray:
        return np.array([self.row(i) for i in item_ids], dtype=np.int64)

    def item_id(self, row: int) -> str | None:
        return self.item_ids[row - 1] if 1 <= row <= len(self.item_ids) else None

    @classmethod
    def build(cls, items: dict[str, dict], *, n_buckets: int, ngram: int, max_pieces: int) -> "Vocab":
        """Rows in sorted-id order (numeric ids sort numerically) so a vocab is reproducible."""
        ids = sorted(items, key=lambda s: (len(s), s))
        texts = [hash_pieces(item_text(items[i]), n_buckets, ngram=ngram, max_pieces=max_pieces) for i in ids]
        pieces = torch.zeros(len(ids) + 1, max(1, max((len(t) for t in texts), default=1)), dtype=torch.int64)
        for r, t in enumerate(texts, start=1):
            pieces[r, : len(t)] = torch.tensor(t, dtype=torch.int64)
        return cls(ids, pieces)

    def state_dict(self) -> dict:
        return {"item_ids": list(self.item_ids), "pieces": self.pieces}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        return cls(list(state["item_ids"]), state["pieces"])
