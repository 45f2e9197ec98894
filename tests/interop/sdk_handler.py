"""A worker built on the official runpod SDK, for the interop test against our mock queue.

An async generator handler: `stream: N` yields N chunks; anything else yields one echo. With
return_aggregate_stream the final output is the list of everything yielded. Concurrency 3, so
the SDK asks for jobs with job-take-batch.
"""

import asyncio

import runpod


async def handler(job):
    job_input = job["input"]
    await asyncio.sleep(job_input.get("sleep", 0))
    count = job_input.get("stream", 0)
    if count:
        for index in range(count):
            yield {"chunk": index}
    else:
        yield {"echo": job_input}


runpod.serverless.start(
    {"handler": handler, "concurrency_modifier": lambda current: 3, "return_aggregate_stream": True}
)
