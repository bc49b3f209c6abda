"""Build the recipe's small real corpus: the repository's own text (sources, docs, scripts; one file
a document), byte-tokenized (UTF-8 bytes + an end-of-document token, vocab 257: no download), in
Megatron's indexed-dataset format (`<out>.bin` / `<out>.idx`, what --data-path takes).

    python examples/build_corpus.py --out build/recipe/corpus_text_document
"""

from __future__ import annotations

import argparse
import os

from qla_megatron.training.data import repository_documents, write_indexed_dataset
from qla_megatron.training.quiet import quiet_known_warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "build", "recipe", "corpus_text_document"),
                   help="dataset prefix (writes <out>.bin and <out>.idx)")
    p.add_argument("--root", default=ROOT, help="repository whose text makes the corpus")
    args = p.parse_args()
    quiet_known_warnings()
    stats = write_indexed_dataset(repository_documents(args.root), args.out)
    print(f"corpus: {stats['documents']} documents, {stats['tokens']:,} byte tokens -> {args.out}.bin / .idx")


if __name__ == "__main__":
    main()
