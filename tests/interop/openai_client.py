"""The official `openai` Python client against the worker's two OpenAI-compatible routes.

Usage: python tests/interop/openai_client.py path/to/runpod-worker
Points `openai.OpenAI` at `local`'s `/v2/local/openai/v1` (as a user points it at the platform's
`…/v2/{endpoint}/openai/v1`), then at a load-balancing worker's own `/v1` (`serve
--load-balancing`, as a user points it at `https://ENDPOINT_ID.api.runpod.ai/v1`): embeddings in
both encodings, token arrays, the model list, and OpenAI's errors for an over-long input and an
unknown model. The embeddings must equal what `extract` returns for the same text.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from openai import BadRequestError, OpenAI

from sdk_client import start_local

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by twelve percent."]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def extract_embedding(runsync, text):
    """The embedding `extract` gives a one-chunk document, through `runsync` (a URL)."""
    request = urllib.request.Request(
        runsync,
        data=json.dumps({"input": {"task": "extract", "document": {"text": text}}}).encode(),
        headers={"Authorization": "Bearer interop-key", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        body = json.load(response)
    assert body["status"] == "COMPLETED", body
    chunks = body["output"]["chunks"]
    assert len(chunks) == 1, chunks
    return chunks[0]["embedding"]


def check(client, runsync):
    """Everything a user of the client meets, against one route."""
    # The client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=MODEL, input=TEXTS)
    assert default.model == MODEL, default.model
    assert [d.index for d in default.data] == [0, 1]
    assert all(len(d.embedding) == 384 for d in default.data)
    assert default.usage.prompt_tokens > 0
    assert default.usage.total_tokens == default.usage.prompt_tokens
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    for a, b in zip(default.data, floats.data):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6

    for text, item in zip(TEXTS, floats.data):
        similarity = cosine(item.embedding, extract_embedding(runsync, text))
        assert similarity >= 0.9999, (text, similarity)

    # Token ids of the model's vocabulary: "hello world".
    tokens = client.embeddings.create(model=MODEL, input=[[7592, 2088]], encoding_format="float")
    text = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert cosine(tokens.data[0].embedding, text.data[0].embedding) >= 0.9999

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL], models

    try:
        client.embeddings.create(model=MODEL, input="word " * 400)
        sys.exit("an input over 256 tokens was embedded")
    except BadRequestError as error:
        assert error.status_code == 400
        assert "maximum context length is 256 tokens" in str(error), error
        assert error.body["type"] == "invalid_request_error", error.body
    try:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
        sys.exit("an unknown model was served")
    except BadRequestError as error:
        assert "does not exist" in str(error), error


def start_load_balancing(binary):
    """`serve --load-balancing` on a free port, ready (its ping answers 200)."""
    env = dict(os.environ, PORT="0", PORT_HEALTH="0", RUNPOD_WORKER_HOST="127.0.0.1",
               RUNPOD_AI_API_KEY="interop-key", RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true")
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_ENDPOINT_ID", "HEALTH_CHECK_PATH"):
        env.pop(name, None)
    proc = subprocess.Popen([binary, "serve", "--load-balancing", "--config", "runpod.toml"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    match = re.match(r"listening on (http://\S+)", proc.stdout.readline())
    if not match:
        proc.kill()
        sys.exit("serve --load-balancing did not print its address")
    base = match.group(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/ping") as response:
                if response.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    sys.exit("the load-balancing worker never answered its ping with 200")


def stop(proc, what):
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert code == 0, f"{what} exited {code} after SIGTERM"


def main():
    proc, base, _health, _curl = start_local(sys.argv[1])
    try:
        client = OpenAI(base_url=f"{base}/v2/local/openai/v1", api_key="interop-key", max_retries=0)
        check(client, f"{base}/v2/local/runsync")
    finally:
        stop(proc, "local")
    proc, base = start_load_balancing(sys.argv[1])
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="interop-key", max_retries=0)
        check(client, f"{base}/runsync")
    finally:
        stop(proc, "serve --load-balancing")
    print("OpenAI client interop (the queue's OpenAI route and a load-balancing worker's /v1): "
          "embeddings (base64 and float, = extract's), token arrays, models, and OpenAI's errors OK")


if __name__ == "__main__":
    main()
