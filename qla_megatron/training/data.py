"""Data for the recipe: a byte-level corpus in Megatron's indexed-dataset format, the dataset
provider (Megatron's GPTDataset / MockGPTDataset) and the batch of one micro-step.

Tokenizer: UTF-8 bytes, one token a byte (0-255), 256 the end of a document; vocab 257. It needs
no download, and training reads it as Megatron's NullTokenizer with --vocab-size 257 (whose
end-of-document id is vocab_size - 1 = 256). Real tokenizers (--tokenizer-type HuggingFaceTokenizer
...) work as in any Megatron run, on datasets made with Megatron's preprocess_data.py.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Iterable, Sequence

import numpy as np
import torch

BYTE_VOCAB = 257
BYTE_EOD = 256
CORPUS_SUFFIXES = (".py", ".md", ".sh", ".args", ".txt", ".ini", "Makefile")
CORPUS_DIRS = ("qla_megatron", "examples", "benchmarks", "tests", "docs", "scripts")


def encode_bytes(text: str) -> np.ndarray:
    """The byte tokenizer: UTF-8 bytes of `text` (the end-of-document token is added per document)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode_bytes(tokens: Sequence[int]) -> str:
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")


def repository_documents(root: str) -> list[str]:
    """The repository's own text (sources, docs, scripts), one file a document, sorted by path:
    a small real corpus that ships with the code."""
    paths = [os.path.join(root, "README.md"), os.path.join(root, "Makefile")]
    for top in CORPUS_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(CORPUS_SUFFIXES))
    docs = []
    for path in sorted(set(paths)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append(f.read())
    return [d for d in docs if d.strip()]


def write_indexed_dataset(documents: Iterable[str], prefix: str) -> dict:
    """Write `prefix`.bin / `prefix`.idx (Megatron's indexed dataset, uint16 tokens) atomically:
    into temporary names first, renamed when complete, so a killed build leaves no half dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.uint16)
    n_docs = n_tokens = 0
    for text in documents:
        tokens = np.concatenate([encode_bytes(text), np.array([BYTE_EOD], dtype=np.uint16)])
        builder.add_document(tokens, [len(tokens)])
        n_docs, n_tokens = n_docs + 1, n_tokens + len(tokens)
    if n_docs == 0:
        raise ValueError("no documents to write")
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    # Megatron caches its sample indices of a dataset under <prefix>/cache, keyed by the prefix and
    # not by the contents: those of an earlier corpus would index past this one's documents.
    stale = os.path.join(prefix, "cache")
    if os.path.isdir(stale):
        shutil.rmtree(stale)
    return {"documents": n_docs, "tokens": n_tokens}


def _built_on_every_rank() -> bool:
    # Every rank reads its own copy of the (memory-mapped) data: no broadcast of batches over TP.
    return True


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's dataset-provider contract: GPTDataset on --data-path, or MockGPTDataset."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split, path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=False)
    kind = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(kind, train_val_test_num_samples, _built_on_every_rank, config).build()


train_valid_test_datasets_provider.is_distributed = True


def get_batch(data_iterator, device):
    """One micro-batch on `device`, cut to this context-parallel rank's shard (Megatron's zigzag)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    sample = next(data_iterator)
    batch = {k: sample[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                          cp_group=parallel_state.get_context_parallel_group())
    return batch


def loss_func(loss_mask, output_tensor):
    """Megatron's loss contract: (sum of token losses, token count, report of [sum, count])."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.detach().view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, device="cuda"):
    """Megatron's forward-step contract: the per-token losses and the function that reduces them."""
    batch = get_batch(data_iterator, device)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])
