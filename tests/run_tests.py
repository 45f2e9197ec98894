"""Runs every Rust test binary of the workspace, as `cargo test` would, and prints the slowest
tests at the end.

`cargo test` has no per-test times on a stable toolchain; libtest has them behind
`-Z unstable-options --report-time`, which it allows at run time when `RUSTC_BOOTSTRAP` is set.
So the binaries are built by cargo (`--no-run`, which prints where they are), then run here
one by one, each in its package's directory as cargo runs them, with that variable set for the
test process only (the build never sees it). Doc tests are run by cargo afterwards.

Usage: run_tests.py [--slowest N] [--test-threads N] [--times FILE] -- CARGO_TEST_ARGS...
The slowest tests are also written to FILE, for `make test` to print once everything has run.
Exit status: 0 when every test passed, 1 otherwise.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def test_binaries(cargo_args):
    """(name, executable, package dir) of each test binary, built by `cargo test --no-run`."""
    command = ["cargo", "test", "--no-run", "--message-format=json-render-diagnostics", *cargo_args]
    built = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if built.returncode != 0:
        sys.exit(built.returncode)
    binaries = []
    for line in built.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") != "compiler-artifact" or not message.get("executable"):
            continue
        if not message["profile"]["test"]:
            continue
        target = message["target"]
        kind = "lib" if target["kind"] == ["lib"] else target["kind"][0]
        name = f"{target['name']} ({kind})"
        binaries.append((name, message["executable"], os.path.dirname(message["manifest_path"])))
    return binaries


def run_binary(name, executable, cwd, threads, times, failures):
    """Runs one binary's tests, printing them as libtest's own output does (`running N tests`,
    `test NAME ... ok <TIME>`, `test result: ...`), so that whatever reads `cargo test` output
    (a person, CI) reads this too; records times and failures."""
    env = dict(os.environ, RUSTC_BOOTSTRAP="1")
    command = [executable, "--test-threads", str(threads),
               "-Z", "unstable-options", "--format", "json", "--report-time"]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    counts = {"ok": 0, "failed": 0, "ignored": 0}
    for line in process.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            print(line, end="")
            continue
        if event.get("type") == "suite" and event.get("event") == "started":
            print(f"\n     Running {name}\n\nrunning {event.get('test_count', 0)} tests", flush=True)
            continue
        if event.get("type") != "test" or event.get("event") == "started":
            continue
        outcome = event["event"]
        counts[outcome] = counts.get(outcome, 0) + 1
        seconds = float(event.get("exec_time", 0.0))
        if outcome != "ignored":
            times.append((seconds, f"{name} {event['name']}"))
        shown = "FAILED" if outcome == "failed" else outcome
        print(f"test {event['name']} ... {shown} <{seconds:.3f}s>", flush=True)
        if outcome == "failed":
            failures.append((f"{name} {event['name']}", event.get("stdout", "")))
    status = process.wait()
    result = "ok" if status == 0 and counts["failed"] == 0 else "FAILED"
    print(f"\ntest result: {result}. {counts['ok']} passed; {counts['failed']} failed; "
          f"{counts['ignored']} ignored; 0 measured; 0 filtered out; "
          f"finished in {time.monotonic() - started:.2f}s", flush=True)
    if status != 0 and counts["failed"] == 0:
        failures.append((name, f"the test binary exited with status {status}"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slowest", type=int, default=10)
    parser.add_argument("--test-threads", type=int, default=2)
    parser.add_argument("--times", help="also write the slowest tests to this file")
    parser.add_argument("cargo_args", nargs="*")
    args = parser.parse_args()

    times, failures = [], []
    for name, executable, cwd in test_binaries(args.cargo_args):
        run_binary(name, executable, cwd, args.test_threads, times, failures)
    doc = subprocess.run(["cargo", "test", "--doc", *args.cargo_args], check=False)
    if doc.returncode != 0:
        failures.append(("doc tests", "cargo test --doc failed"))

    slowest = [f"slowest {args.slowest} of {len(times)} Rust tests:"]
    slowest += [f"  {seconds:7.2f}s  {test}" for seconds, test in sorted(times, reverse=True)[: args.slowest]]
    print("\n" + "\n".join(slowest))
    if args.times:
        with open(args.times, "w", encoding="utf-8") as out:
            out.write("\n".join(slowest) + "\n")
    for test, output in failures:
        print(f"\nFAILED {test}\n{output}")
    if failures:
        print(f"\n{len(failures)} failed")
        sys.exit(1)
    print(f"\nall {len(times)} tests passed")


if __name__ == "__main__":
    main()
