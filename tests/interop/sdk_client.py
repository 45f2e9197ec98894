"""The official runpod SDK (1.12.0) as an endpoint client against `runpod-worker local`.

Usage: python tests/interop/sdk_client.py path/to/runpod-worker
Starts `local` on free ports, then drives it through runpod.Endpoint: run_sync, run + status +
output, and an error result, which the SDK must see as the job's output.
"""

import os
import re
import signal
import subprocess
import sys

import runpod


def start_local(binary):
    env = dict(os.environ, RUNPOD_AI_API_KEY="interop-key")
    env.pop("RUNPOD_ENDPOINT_ID", None)
    proc = subprocess.Popen(
        [binary, "local", "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    base = None
    for line in proc.stdout:
        match = re.match(r"listening on (http://\S+)", line)
        if match:
            base = match.group(1)
        if line.startswith("Submit a job"):
            break
    if base is None:
        proc.kill()
        sys.exit("local did not print its address")
    return proc, base


def main():
    binary = sys.argv[1]
    proc, base = start_local(binary)
    try:
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
        print("SDK client interop: run_sync, run/status/output and error results OK")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, f"local exited {code} after SIGTERM"


if __name__ == "__main__":
    main()
