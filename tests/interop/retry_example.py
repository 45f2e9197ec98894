"""Runs docs/examples/retry_after.py against `runpod-worker local` on a simulated GPU that is
full when the job arrives: the worker answers the retry signal, the example waits
`retry_after` and submits again, memory is free by then, and the job completes.

Usage: python tests/interop/retry_example.py path/to/runpod-worker
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import runpod

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("retry_after", ROOT / "docs/examples/retry_after.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    binary = sys.argv[1]
    work = pathlib.Path(tempfile.mkdtemp())
    load = work / "gpu-load"
    load.write_text("20GB")  # others use most of the card
    config = work / "runpod.toml"
    config.write_text(
        f"""
[gpu]
simulate = "24GB"
external_load_file = "{load}"
retry_after_min_s = 1
retry_after_max_s = 2
[queue]
spool_dir = "{work / 'spool'}"
[handlers.echo]
max_concurrency = 1
device = "cuda"
gpu_memory = "6GB"
# A CPU handler beside it, as in the seed's mix: the worker keeps taking jobs while the GPU is
# squeezed (with GPU handlers only, jobs would simply wait in the queue until memory frees).
[handlers.cpu]
kind = "echo"
max_concurrency = 1
device = "cpu"
"""
    )
    env = dict(os.environ, RUNPOD_AI_API_KEY="example-key")
    env.pop("RUNPOD_ENDPOINT_ID", None)
    proc = subprocess.Popen(
        [binary, "local", "--port", "0", "--http-port", "0", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        base = None
        for line in proc.stdout:
            match = re.match(r"listening on (http://\S+)", line)
            if match:
                base = match.group(1)
                break
        if base is None:
            sys.exit("local did not print its address")
        runpod.api_key = "example-key"
        runpod.endpoint_url_base = base + "/v2"
        signals = []

        def memory_comes_free(signal):
            signals.append(signal)
            load.write_text("0GB")

        example = load_example()
        output = example.run_with_retries(
            runpod.Endpoint("local"), {"task": "echo", "message": "hello"}, on_retry=memory_comes_free
        )
        assert output == {"task": "echo", "message": "hello"}, output
        assert len(signals) == 1, signals
        signal = signals[0]
        assert signal["success"] is False and 1 <= signal["retry_after"] <= 2, signal
        print(f"retry example: one retry signal ({signal['retry_after']} s), then the job completed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
