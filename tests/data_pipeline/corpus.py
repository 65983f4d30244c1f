"""Small corpora on disk for the data pipeline tests (real files in every supported format)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega stream token shard packing resume mixing worker rank").split()


def texts(n: int, seed: int, lo: int = 5, hi: int = 300, tag: str = "d") -> list[str]:
    """n documents of lo..hi words; each starts with a unique tag so it can be told apart."""
    rng = random.Random(seed)
    return [f"{tag}{i:05d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def write_jsonl_gz(path: Path, docs: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return path


def write_jsonl_zst(path: Path, docs: list[str]) -> Path:
    import zstandard

    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text", row_group_size: int = 16) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "n": np.arange(len(docs))}), path, row_group_size=row_group_size)
    return path


def doc_tokens(tokenizer, docs: list[str], bos: bool = False) -> list[tuple[int, ...]]:
    """What the pipeline makes of each document: [BOS] + ids + [EOS]."""
    pre = [tokenizer.bos_id] if bos else []
    return [tuple(pre + ids + [tokenizer.eos_id]) for ids in tokenizer.encode_batch(docs)]
