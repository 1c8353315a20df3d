"""Retrieval in the memory space: cosine scores, top-k selection, InfoNCE and the MemoryIndex.

Expected values are written out with plain Python floats (math.fsum, math.exp) or a brute-force
full-matrix search, never with the function under test.
"""

from __future__ import annotations

import math
import os
import re
import stat

import pytest
import torch
from safetensors.torch import save_file

from clara.retrieval import MemoryIndex, cosine_scores, flatten_memory, info_nce, select_documents


def python_cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b)))


def ranked(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda n: (-row[n], n))[:k]


# ---------------------------------------------------------------------------------------------
# Scores and selection
# ---------------------------------------------------------------------------------------------
def test_cosine_scores_shared_and_per_query_candidates():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 5, generator=g)
    shared = torch.randn(4, 5, generator=g) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])  # norms don't matter
    own = torch.randn(3, 4, 5, generator=g)
    got_shared, got_own = cosine_scores(queries, shared), cosine_scores(queries, own)
    assert got_shared.shape == got_own.shape == (3, 4) and got_shared.dtype == torch.float32
    for b in range(3):
        for n in range(4):
            assert got_shared[b, n].item() == pytest.approx(python_cosine(queries[b].tolist(), shared[n].tolist()),
                                                            abs=1e-6)
            assert got_own[b, n].item() == pytest.approx(python_cosine(queries[b].tolist(), own[b, n].tolist()),
                                                         abs=1e-6)
    # Half-precision inputs are scored in fp32.
    assert cosine_scores(queries.bfloat16(), shared.bfloat16()).dtype == torch.float32


def test_flatten_memory_joins_the_memory_vectors_of_a_document():
    memory = torch.arange(24.0).view(2, 3, 4)  # [docs, n_mem, hidden]
    assert flatten_memory(memory).tolist() == [list(range(12)), list(range(12, 24))]


def test_select_documents_picks_the_true_topk_memory_exactly():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 5, generator=g).requires_grad_()
    memory = torch.randn(2, 5, 3, 4, generator=g)  # [B, N, n_mem, hidden]
    selected, idx = select_documents(scores, memory, 3, temperature=0.1)
    assert selected.shape == (2, 3, 3, 4)
    assert idx.tolist() == [ranked(row, 3) for row in scores.tolist()]
    for b in range(2):
        for j, n in enumerate(idx[b].tolist()):
            assert torch.equal(selected[b, j].detach(), memory[b, n]), (b, j)
    # The scores get the soft path's gradient, finite and nonzero.
    selected.mul(torch.randn(selected.shape, generator=g)).sum().backward()
    assert bool(torch.isfinite(scores.grad).all()) and scores.grad.abs().sum().item() > 0


def test_select_documents_refuses_more_slots_than_candidates():
    with pytest.raises(ValueError, match="^cannot select top-4 documents from 3 candidates$"):
        select_documents(torch.zeros(1, 3), torch.zeros(1, 3, 2, 2), 4, 0.02)


# ---------------------------------------------------------------------------------------------
# InfoNCE with several positives
# ---------------------------------------------------------------------------------------------
def test_info_nce_by_hand_with_two_positives_and_a_row_without_any():
    scores = torch.tensor([[0.1, 0.5, -0.2], [0.3, 0.2, 0.9], [0.0, -0.4, 0.7]], requires_grad=True)
    positive = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    tau = 0.5
    # Row 0 (positives 0 and 2): logits 0.2, 1.0, -0.4.  Row 2 (positive 1): logits 0.0, -0.8, 1.4.
    row0 = math.log(math.exp(0.2) + math.exp(1.0) + math.exp(-0.4)) - math.log(math.exp(0.2) + math.exp(-0.4))
    row2 = math.log(math.exp(0.0) + math.exp(-0.8) + math.exp(1.4)) - (-0.8)
    loss = info_nce(scores, positive, tau)
    assert loss.item() == pytest.approx((row0 + row2) / 2, rel=1e-6)  # row 1 has no positive: left out
    loss.backward()
    assert bool(torch.isfinite(scores.grad).all())
    assert scores.grad[1].tolist() == [0.0, 0.0, 0.0]
    # d/ds of row 0 = (softmax over all - softmax over positives) / (tau * 2 rows)
    z_all = math.exp(0.2) + math.exp(1.0) + math.exp(-0.4)
    z_pos = math.exp(0.2) + math.exp(-0.4)
    expected = [(math.exp(0.2) / z_all - math.exp(0.2) / z_pos) / (tau * 2), math.exp(1.0) / z_all / (tau * 2),
                (math.exp(-0.4) / z_all - math.exp(-0.4) / z_pos) / (tau * 2)]
    assert scores.grad[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_info_nce_without_any_positive_is_a_clear_error():
    with pytest.raises(ValueError, match="no query in the batch has a positive candidate"):
        info_nce(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.02)


# ---------------------------------------------------------------------------------------------
# MemoryIndex
# ---------------------------------------------------------------------------------------------
N_MEM, HIDDEN, N_DOCS = 2, 3, 10


def filled_index(dtype=torch.float32) -> tuple[MemoryIndex, torch.Tensor]:
    vectors = torch.randn(N_DOCS, N_MEM, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    index = MemoryIndex(N_MEM, HIDDEN, dtype)
    index.add(vectors[:4], [f"doc{i}" for i in range(4)])  # appended in two parts
    index.add(vectors[4:], [f"doc{i}" for i in range(4, N_DOCS)])
    return index, vectors


@pytest.mark.parametrize("chunk_size", [1, 3, N_DOCS, 4096])
def test_chunked_search_equals_brute_force(chunk_size):
    index, vectors = filled_index()
    assert len(index) == N_DOCS and index.ids == [f"doc{i}" for i in range(N_DOCS)]
    queries = torch.randn(3, N_MEM * HIDDEN, generator=torch.Generator().manual_seed(3))
    full = [[python_cosine(q, v) for v in vectors.flatten(1).tolist()] for q in queries.tolist()]
    for top_n in (1, 4, N_DOCS, N_DOCS + 5):
        scores, idx = index.search(queries, top_n, chunk_size=chunk_size)
        n = min(top_n, N_DOCS)
        assert scores.shape == idx.shape == (3, n)
        assert idx.tolist() == [ranked(row, n) for row in full]
        for b in range(3):
            assert scores[b].tolist() == pytest.approx([full[b][i] for i in idx[b].tolist()], abs=1e-6)
    assert torch.equal(index.memory(torch.tensor([[7, 0]])), vectors[[7, 0]][None])


def test_search_refuses_bad_queries_and_an_empty_index():
    index, _ = filled_index()
    with pytest.raises(ValueError, match=r"expected queries \[B, 6\], got \[2, 5\]"):
        index.search(torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="top_n must be at least 1, got 0"):
        index.search(torch.zeros(2, 6), 0)
    with pytest.raises(ValueError, match="the index is empty"):
        MemoryIndex(N_MEM, HIDDEN).search(torch.zeros(1, 6), 1)


def test_add_refuses_duplicates_and_bad_shapes_and_leaves_the_index_unchanged():
    index, vectors = filled_index()
    with pytest.raises(ValueError, match="duplicate document id 'doc3'"):
        index.add(vectors[:2], ["new", "doc3"])
    with pytest.raises(ValueError, match="duplicate document id 'twice'"):
        index.add(vectors[:2], ["twice", "twice"])
    with pytest.raises(ValueError, match=r"expected memory \[n, 2, 3\], got \[2, 3, 2\]"):
        index.add(torch.zeros(2, 3, 2), ["a", "b"])
    with pytest.raises(ValueError, match="2 memory blocks but 1 ids"):
        index.add(vectors[:2], ["a"])
    with pytest.raises(TypeError, match="ids must be str, got int"):
        index.add(vectors[:1], [5])
    assert len(index) == N_DOCS and torch.equal(index.vectors, vectors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    index, _ = filled_index(dtype)
    path = tmp_path / "sub" / "index.safetensors"
    index.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.safetensors"]  # no temp file left
    loaded = MemoryIndex.load(path)
    assert loaded.ids == index.ids and (loaded.n_mem, loaded.hidden, loaded.dtype) == (N_MEM, HIDDEN, dtype)
    assert torch.equal(loaded.vectors, index.vectors)
    queries = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    for a, b in zip(loaded.search(queries, 3), index.search(queries, 3)):
        assert torch.equal(a, b)
    # Saving again over it replaces the file.
    loaded.add(torch.zeros(1, N_MEM, HIDDEN, dtype=dtype), ["extra"])
    loaded.save(path)
    assert MemoryIndex.load(path).ids[-1] == "extra"
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.safetensors"]


def test_unreadable_index_files_are_refused_naming_the_path(tmp_path):
    index, _ = filled_index()
    good = tmp_path / "good.safetensors"
    index.save(good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a readable memory index"):
            MemoryIndex.load(path)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"vectors": torch.zeros(1, 2, 3)}, str(foreign))
    with pytest.raises(ValueError, match=f"^{re.escape(str(foreign))}: not a memory index written by MemoryIndex.save"):
        MemoryIndex.load(foreign)

    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path / 'absent.safetensors'))}: memory index not found"):
        MemoryIndex.load(tmp_path / "absent.safetensors")


def test_saved_index_gets_the_mode_of_a_plain_file_not_a_private_temporary_one(tmp_path):
    index, _ = filled_index()
    previous = os.umask(0o022)
    try:
        index.save(tmp_path / "index.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "index.safetensors").stat().st_mode) == 0o644


def test_index_with_a_flipped_data_byte_is_refused(tmp_path):
    from clara.retrieval import MemoryIndex

    index = MemoryIndex(2, 3)
    index.add(torch.arange(12, dtype=torch.float32).view(2, 2, 3), ["a", "b"])
    path = tmp_path / "index.safetensors"
    index.save(path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside the vectors, past the header
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        MemoryIndex.load(path)
