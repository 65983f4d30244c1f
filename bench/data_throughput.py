#!/usr/bin/env python
"""Data pipeline throughput and memory: streaming tokenize+pack against raw tokenizers, shards
against what training consumes, peak memory against corpus size.

1. Streaming (tokenize + pack in DataLoader workers) with 0, 1 and 2 workers against
   ``tokenizers`` ``encode_batch`` on the same documents (already in memory, batches of 1000),
   in the same run: the settings are interleaved round by round and each figure is the median
   over rounds. Target: best streaming setting >= 0.9x raw. Tokens are the documents' ids plus
   one EOS each, for both.
2. Reading prepared token shards (memory-mapped) with 0 and 2 workers, against the training
   throughput of the tiny model (gpt2-tiny, batch 8 x 256, fp32 AdamW, measured in this run).
   Target: >= 100x.
3. Peak resident memory of a fresh process streaming the same number of tokens (2 workers, 64
   streams, seq 256) from a plain .jsonl, a .jsonl.zst and a single .txt file of 10 MB and of
   1 GB: main process and largest worker. Target: flat.

Corpora are documents of the builtin corpus (random slices, so that 1 GB is not one repeated
text), written to a temporary directory that is deleted at the end.

  python bench/data_throughput.py                 # all three, about 5 minutes on 2 cores
  python bench/data_throughput.py --sizes 10M     # skip the 1 GB corpus
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

SEQ_LEN, STREAMS, MICRO = 256, 64, 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tokenizer", help="tokenizer dir (default: train a byte-level BPE, vocab 8192, on the builtin corpus)")
    p.add_argument("--mb", type=float, default=10, help="corpus size for the throughput runs, MB (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default: %(default)s)")
    p.add_argument("--shard-tokens", type=float, default=2e7, help="tokens read from shards per timing (default: 2e7)")
    p.add_argument("--sizes", default="10M,1G", help="corpus sizes for the memory runs (default: %(default)s)")
    p.add_argument("--memory-tokens", type=float, default=2e6, help="tokens streamed per memory run (default: 2e6)")
    p.add_argument("--tmp", help="directory for the temporary corpora (default: the system temp dir)")
    p.add_argument("--child", nargs=4, metavar=("CORPUS", "TOKENIZER", "TOKENS", "WORKERS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_corpus(path: Path, nbytes: float, docs: list[str], seed: int = 0) -> Path:
    """JSONL of random slices of `docs` up to `nbytes` (.zst compressed if the name says so), or
    for a .txt name the slices themselves, one after another (one text file)."""
    rng = random.Random(seed)
    pool = []
    for _ in range(4000):  # distinct lines to draw from: writing 1 GB stays fast
        d = rng.choice(docs)
        a = rng.randrange(max(1, len(d) // 2))
        text = d[a:a + rng.randint(200, 8000)]
        pool.append((text + "\n" if path.suffix == ".txt" else json.dumps({"text": text}) + "\n").encode())
    plain = path.with_suffix("") if path.suffix == ".zst" else path
    with open(plain, "wb") as f:
        n = 0
        while n < nbytes:
            line = rng.choice(pool)
            f.write(line)
            n += len(line)
    if path.suffix == ".zst":
        import zstandard

        with open(plain, "rb") as src, open(path, "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        plain.unlink()
    return path


def stream_tokens(sources, tok, workers: int, repeat: bool = False, limit: float | None = None) -> tuple[int, float]:
    """(tokens, seconds) of the streaming pipeline over `sources` (one rank)."""
    from data_pipeline.stream import Loader, StreamConfig

    loader = Loader(sources, StreamConfig(seq_len=SEQ_LEN, streams=STREAMS), tok.path, tok.hash, micro_batch=MICRO,
                    num_workers=workers, repeat=repeat)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["input_ids"].numel()
        if limit and n >= limit:
            break
    seconds = time.perf_counter() - t0
    return n + (0 if limit else loader.remainder_tokens()), seconds


def raw_tokens(texts: list[str], tok_path: str) -> tuple[int, float]:
    from data_pipeline.tokenizer import load_tokenizer

    # a fresh instance, as each streaming run loads its own: tokenizers caches words it has seen
    tok = load_tokenizer(tok_path)
    t0, n = time.perf_counter(), 0
    for i in range(0, len(texts), 1000):
        n += sum(len(ids) + 1 for ids in tok.encode_batch(texts[i:i + 1000]))
    return n, time.perf_counter() - t0


def tiny_model_tokens_per_s(vocab: int, steps: int = 4) -> float:
    """Training tokens/s of gpt2-tiny (batch 8 x 256, fp32, AdamW) in this process."""
    import torch

    from llmstack.models.gpt import GPT, gpt_config_from_preset

    torch.manual_seed(0)
    model = GPT(gpt_config_from_preset("gpt2-tiny", vocab))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (MICRO, SEQ_LEN + 1))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(x[:, :-1], labels=x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocations
            times.append(time.perf_counter() - t0)
    return MICRO * SEQ_LEN / statistics.median(times)


def child(corpus: str, tokenizer: str, tokens: str, workers: str) -> None:
    """Stream `tokens` tokens from `corpus` in this fresh process; print peak RSS as JSON."""
    from data_pipeline.sources import resolve_source
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    n, seconds = stream_tokens([resolve_source(corpus)], tok, int(workers), repeat=True, limit=float(tokens))
    print(json.dumps({"tokens": n, "seconds": seconds, "main_mb": peak_rss_mb(),
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6}))


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over exec from the forking
    parent, so a fresh process started by a big one would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def parse_size(s: str) -> float:
    return float(s[:-1]) * {"K": 1e3, "M": 1e6, "G": 1e9}[s[-1].upper()] if s[-1].isalpha() else float(s)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return
    from data_pipeline import shards
    from data_pipeline.sources import builtin_texts, resolve_source
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="llmstack-bench-data-", dir=args.tmp))
    try:
        docs = list(builtin_texts("train"))
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else \
            train_tokenizer(iter(docs), tmp / "tok", vocab_size=8192, num_sentinels=0)
        print(f"# data throughput, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, tokenizer "
              f"{tok.kind} vocab {tok.vocab_size}, seq_len {SEQ_LEN}, {STREAMS} streams, micro-batch {MICRO}")

        # 1. streaming vs raw encode_batch, same documents, interleaved rounds
        corpus = write_corpus(tmp / "throughput.jsonl", args.mb * 1e6, docs)
        texts = [json.loads(line)["text"] for line in corpus.open()]
        src = [resolve_source(str(corpus))]
        settings = {"raw tokenizers encode_batch": lambda: raw_tokens(texts, tok.path)}
        for w in (0, 1, 2):
            settings[f"stream tokenize+pack, {w} workers"] = lambda w=w: stream_tokens(src, tok, w)
        rates: dict[str, list[float]] = {k: [] for k in settings}
        counts = {}
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))  # alternate who goes first
            for name in order:
                n, s = settings[name]()
                counts[name] = n
                rates[name].append(n / s)
        assert len(set(counts.values())) == 1, f"settings saw different token counts: {counts}"
        total = counts["raw tokenizers encode_batch"]
        med = {k: statistics.median(v) for k, v in rates.items()}
        raw = med["raw tokenizers encode_batch"]
        print(f"\n## tokens/s on {corpus.stat().st_size / 1e6:.1f} MB of JSONL ({total:,} tokens), "
              f"median of {args.rounds} rounds")
        for name, v in med.items():
            print(f"  {name:<36} {v:>12,.0f}  {v / raw:5.2f}x")
        best = max((k for k in med if k.startswith("stream")), key=med.get)
        print(f"best streaming setting: {best}: {med[best] / raw:.2f}x raw (target >= 0.9x)")

        # 2. reading prepared shards vs what training consumes
        t0 = time.perf_counter()
        shards.prepare(src, tmp / "shards", tok.path, workers=2, docs_per_shard=2048)
        prep = time.perf_counter() - t0
        shard_src = [resolve_source(str(tmp / "shards"), tokenizer_hash=tok.hash)]
        shard_rates = {w: [] for w in (0, 2)}
        for _ in range(args.rounds):
            for w in shard_rates:
                n, s = stream_tokens(shard_src, tok, w, repeat=True, limit=args.shard_tokens)
                shard_rates[w].append(n / s)
        train = tiny_model_tokens_per_s(tok.vocab_size)
        print(f"\n## token shards (prepared in {prep:.1f}s with 2 processes: {total / prep:,.0f} tokens/s)")
        for w, v in shard_rates.items():
            m = statistics.median(v)
            print(f"  read, {w} workers: {m:>12,.0f} tokens/s = {m / train:,.0f}x the tiny model's training")
        best_shards = max(statistics.median(v) for v in shard_rates.values())
        print(f"tiny model (gpt2-tiny, fp32 AdamW, batch {MICRO}x{SEQ_LEN}) trains at {train:,.0f} tokens/s here; "
              f"shards read at {best_shards / train:,.0f}x that, {best_shards / 4000:,.0f}x the nominal 4k tokens/s "
              "(target >= 100x)")

        # 3. peak memory against corpus size
        print(f"\n## peak RSS (MB) streaming {args.memory_tokens:,.0f} tokens with 2 workers, fresh process per run")
        print(f"  {'corpus':<24} {'main':>8} {'largest worker':>15}")
        for size in args.sizes.split(","):
            for suffix in (".jsonl", ".jsonl.zst", ".txt"):
                path = write_corpus(tmp / f"mem-{size}{suffix}", parse_size(size), docs, seed=1)
                out = subprocess.run([sys.executable, __file__, "--child", str(path), str(tok.path),
                                      str(args.memory_tokens), "2"], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = f"{size} {suffix[1:]} ({path.stat().st_size / 1e6:,.0f} MB)"
                print(f"  {label:<24} {r['main_mb']:>8.0f} {r['worker_mb']:>15.0f}")
                path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
