#!/usr/bin/env python3
"""Checks the RunPod Hub listing in .runpod/ against the Hub's format and against the worker.

    python3 tests/hub/check_hub.py target/debug/runpod-worker    (from the repo root; make test)
    python3 tests/hub/check_hub.py --write-dockerfile             (regenerates .runpod/Dockerfile)

The format is RunPod's "Hub publishing guide" (docs.runpod.io/hub/publishing-guide): hub.json's
metadata and config, tests.json's tests and test endpoint. Beyond the format it checks what the
Hub cannot: every env key is one the worker reads, the values the Hub's form pre-fills are the
ones the chosen config file would give anyway, and every test input succeeds in
`runpod-worker test-input` under the test endpoint's config. Standard library only.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / ".runpod"
# The default image, uncompressed, as `make image-test` measured it; the container disk must
# hold it (the baked models add about 90 MB) and leave as much again for the rest.
IMAGE_MB = 3854
# The pools gpuIds may name, with the GPU ids in each (docs.runpod.io/references/gpu-types#gpu-pools).
# Add a pool here before listing it in gpuIds.
POOLS = {
    "ADA_24": ["NVIDIA GeForce RTX 4090"],
    "AMPERE_24": ["NVIDIA L4", "NVIDIA RTX A5000", "NVIDIA GeForce RTX 3090"],
}
# The env keys that override a config key, for comparing the form's values with the files'.
KNOBS = {
    "RUNPOD_MODEL_DIR": ("handler", "model_dir"),
    "RUNPOD_MAX_CONCURRENCY": ("handler", "max_concurrency"),
    "RUNPOD_GPU_MEMORY_PER_REQUEST": ("handler", "gpu_memory_per_request"),
    "RUNPOD_LOCAL_QUEUE_MAX_WAIT_S": ("handler", "local_queue_max_wait_s"),
    "RUNPOD_EXECUTION_TIMEOUT": ("handler", "execution_timeout"),
    "RUNPOD_MAX_BATCH_ROWS": ("batching", "max_batch_rows"),
    "RUNPOD_MAX_BATCH_TOKENS": ("batching", "max_batch_tokens"),
    "RUNPOD_MAX_BATCH_DELAY_US": ("batching", "max_batch_delay_us"),
    "RUNPOD_GPU_HEADROOM": ("gpu", "headroom"),
}
INPUT_TYPES = {"string": str, "number": (int, float), "boolean": bool, "huggingface": str}

failures = []


def check(ok, what, why=""):
    print(f"ok: {what}" if ok else f"FAIL: {what}{': ' + why if why else ''}")
    if not ok:
        failures.append(what)
    return ok


def hub_dockerfile():
    """The Hub builds .runpod/Dockerfile, not the root one: the same image with the models baked
    in (a Hub endpoint, the test endpoint included, has no network volume to read them from)
    and the test endpoint's config added. Generated, so the two cannot drift."""
    root = (ROOT / "Dockerfile").read_text()
    if "ARG MODELS=volume\n" not in root:
        return None
    return (
        "# GENERATED from ../Dockerfile by `python3 tests/hub/check_hub.py --write-dockerfile`: the\n"
        "# RunPod Hub builds this file. The same image with the models baked in (MODELS=baked)\n"
        "# and the config of the Hub's test endpoint. Edit ../Dockerfile, then regenerate.\n\n"
        + root.replace("ARG MODELS=volume\n", "ARG MODELS=baked\n")
        + "\n# The Hub's test endpoint (.runpod/tests.json): every handler of handler/test_inputs/.\n"
        "COPY .runpod/runpod-hub-tests.toml /etc/runpod-worker/\n"
    )


def image_files(dockerfile):
    """Image path -> repo file, for what the Dockerfile's COPY lines put in /etc/runpod-worker."""
    files = {}
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        *sources, dest = [w for w in words[1:] if not w.startswith("--")]
        if not dest.startswith("/etc/runpod-worker"):
            continue
        for source in sources:
            for path in sorted(ROOT.glob(source.rstrip("/"))):
                members = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
                for member in members:
                    files[dest + member.name if dest.endswith("/") else dest] = member
    return files


def effective(config_file):
    """[handler], [gpu] and [batching] as the worker sees them: the file over the built-in
    defaults (runpod.toml is kept equal to them)."""
    base = tomllib.loads((ROOT / "runpod.toml").read_text())
    over = tomllib.loads(config_file.read_text())
    return {s: {**base.get(s, {}), **over.get(s, {})} for s in ("handler", "gpu", "batching")}


def check_hub_json(hub, files):
    config = hub.get("config", {})
    check(all(isinstance(hub.get(k), str) and hub[k] for k in ("title", "description")),
          "hub.json has a title and a description")
    check(hub.get("type") == "serverless" and hub.get("category") == "embedding",
          "hub.json: type serverless, category embedding")
    check(str(hub.get("iconUrl", "")).startswith("https://"), "hub.json: iconUrl is an https URL")
    check(config.get("runsOn") == "GPU", "hub.json: runsOn GPU")
    disk = config.get("containerDiskInGb")
    check(isinstance(disk, int) and disk * 1000 >= 2 * IMAGE_MB,
          f"hub.json: containerDiskInGb ({disk}) holds twice the {IMAGE_MB} MB image")
    check(isinstance(config.get("gpuCount"), int) and config["gpuCount"] >= 1, "hub.json: gpuCount")
    pools = [p.strip() for p in str(config.get("gpuIds", "")).split(",") if p.strip()]
    unknown = [p for p in pools if not p.startswith("-") and p not in POOLS]
    check(pools and not unknown, "hub.json: gpuIds names known GPU pools", f"unknown {unknown}")

    # The torch wheel's CUDA is the oldest the host's driver may support (a CUDA 13 wheel
    # needs driver 580+); a host allowed below it would fall back to the CPU.
    torch_version = sorted(ROOT.glob(".venv/lib/python3*/site-packages/torch/version.py"))
    found = torch_version and re.search(r"^cuda\b.*= '(\d+\.\d+)'", torch_version[0].read_text(), re.M)
    wheel_cuda = found[1] if found else "(torch is not in .venv)"

    def at_least_wheel(v):
        return (isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v) and found
                and tuple(map(int, v.split("."))) >= tuple(map(int, wheel_cuda.split("."))))

    cuda = config.get("allowedCudaVersions")
    wrong = [v for v in cuda or [] if not at_least_wheel(v)]
    check(isinstance(cuda, list) and cuda and not wrong,
          f"hub.json: allowedCudaVersions {cuda} are all >= the torch wheel's CUDA {wheel_cuda}",
          f"not: {wrong}")

    env = config.get("env", [])
    keys = [e.get("key") for e in env]
    check(len(keys) == len(set(keys)) and all(isinstance(k, str) and k for k in keys),
          "hub.json: env keys are unique strings")
    bad = []
    for e in env:
        spec = e.get("input")
        if spec is None:
            if not isinstance(e.get("value"), str):
                bad.append(f"{e.get('key')}: neither input nor a string value")
            continue
        kind = INPUT_TYPES.get(spec.get("type"))
        if kind is None or not spec.get("name") or not spec.get("description"):
            bad.append(f"{e['key']}: needs name, description and a type of {sorted(INPUT_TYPES)}")
        elif "default" in spec and not isinstance(spec["default"], kind):
            bad.append(f"{e['key']}: default {spec['default']!r} is not a {spec['type']}")
        options = [o["value"] for o in spec.get("options", []) if o.get("label") and "value" in o]
        if len(options) != len(spec.get("options", [])):
            bad.append(f"{e['key']}: every option needs a label and a value")
        elif options and spec.get("default", options[0]) not in options:
            bad.append(f"{e['key']}: the default is not one of the options")
    check(not bad, "hub.json: every env entry is a static value or a well-formed input",
          "; ".join(bad))

    # A key the worker does not read is silently ignored on the platform: a typo, or a knob
    # the code dropped. Every key must appear as a string literal in the Rust sources.
    sources = "".join(p.read_text() for d in ("src", "crates") for p in (ROOT / d).rglob("*.rs"))
    unread = [k for k in keys if f'"{k}"' not in sources]
    check(not unread, f"every env key ({len(keys)}) is read by the worker's Rust sources",
          f"no \"KEY\" literal for {', '.join(unread)}")

    # The Hub pre-fills the deploy form with the inputs' defaults, overlaid by the chosen
    # preset, and sets them all. Each must be what the chosen config file gives anyway, or the
    # form would silently override a profile (e.g. its "all" per request with "6GB").
    form = {e["key"]: e["input"]["default"] for e in env if "default" in e.get("input", {})}
    form.update({e["key"]: e["value"] for e in env if "value" in e})
    presets = config.get("presets", [])
    check(presets and all(p.get("name") and isinstance(p.get("defaults"), dict) for p in presets),
          f"hub.json: {len(presets)} presets, each with a name and defaults")
    forms = [("no preset", form)]
    forms += [(p.get("name"), {**form, **p.get("defaults", {})}) for p in presets]
    for name, values in forms:
        stray = set(values) - set(keys)
        path = values.get("RUNPOD_WORKER_CONFIG")
        if not check(not stray and path in files, f"{name}: config {path} is in the image",
                     f"keys not in env: {sorted(stray)}" if stray else
                     ".runpod/Dockerfile copies no such file into /etc/runpod-worker"):
            continue
        config_values = effective(files[path])
        differ = []
        for key, (section, option) in KNOBS.items():
            # The presets keep the Hub image's own models; the profiles name the network volume's.
            if key == "RUNPOD_MODEL_DIR" and name != "no preset":
                continue
            want, got = config_values[section].get(option), values.get(key)
            if (None if want is None else str(want)) != (None if got is None else str(got)):
                differ.append(f"{key}={got!r} but {section}.{option}={want!r}")
        check(not differ, f"{name}: the form's values are {files[path].relative_to(ROOT)}'s",
              "; ".join(differ))
    return keys


def check_tests_json(tests, hub, keys, files, binary):
    config = tests.get("config", {})
    pools = str(hub["config"].get("gpuIds", "")).split(",")
    members = [gpu for pool in pools for gpu in POOLS.get(pool.strip(), [])]
    check(config.get("gpuTypeId") in members and isinstance(config.get("gpuCount"), int),
          f"tests.json: the test GPU {config.get('gpuTypeId')!r} is in hub.json's pools, with a gpuCount")
    check(config.get("allowedCudaVersions") == hub["config"].get("allowedCudaVersions"),
          "tests.json: allowedCudaVersions as hub.json's")
    env = {e.get("key"): e.get("value") for e in config.get("env", [])}
    check(set(env) <= set(keys) and all(isinstance(v, str) for v in env.values()),
          "tests.json: env is string values of hub.json's keys")

    # The tests are the samples of handler/test_inputs/, named by file, so they cannot drift.
    samples = {f.stem: json.loads(f.read_text())["input"]
               for f in sorted((ROOT / "handler/test_inputs").glob("*.json"))}
    listed = {t.get("name"): t.get("input") for t in tests.get("tests", [])}
    check(listed == samples, f"tests.json: the tests are handler/test_inputs/ ({', '.join(samples)})",
          f"differ: {sorted(k for k in set(listed) | set(samples) if listed.get(k) != samples.get(k))}")
    check(all(isinstance(t.get("timeout"), int) and t["timeout"] > 0 for t in tests.get("tests", [])),
          "tests.json: every test has a timeout in ms")

    # Each test runs as the Hub runs it: the test endpoint's config file from the image, with
    # its image paths (models, parser) swapped for this checkout's, and its env.
    path = env.get("RUNPOD_WORKER_CONFIG")
    if not check(path in files, f"tests.json: config {path} is in the image"):
        return
    text = re.sub(r'(?m)^model_dir\s*=.*$', f'model_dir = "{ROOT / "handler/models"}"',
                  files[path].read_text())
    text = re.sub(r'(?m)^parser\s*=.*$', "", text)
    run_env = {k: v for k, v in os.environ.items()
               if not k.startswith("RUNPOD_") and k != "MODEL_NAME"}
    run_env.update({k: v for k, v in env.items() if k != "RUNPOD_WORKER_CONFIG"})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.toml").write_text(text)
        for test in tests.get("tests", []):
            job = Path(tmp) / f"{test['name']}.json"
            job.write_text(json.dumps({"input": test["input"]}))
            command = [binary, "test-input", "--file", job, "--config", Path(tmp) / "config.toml"]
            try:
                out = subprocess.run(command, capture_output=True, text=True, env=run_env, cwd=tmp,
                                     timeout=test.get("timeout", 60000) / 1000)
            except subprocess.TimeoutExpired:
                check(False, f"test {test['name']} succeeds in runpod-worker test-input", "timed out")
                continue
            # test-input prints the job-done body last: success is an `output` and no `error`.
            try:
                last = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                last = {}
            check(out.returncode == 0 and "output" in last and "error" not in last,
                  f"test {test['name']} succeeds in runpod-worker test-input",
                  f"exit {out.returncode}: {out.stdout[-400:]}{out.stderr[-400:]}")


def main():
    expected = hub_dockerfile()
    if sys.argv[1:] == ["--write-dockerfile"]:
        if expected is None:
            sys.exit("the root Dockerfile has no `ARG MODELS=volume` line to bake the models with")
        (HUB / "Dockerfile").write_text(expected)
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = str(Path(sys.argv[1]).resolve())

    # The files the Hub needs, in .runpod/ or at the root (.runpod/ takes precedence).
    for name in ("hub.json", "tests.json", "Dockerfile", "README.md"):
        at_root = name in ("Dockerfile", "README.md") and (ROOT / name).is_file()
        check((HUB / name).is_file() or at_root, f"the Hub's {name} is present")
    built = (HUB / "Dockerfile").read_text() if (HUB / "Dockerfile").is_file() else ""
    check(expected is not None and built == expected,
          ".runpod/Dockerfile is the root one with the models baked in",
          "run `python3 tests/hub/check_hub.py --write-dockerfile`")
    files = image_files(built)
    hub = json.loads((HUB / "hub.json").read_text())
    tests = json.loads((HUB / "tests.json").read_text())
    keys = check_hub_json(hub, files)
    check_tests_json(tests, hub, keys, files, binary)
    print(f"{len(failures)} check(s) failed" if failures else "all Hub checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
