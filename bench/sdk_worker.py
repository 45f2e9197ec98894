"""The official runpod SDK worker (runpod==1.12.0) for `runpod-worker bench compare`.

Written the way the SDK's docs show a handler: the model is loaded once at import, the handler
is an `async def` returning a dict, `concurrency_modifier` sets the slots (BENCH_CONCURRENCY).
Job kinds (input.task): `echo` (returns its input; `sleep_ms` waits with asyncio.sleep first),
`classify` and `extract` on the same TorchScript MiniLM the worker runs (BENCH_MODELS), doing
the same work as the worker's handlers (handler/bench_python.py is the same code, threaded).
The queue URLs and key come from the RUNPOD_* environment that the harness sets.
"""

import asyncio
import os

import runpod
import torch
from tokenizers import Tokenizer

MODELS = os.environ.get("BENCH_MODELS", "handler/models")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "1"))

model = torch.jit.load(f"{MODELS}/minilm.pt", map_location="cpu").eval()
tokenizer = Tokenizer.from_file(f"{MODELS}/tokenizer.json")
tokenizer.no_padding()
tokenizer.no_truncation()
batch_tokenizer = Tokenizer.from_file(f"{MODELS}/tokenizer.json")
batch_tokenizer.enable_padding()
batch_tokenizer.enable_truncation(max_length=256)


def embed(texts):
    encodings = batch_tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    with torch.no_grad():
        return model(ids, mask).float()


def extract(text):
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    ranges, start = [], 0
    while offsets:
        end = min(start + 200, len(offsets))
        ranges.append((offsets[start][0], offsets[end - 1][1]))
        if end == len(offsets):
            break
        start += 168
    chunks = [text[a:b] for a, b in ranges] or [text]
    vectors = embed(chunks).tolist()
    return {
        "text": text,
        "chunks": [{"index": i, "text": c, "embedding": v} for i, (c, v) in enumerate(zip(chunks, vectors))],
    }


label_cache = {}


def classify(text, labels):
    key = tuple(labels)
    if key not in label_cache:
        label_cache[key] = embed([f"This text is a {label}." for label in labels])
    scores = torch.softmax((embed([text]) @ label_cache[key].T) / 0.05, dim=1)[0].tolist()
    ranked = sorted(zip(labels, scores), key=lambda pair: -pair[1])
    return {"label": ranked[0][0], "scores": [{"label": l, "score": s} for l, s in ranked]}


async def handler(job):
    job_input = job["input"]
    task = job_input.get("task", "echo")
    if task == "echo":
        await asyncio.sleep(job_input.get("sleep_ms", 0) / 1000)
        return job_input
    if task == "classify":
        return classify(job_input["text"], job_input["labels"])
    if task == "extract":
        return extract(job_input["document"]["text"])
    return {"error": f"unknown task {task}"}


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: CONCURRENCY})
