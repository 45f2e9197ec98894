// The official JavaScript client (npm `runpod-sdk` 1.1.2) against `runpod-worker local`.
//
// Usage: node tests/interop/js/sdk_client.mjs path/to/runpod-worker
// (after `npm ci --prefix tests/interop/js`). Starts `local` on free ports, then drives it
// through the SDK's endpoint: run + status, runSync of a job that outlasts the sync wait
// (the SDK then polls /status-sync), stream, an error result, cancel, health and purge.
// Every result comes from the Rust worker. Mirrors ../sdk_client.py.

import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import assert from "node:assert/strict";
import runpodSdk from "runpod-sdk";

const KEY = "interop-js-key";

// Only echo, and the worker holding no more jobs than echo runs at once (4): the shipped file
// lets classify's batched jobs wait 32 at a time, and the worker takes what any handler could
// start, so the purge check's two extra echo jobs would be taken instead of staying queued.
function echoConfig() {
  const dir = mkdtempSync(join(tmpdir(), "interop-js-"));
  const file = join(dir, "runpod.toml");
  writeFileSync(file, '[handler]\nmax_concurrency = 4\n[handlers.echo]\nmax_concurrency = 4\ndevice = "cpu"\n');
  return file;
}

function startLocal(binary) {
  const env = { ...process.env, RUNPOD_AI_API_KEY: KEY };
  delete env.RUNPOD_ENDPOINT_ID;
  const args = ["local", "--port", "0", "--http-port", "0", "--config", echoConfig()];
  const proc = spawn(binary, args, {
    env,
    stdio: ["ignore", "pipe", "ignore"],
  });
  return new Promise((resolve, reject) => {
    let base = null;
    let health = null;
    const lines = createInterface({ input: proc.stdout });
    lines.on("line", (line) => {
      const listening = line.match(/^listening on (http:\/\/\S+)/);
      if (listening) base = listening[1];
      const worker = line.match(/^\s+worker:\s+(http:\/\/\S+)/);
      if (worker) health = worker[1];
      if (base && health) resolve({ proc, base, health });
    });
    proc.on("exit", (code) => reject(new Error(`local exited ${code} before its banner`)));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitUntil(check, what, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function main() {
  const binary = process.argv[2];
  const { proc, base, health } = await startLocal(binary);
  const exited = new Promise((resolve) => proc.on("exit", (code) => resolve(code)));
  try {
    const endpoint = runpodSdk(KEY, { baseUrl: `${base}/v2` }).endpoint("local");
    const statusOf = async (id) => (await endpoint.status(id)).status;

    // run + status
    const queued = await endpoint.run({ input: { task: "echo", message: "héllo" } });
    assert.equal(queued.status, "IN_QUEUE", JSON.stringify(queued));
    let done;
    await waitUntil(async () => (done = await endpoint.status(queued.id)).completed, "the run job");
    assert.equal(done.status, "COMPLETED");
    assert.deepEqual(done.output, { task: "echo", message: "héllo" });

    // runSync of a 2.5 s job with a 1.5 s timeout: /runsync?wait=1500 answers IN_PROGRESS,
    // then the SDK polls /status-sync/{id}?wait= until the job ends.
    const sync = await endpoint.runSync({ input: { task: "echo", sleep_ms: 2500 } }, 1500);
    assert.equal(sync.status, "COMPLETED", JSON.stringify(sync));
    assert.equal(sync.completed, true);
    assert.deepEqual(sync.output, { task: "echo", sleep_ms: 2500 });

    // stream: each chunk once, in order
    const streamed = await endpoint.run({ input: { task: "echo", stream: 3, sleep_ms: 500 } });
    const chunks = [];
    for await (const chunk of endpoint.stream(streamed.id)) chunks.push(chunk.output);
    assert.deepEqual(chunks, [0, 1, 2].map((i) => ({ chunk: i, of: 3 })));
    assert.equal(await statusOf(streamed.id), "COMPLETED");

    // an error result is FAILED, with the error object as its output
    const failing = await endpoint.run({ input: { task: "no-such-task" } });
    let failed;
    await waitUntil(async () => (failed = await endpoint.status(failing.id)).completed, "the failing job");
    assert.equal(failed.status, "FAILED");
    assert.equal(failed.output.error_type, "InvalidInput", JSON.stringify(failed));

    // cancel: the worker is told to stop and abandons the job
    const doomed = await endpoint.run({ input: { task: "echo", sleep_ms: 60000 } });
    await waitUntil(async () => (await statusOf(doomed.id)) === "IN_PROGRESS", "the job to start");
    assert.deepEqual(await endpoint.cancel(doomed.id), { id: doomed.id, status: "CANCELLED" });
    assert.equal(await statusOf(doomed.id), "CANCELLED");
    await waitUntil(
      async () => (await (await fetch(health)).json()).jobs.cancelled === 1,
      "the worker to abandon the cancelled job",
    );

    // purge: fill the worker (echo runs 4 at once), queue two more, purge those two
    const busy = [];
    for (let i = 0; i < 4; i++) busy.push((await endpoint.run({ input: { task: "echo", sleep_ms: 60000 } })).id);
    await waitUntil(
      async () => (await Promise.all(busy.map(statusOf))).every((s) => s === "IN_PROGRESS"),
      "the worker to hold four jobs",
    );
    const waiting = [];
    for (let i = 0; i < 2; i++) waiting.push((await endpoint.run({ input: { task: "echo" } })).id);
    const health1 = await endpoint.health();
    assert.equal(health1.jobs.inQueue, 2, JSON.stringify(health1));
    assert.equal(health1.jobs.inProgress, 4, JSON.stringify(health1));
    assert.equal(health1.workers.running, 1, JSON.stringify(health1));
    const purged = await endpoint.purgeQueue();
    assert.equal(purged.removed, 2, JSON.stringify(purged));
    assert.deepEqual([...purged.ids].sort(), [...waiting].sort());
    for (const id of busy) await endpoint.cancel(id);

    // health
    const health2 = await endpoint.health();
    assert.equal(health2.jobs.inQueue, 0, JSON.stringify(health2));
    assert.ok(health2.jobs.completed >= 3, JSON.stringify(health2));
    assert.equal(health2.workers.ready, 1, JSON.stringify(health2));
    console.log(
      "JS SDK client interop: run/status, runSync past the wait (status-sync), stream, error results, cancel, health and purge OK",
    );
  } finally {
    proc.kill("SIGTERM");
  }
  // The timer must not keep Node alive once local has exited (it did, for its full 30 s).
  const timeout = new Promise((r) => setTimeout(() => r("timeout"), 30000).unref());
  const code = await Promise.race([exited, timeout]);
  assert.equal(code, 0, `local exited ${code} after SIGTERM`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
