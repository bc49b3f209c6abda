"""The byte-level corpus: documents written in Megatron's indexed format read back as written
(UTF-8 bytes + the end-of-document token), through Megatron's IndexedDataset and GPTDataset."""

from __future__ import annotations

import os

import numpy as np

from qla_megatron.training.data import BYTE_EOD, BYTE_VOCAB, decode_bytes, repository_documents, write_indexed_dataset

from .conftest import ROOT


def test_documents_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["hello GDN", "", "ünïcode ✓ " * 7, "x"]
    docs = [d for d in docs if d] + ["last line\n"]
    prefix = str(tmp_path / "corpus")
    stats = write_indexed_dataset(docs, prefix)
    ds = IndexedDataset(prefix)
    assert len(ds) == stats["documents"] == len(docs)
    for i, text in enumerate(docs):
        tokens = ds[i]
        assert tokens[-1] == BYTE_EOD and int(np.max(tokens)) < BYTE_VOCAB
        assert decode_bytes(tokens[:-1]) == text
    assert stats["tokens"] == sum(len(d.encode()) + 1 for d in docs)


def test_rebuilding_drops_megatron_index_cache(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(["one document"], prefix)
    cache = os.path.join(prefix, "cache", "GPTDataset_indices")
    os.makedirs(cache)
    write_indexed_dataset(["another", "corpus"], prefix)
    assert not os.path.exists(os.path.join(prefix, "cache")), "stale sample indices of the old corpus"


def test_repository_corpus_is_the_repository_text():
    docs = repository_documents(ROOT)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme in docs and len(docs) > 20
    assert all(d.strip() for d in docs)
