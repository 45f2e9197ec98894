"""The official `openai` Python client against `runpod-worker local`'s OpenAI-compatible route.

Usage: python tests/interop/openai_client.py path/to/runpod-worker
Points `openai.OpenAI` at `local`'s `/v2/local/openai/v1` (as a user points it at the platform's
`…/v2/{endpoint}/openai/v1`): embeddings in both encodings, token arrays, the model list, and
OpenAI's errors for an over-long input and an unknown model. The embeddings must equal what
`extract` returns for the same text.
"""

import json
import math
import signal
import sys
import urllib.request

from openai import BadRequestError, OpenAI

from sdk_client import start_local

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by twelve percent."]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def extract_embedding(base, text):
    """The embedding `extract` gives a one-chunk document."""
    request = urllib.request.Request(
        f"{base}/v2/local/runsync",
        data=json.dumps({"input": {"task": "extract", "document": {"text": text}}}).encode(),
        headers={"Authorization": "Bearer interop-key", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        body = json.load(response)
    assert body["status"] == "COMPLETED", body
    chunks = body["output"]["chunks"]
    assert len(chunks) == 1, chunks
    return chunks[0]["embedding"]


def main():
    proc, base, _health, _curl = start_local(sys.argv[1])
    try:
        client = OpenAI(base_url=f"{base}/v2/local/openai/v1", api_key="interop-key", max_retries=0)

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
            similarity = cosine(item.embedding, extract_embedding(base, text))
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
        print("OpenAI client interop: embeddings (base64 and float, = extract's), token arrays, "
              "models, and OpenAI's errors OK")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, f"local exited {code} after SIGTERM"


if __name__ == "__main__":
    main()
