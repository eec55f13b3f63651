"""MovieLens-100k preparation: the event stream for offline training and Kafka replay.

`prepare(cfg)` writes `<cache_dir>/ml-100k/{events,items}.jsonl` (see
`unirec.data.prepare`); `load_events` / `load_items` read them back;
`unirec.data.split` holds RecBole's leave-one-out protocol over the stream.
"""
from unirec.data.prepare import load_events, load_items, prepare
from unirec.data.source import DataError

__all__ = ["DataError", "load_events", "load_items", "prepare"]
