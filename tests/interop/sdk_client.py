"""The official runpod SDK (1.12.0) as an endpoint client against `runpod-worker local`.

Usage: python tests/interop/sdk_client.py path/to/runpod-worker
Starts `local` on free ports, then drives it through runpod.Endpoint: run_sync, run + status +
output, stream, cancel, and an error result, which the SDK must see as the job's output. Every
result comes from the Rust worker.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import runpod


def start_local(binary):
    env = dict(os.environ, RUNPOD_AI_API_KEY="interop-key")
    env.pop("RUNPOD_ENDPOINT_ID", None)
    proc = subprocess.Popen(
        [binary, "local", "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    base = health = curl = None
    for line in proc.stdout:
        if line.strip().startswith("curl "):
            curl = line.strip()
        match = re.match(r"listening on (http://\S+)", line)
        if match:
            base = match.group(1)
        match = re.match(r"\s+worker:\s+(http://\S+)", line)
        if match:
            health = match.group(1)
        if curl:
            break
    if base is None or health is None or curl is None:
        proc.kill()
        sys.exit("local did not print its addresses and curl example")
    return proc, base, health, curl


def wait_until(check, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def main():
    binary = sys.argv[1]
    proc, base, health_url, curl = start_local(binary)
    try:
        # The banner's curl line works as printed.
        printed = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout)
        assert printed["status"] == "COMPLETED" and printed["output"]["message"] == "hello", printed

        runpod.api_key = "interop-key"
        runpod.endpoint_url_base = base + "/v2"
        endpoint = runpod.Endpoint("local")

        output = endpoint.run_sync({"task": "echo", "message": "héllo"}, timeout=30)
        assert output == {"task": "echo", "message": "héllo"}, output

        job = endpoint.run({"task": "echo", "sleep_ms": 200})
        assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), job.status()
        assert job.output(timeout=30) == {"task": "echo", "sleep_ms": 200}
        assert job.status() == "COMPLETED"

        failed = endpoint.run({"task": "no-such-task"})
        output = failed.output(timeout=30)
        assert failed.status() == "FAILED", failed.status()
        assert output["error_type"] == "InvalidInput", output
        assert output["success"] is False and "retry_after" not in output, output
        streamed = endpoint.run({"task": "echo", "stream": 3, "sleep_ms": 500})
        chunks = list(streamed.stream())
        assert chunks == [{"chunk": i, "of": 3} for i in range(3)], chunks
        assert streamed.status() == "COMPLETED"

        doomed = endpoint.run({"task": "echo", "sleep_ms": 60000})
        wait_until(lambda: doomed.status() == "IN_PROGRESS", "the job to start")
        doomed.cancel()
        assert doomed.status() == "CANCELLED", doomed.status()

        def worker_cancelled():
            with urllib.request.urlopen(health_url) as response:
                return json.load(response)["jobs"]["cancelled"] == 1

        wait_until(worker_cancelled, "the worker to abandon the cancelled job")
        print("SDK client interop: run_sync, run/status/output, stream, cancel and error results OK")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, f"local exited {code} after SIGTERM"


if __name__ == "__main__":
    main()
