"""The sparse lexical index equals the plain dense computation it replaced."""
import torch

from unirec.model.model import lexical_index


def dense_reference(pieces: torch.Tensor, n_buckets: int):
    rows = torch.arange(pieces.shape[0])[:, None].expand_as(pieces)
    keep = pieces > 0
    counts = torch.zeros(pieces.shape[0], n_buckets)
    counts.index_put_((rows[keep], pieces[keep]), torch.ones(int(keep.sum())), accumulate=True)
    df = (counts > 0).sum(0).float()
    n_docs = float((counts.sum(1) > 0).sum())
    idf = torch.log((1 + n_docs) / (1 + df)) + 1.0
    w = counts * idf
    return idf, w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def test_sparse_index_matches_the_dense_reference_with_repeats_and_empty_rows():
    g = torch.Generator().manual_seed(0)
    pieces = torch.randint(0, 40, (50, 7), generator=g)
    pieces[0] = 0                      # padding row
    pieces[9] = 0                      # a free row of a growing table
    pieces[3] = torch.tensor([5, 5, 5, 6, 0, 0, 0])   # repeated pieces count
    idf, lex = lexical_index(pieces, 40)
    ref_idf, ref = dense_reference(pieces, 40)
    torch.testing.assert_close(idf, ref_idf)
    torch.testing.assert_close(lex.to_dense(), ref, atol=1e-6, rtol=1e-6)
    assert lex.to_dense()[[0, 9]].abs().sum() == 0
