"""Submit a job with the official runpod SDK and honour the worker's retry signal.

When GPU memory is short the worker answers at once with
{"success": false, "error_type": "InsufficientGPUMemory", "retry_after": N}: the job failed
without running, and submitting it again after N seconds is the right move. Any other error
is final (an `InvalidInput` fails the same way every time).

    pip install runpod==1.12.0
    make run                       # in another shell: `local` on http://127.0.0.1:8000
    RUNPOD_API_KEY=<the key local printed> python docs/examples/retry_after.py http://127.0.0.1:8000
"""

import os
import sys
import time

import runpod


def run_with_retries(endpoint, job_input, attempts=5, on_retry=None):
    """The job's output, submitting it again while the worker gives the retry signal."""
    for _ in range(attempts):
        job = endpoint.run(job_input)
        output = job.output(timeout=120)
        if isinstance(output, dict) and output.get("error_type") == "InsufficientGPUMemory":
            if on_retry:
                on_retry(output)
            print(f"no GPU memory now; retrying in {output['retry_after']} s", file=sys.stderr)
            time.sleep(output["retry_after"])
            continue
        return output
    raise RuntimeError(f"still no GPU memory after {attempts} attempts")


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    runpod.api_key = os.environ["RUNPOD_API_KEY"]
    runpod.endpoint_url_base = base + "/v2"
    endpoint = runpod.Endpoint(os.environ.get("RUNPOD_ENDPOINT_ID", "local"))
    print(run_with_retries(endpoint, {"task": "echo", "message": "hello"}))


if __name__ == "__main__":
    main()
