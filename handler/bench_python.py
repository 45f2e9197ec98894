"""The baseline for `runpod-worker bench models` and `gpu-check`: the same TorchScript MiniLM
called from Python torch, doing the same work as the worker's extract and classify handlers,
with N threads, on the CPU or a GPU.

    python handler/bench_python.py --models handler/models --concurrency 2 --jobs 16 [--device cuda]
Prints one JSON object: {"extract": {"p50_ms", "p99_ms", "throughput"}, "classify": {...}}.

With `--sorted-batches N` it classifies `--jobs` distinct texts (the worker's benchmark texts)
the way sentence-transformers' `encode` batches: sorted by length, N per forward call, no
per-job overhead at all: {"classify_sorted": {"throughput"}}, the offline upper bound a
batching server is measured against.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tokenizers import Tokenizer

DOCUMENT = " ".join(f"Sentence number {i} describes the quarterly results of division {i % 7}." for i in range(60))
TEXT = "Preheat the oven to 180 degrees, whisk two eggs with sugar, fold in the flour and bake for 25 minutes."
LABELS = ["invoice", "recipe", "poem", "contract", "resume"]
# The worker's `bench::embeddings::texts`: everyday lengths (5 to 40 words), all different.
WORDS = ["the", "invoice", "for", "march", "was", "paid", "late", "because", "our", "bank",
         "changed", "its", "transfer", "rules", "and", "nobody", "told", "accounting", "about", "it"]


def texts(count):
    out = []
    for i in range(count):
        words = [WORDS[(i + j * 3) % len(WORDS)] for j in range(5 + (i * 7) % 36)]
        words.append("today" if i % 2 == 0 else "yesterday")
        out.append(f"{' '.join(words)} (note {i})")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="handler/models")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", default="extract,classify")
    parser.add_argument("--sorted-batches", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    model = torch.jit.load(f"{args.models}/minilm.pt", map_location=device).eval()
    tokenizer = Tokenizer.from_file(f"{args.models}/tokenizer.json")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    batch_tokenizer = Tokenizer.from_file(f"{args.models}/tokenizer.json")
    batch_tokenizer.enable_padding()
    batch_tokenizer.enable_truncation(max_length=256)

    def embed(texts):
        encodings = batch_tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).to(device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64).to(device)
        with torch.no_grad():
            return model(ids, mask).float().cpu()

    def extract():
        offsets = tokenizer.encode(DOCUMENT, add_special_tokens=False).offsets
        chunks, start = [], 0
        while True:
            end = min(start + 200, len(offsets))
            chunks.append(DOCUMENT[offsets[start][0]:offsets[end - 1][1]])
            if end == len(offsets):
                break
            start += 168
        return embed(chunks).tolist()

    label_embeddings = embed([f"This text is a {label}." for label in LABELS])

    def classify():
        text = embed([TEXT])
        scores = torch.softmax((text @ label_embeddings.T) / 0.05, dim=1)
        return scores.tolist()

    if args.sorted_batches:
        size = args.sorted_batches
        every = texts(args.jobs)
        order = sorted(every, key=len)
        embed(order[:size])  # warm-up
        start = time.perf_counter()
        for k in range(0, len(order), size):
            batch = embed(order[k:k + size])
            torch.softmax((batch @ label_embeddings.T) / 0.05, dim=1).tolist()
        elapsed = time.perf_counter() - start
        print(json.dumps({"classify_sorted": {"throughput": args.jobs / elapsed}}))
        return

    results = {}
    tasks = args.tasks.split(",")
    for name, work in [("extract", extract), ("classify", classify)]:
        if name not in tasks:
            continue
        work()  # warm-up
        latencies = []

        def timed(_):
            start = time.perf_counter()
            work()
            latencies.append((time.perf_counter() - start) * 1000)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            list(pool.map(timed, range(args.jobs)))
        elapsed = time.perf_counter() - start
        latencies.sort()
        results[name] = {
            "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[round((len(latencies) - 1) * 0.99)],
            "throughput": args.jobs / elapsed,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
