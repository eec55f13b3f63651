"""The sparse lexical index equals the plain dense computation it replaced."""
import torch

from unirec.model.sparse import csr, lexical_index


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
    torch.testing.assert_close(csr(*lex).to_dense(), ref, atol=1e-6, rtol=1e-6)
    assert csr(*lex).to_dense()[[0, 9]].abs().sum() == 0


def test_piece_mean_matrix_and_its_transpose_match_the_dense_counts():
    from unirec.model.sparse import piece_mean_matrix
    g = torch.Generator().manual_seed(1)
    pieces = torch.randint(0, 40, (30, 6), generator=g)
    pieces[0] = 0
    pieces[4] = torch.tensor([7, 7, 0, 3, 0, 7])            # repeats count, padding does not
    counts = torch.zeros(30, 40)
    for r, row in enumerate(pieces.tolist()):
        for p in row:
            counts[r, p] += float(p > 0)
    ref = counts / counts.sum(1, keepdim=True).clamp(min=1)
    m, m_t = piece_mean_matrix(pieces, 40)
    torch.testing.assert_close(csr(*m).to_dense(), ref)
    torch.testing.assert_close(csr(*m_t).to_dense(), ref.T)
    assert csr(*m).to_dense()[4, 7] == 0.75 and csr(*m).to_dense()[0].abs().sum() == 0
