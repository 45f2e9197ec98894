"""The official runpod SDK (1.12.0) as a worker against `runpod-worker mock-queue`.

Usage: python tests/interop/sdk_worker.py path/to/runpod-worker
Starts the mock queue, queues jobs through runpod.Endpoint, then starts an SDK worker
(sdk_handler.py) pointed at the mock. Checks that it takes single and batch jobs, streams, pings,
and that its results reach /status.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import runpod

KEY = "sdk-worker-key"
HERE = os.path.dirname(os.path.abspath(__file__))


def start_mock(binary, log):
    env = dict(os.environ, RUNPOD_AI_API_KEY=KEY)
    env.pop("RUNPOD_ENDPOINT_ID", None)
    proc = subprocess.Popen(
        [binary, "mock-queue", "--port", "0", "--long-poll", "2"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )
    match = re.match(r"listening on (http://\S+)", proc.stdout.readline())
    if not match:
        proc.kill()
        sys.exit("mock-queue did not print its address")
    return proc, match.group(1)


def start_sdk_worker(base, home):
    root = f"{base}/v2/sdk"
    env = dict(
        os.environ,
        RUNPOD_WEBHOOK_GET_JOB=f"{root}/job-take/$ID?gpu=local",
        RUNPOD_WEBHOOK_POST_OUTPUT=f"{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
        RUNPOD_WEBHOOK_POST_STREAM=f"{root}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
        RUNPOD_WEBHOOK_PING=f"{root}/ping/$RUNPOD_POD_ID?gpu=local",
        RUNPOD_AI_API_KEY=KEY,
        RUNPOD_POD_ID="sdk-worker",
        RUNPOD_PING_INTERVAL="1000",
        RUNPOD_SKIP_GPU_CHECK="true",
        RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true",
        RUNPOD_LOG_LEVEL="WARN",
        HOME=home,  # a ~/.runpod/config.toml would override the key
    )
    env.pop("RUNPOD_ENDPOINT_ID", None)
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "sdk_handler.py")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryFile("w+") as log:
        mock, base = start_mock(binary, log)
        worker = None
        try:
            runpod.api_key = KEY
            runpod.endpoint_url_base = base + "/v2"
            endpoint = runpod.Endpoint("sdk")
            # Queued before the worker starts: its first take asks for 3 at once.
            batch = [endpoint.run({"n": i, "sleep": 0.5}) for i in range(3)]
            worker = start_sdk_worker(base, home)

            for i, job in enumerate(batch):
                assert job.output(timeout=60) == [{"echo": {"n": i, "sleep": 0.5}}], job.status()
                assert job.status() == "COMPLETED"

            streamed = endpoint.run({"stream": 3, "sleep": 1})
            chunks = list(streamed.stream())
            assert chunks == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}], chunks
            assert streamed.output(timeout=30) == chunks

            # Two long jobs hold two of the three slots: the next take is a single one.
            busy = [endpoint.run({"n": f"busy{i}", "sleep": 3}) for i in range(2)]
            deadline = time.monotonic() + 30
            while any(job.status() != "IN_PROGRESS" for job in busy):
                assert time.monotonic() < deadline, [job.status() for job in busy]
                time.sleep(0.1)
            single = endpoint.run_sync({"n": "alone"}, timeout=60)
            assert single == [{"echo": {"n": "alone"}}], single
            for job in busy:
                job.output(timeout=30)

            health = endpoint.health()
            assert health["workers"]["ready"] == 1, health  # its pings arrived
            assert health["jobs"]["completed"] == 7, health

            log.seek(0)
            mock_log = log.read()
            assert "job-take-batch by sdk-worker (batch_size=3): 3 job(s)" in mock_log, mock_log
            assert re.search(r"job-take by sdk-worker: 1 job\(s\)", mock_log), mock_log
            print("SDK worker interop: batch and single takes, stream, pings and results OK")
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
            mock.send_signal(signal.SIGTERM)
            mock.wait(timeout=10)


if __name__ == "__main__":
    main()
