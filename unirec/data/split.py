"""RecBole's sequential evaluation protocol over the prepared event stream.

RecBole 1.2.1 with `eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}`:

* per user, clicks in time order, a *stable* sort on the timestamp (ties keep
  file order; `events.jsonl` is already in that order, and `leave_one_out`
  stable-sorts again so a hand-made list in any order is handled the same way);
* the last click is the test target, the second-last the validation target,
  the rest is training. Exactly as RecBole's `_split_index_by_leave_one_out`
  for short users: one click -> train only; two clicks -> train + test, no
  validation; three or more -> train n-2, valid 1, test 1;
* the validation case sees the training clicks as history; the test case sees
  training + the validation click (RecBole's sequential datasets evaluate the
  next item given everything before it);
* training sequences (RecBole's data augmentation) are every prefix of the
  training part predicting its next click: targets at positions 1..n_train-1.

Queries travel with their clicks: a search click carries its `query_id` and
`query_text` in the history, and an evaluation target keeps its query, so the
search evaluation can ask "given this query and this history, which item?".
Query events whose click is missing are ignored here (the stream never has
them; they would be dead letters upstream).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal


@dataclasses.dataclass(frozen=True)
class UserHistory:
    """One user's clicks in time order (parallel tuples; query_* are None for rec clicks)."""

    user_id: str
    item_ids: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    ratings: tuple[int | None, ...] = ()
    ts: tuple[int, ...] = ()
    surfaces: tuple[str, ...] = ()
    query_ids: tuple[str | None, ...] = ()
    query_texts: tuple[str | None, ...] = ()
    event_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.item_ids)

    def prefix(self, n: int) -> UserHistory:
        """The first `n` clicks."""
        return UserHistory(self.user_id, *(getattr(self, f)[:n] for f in _SEQ_FIELDS))

    def event(self, i: int) -> dict:
        """Click `i` as a dict of the per-event fields."""
        return {f[:-1] if f != "ts" else f: getattr(self, f)[i] for f in _SEQ_FIELDS}

    @property
    def n_train(self) -> int:
        """Clicks in the training part (RecBole: n - min(2, n - 1))."""
        n = len(self)
        return n - min(2, max(n - 1, 0))


_SEQ_FIELDS = tuple(f.name for f in dataclasses.fields(UserHistory) if f.name != "user_id")


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """Predict the held-out click (`item_id`, with its query if it was a search) from `history`."""

    user_id: str
    history: UserHistory
    item_id: str
    label: int
    rating: int | None
    ts: int
    surface: str
    query_id: str | None
    query_text: str | None
    event_id: str


def user_histories(events: Iterable[dict]) -> dict[str, UserHistory]:
    """Per-user time-ordered (stable) click histories, queries attached to their clicks."""
    query_text: dict[str, str] = {}
    rows: dict[str, list[tuple[int, int, dict]]] = {}
    for n, e in enumerate(events):
        if e.get("schema") == "query/v1":
            query_text[e["query_id"]] = e["text"]
        elif e.get("schema") == "click/v1":
            rows.setdefault(e["user_id"], []).append((e["ts"], n, e))
    out = {}
    for user, clicks in rows.items():
        clicks.sort(key=lambda r: r[0])  # stable: ties keep stream order
        es = [c for _, _, c in clicks]
        out[user] = UserHistory(
            user_id=user,
            item_ids=tuple(e["item_id"] for e in es),
            labels=tuple(int(e["label"]) for e in es),
            ratings=tuple(e.get("rating") for e in es),
            ts=tuple(int(e["ts"]) for e in es),
            surfaces=tuple(e.get("surface", "rec") for e in es),
            query_ids=tuple(e.get("query_id") for e in es),
            query_texts=tuple(query_text.get(e["query_id"]) if e.get("query_id") else None for e in es),
            event_ids=tuple(e.get("event_id", "") for e in es),
        )
    return out


def leave_one_out(events: Iterable[dict]) -> dict[str, UserHistory]:
    """Full per-user histories, ready for `train_part` / `eval_case` / `split_cases`."""
    return user_histories(events)


def _case(h: UserHistory, i: int) -> EvalCase:
    e = h.event(i)
    return EvalCase(user_id=h.user_id, history=h.prefix(i), item_id=e["item_id"], label=e["label"],
                    rating=e["rating"], ts=e["ts"], surface=e["surface"], query_id=e["query_id"],
                    query_text=e["query_text"], event_id=e["event_id"])


def train_part(h: UserHistory) -> UserHistory:
    """The training clicks (all but the validation and test targets)."""
    return h.prefix(h.n_train)


def eval_case(h: UserHistory, split: Literal["valid", "test"]) -> EvalCase | None:
    """The held-out click of `split` with everything before it as history.

    test = the last click (None for a user with a single click); valid = the
    second-last click given the training part (None below three clicks).
    """
    if split == "test":
        return _case(h, len(h) - 1) if len(h) >= 2 else None
    if split == "valid":
        return _case(h, len(h) - 2) if len(h) >= 3 else None
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


def train_targets(h: UserHistory) -> list[int]:
    """Positions predicted in training: 1..n_train-1 (each from the clicks before it)."""
    return list(range(1, h.n_train))


def split_cases(histories: dict[str, UserHistory]) -> tuple[list[UserHistory], list[EvalCase], list[EvalCase]]:
    """(training parts, validation cases, test cases) over all users, in user-id order."""
    users = sorted(histories, key=lambda u: (len(u), u))
    train = [train_part(histories[u]) for u in users]
    valid = [c for u in users if (c := eval_case(histories[u], "valid")) is not None]
    test = [c for u in users if (c := eval_case(histories[u], "test")) is not None]
    return train, valid, test
