#!/usr/bin/env bash
# Builds the image from the real Dockerfile and runs it, without a Docker engine or a registry:
# podman builds on local base images (a debootstrapped Debian for the runtime; the same plus
# this machine's Rust toolchain, copied in, for the builder: no registry needed), then the
# image's file system runs its own binaries through chroot, with only the image's environment
# (`podman run` needs rlimits this sandbox does not allow).
#
# Usage: tests/image/image-test.sh   (from the repository root; as root; `make image-test`)
set -euo pipefail

CACHE=${IMAGE_TEST_CACHE:-/var/tmp/runpod-worker-image}
TAG=localhost/runpod-worker:test
RUNTIME_BASE=localhost/runpod-worker-runtime-base:bookworm
# Named by this machine's toolchain: a new toolchain makes a new builder base.
BUILDER_BASE=localhost/runpod-worker-builder-base:$(rustc --version | awk '{print $2}')
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
    /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

step_start=$SECONDS
step() {
    echo "image-test: $1 ($((SECONDS - step_start)) s)"
    step_start=$SECONDS
}
fail() {
    echo "image-test: FAILED: $*" >&2
    exit 1
}

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap >/dev/null
fi
step "podman $(podman --version | awk '{print $3}') ready"

# What an earlier run built, other than the two bases, is dropped first: a rebuild after any
# source change redoes the whole build anyway, and the old image beside the new one would
# double the disk this needs.
podman rmi -f "$TAG" >/dev/null 2>&1 || true
podman image prune -f >/dev/null
# Disk at the build's peak, measured from empty storage (docs/development.md): the two bases,
# the builder's layer and the image's, each holding the 3.7 GB of libtorch and CUDA libraries,
# and while a layer is committed, podman's temporary copies of it (up to 7.7 GB). Those go to
# memory (/dev/shm) when it has room, which keeps the disk used from 24.7 GB down to 17.9.
free_gb() { df --output=avail -BG "$@" | awk 'NR > 1 {print $1 + 0}' | sort -n | head -1; }
if [ "$(free_gb /dev/shm 2>/dev/null || echo 0)" -ge 10 ]; then
    export TMPDIR=/dev/shm NEED_GB=${IMAGE_TEST_NEED_GB:-20}
else
    export TMPDIR=/var/tmp NEED_GB=${IMAGE_TEST_NEED_GB:-25}
fi
free=$(free_gb /var/lib /var/tmp)
[ "${free:-0}" -ge "$NEED_GB" ] \
    || fail "needs $NEED_GB GB free under /var/lib and /var/tmp (has ${free} GB; podman's temporary files in $TMPDIR)"
step "disk: $free GB free, $NEED_GB GB needed (podman's temporary files in $TMPDIR)"

mkdir -p "$CACHE"
if ! podman image exists "$RUNTIME_BASE"; then
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || fail "debootstrap (see $CACHE/debootstrap.log)"
    tar -C "$CACHE/rootfs" -c . | podman import - "$RUNTIME_BASE" >/dev/null
fi
step "runtime base $RUNTIME_BASE"

if ! podman image exists "$BUILDER_BASE"; then
    sysroot=$(rustc --print sysroot)
    rustc_version=$(rustc --version)
    container=$(podman create "$RUNTIME_BASE" true)
    mount=$(podman mount "$container")
    mkdir -p "$mount/usr/local/rust" "$mount/usr/local/share/ca-certificates"
    cp -a "$sysroot/." "$mount/usr/local/rust/"
    # The registries are reached as this machine reaches them: its extra certificate
    # authorities (an egress proxy's, say) are trusted in the build too, through the bundle
    # the Dockerfile's `ca-certificates` install assembles.
    cp -a /usr/local/share/ca-certificates/. "$mount/usr/local/share/ca-certificates/" 2>/dev/null || true
    podman umount "$container" >/dev/null
    bundle=/etc/ssl/certs/ca-certificates.crt
    podman commit -q \
        --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "ENV PIP_CERT=$bundle" \
        --change "ENV SSL_CERT_FILE=$bundle" \
        --change "ENV CARGO_HTTP_CAINFO=$bundle" \
        "$container" "$BUILDER_BASE" >/dev/null
    podman rm "$container" >/dev/null
    echo "image-test: builder base carries this machine's toolchain: $rustc_version"
fi
step "builder base $BUILDER_BASE"

podman build --isolation chroot --format docker \
    --build-arg BUILDER_IMAGE="$BUILDER_BASE" \
    --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
    --build-arg MODELS=baked \
    -t "$TAG" . >"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log"; fail "podman build (see $CACHE/build.log)"; }
size=$(podman image inspect --format '{{.Size}}' "$TAG")
step "built $TAG: $((size / 1000000)) MB"

container=$(podman create "$TAG")
mount=$(podman mount "$container")
cleanup() {
    [ -n "${local_pid:-}" ] && kill "$local_pid" 2>/dev/null || true
    umount "$mount/proc" 2>/dev/null || true
    podman umount "$container" >/dev/null 2>&1 || true
    podman rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
mount -t proc proc "$mount/proc" 2>/dev/null || echo "image-test: no /proc in the chroot (the parser's CPU limit is not read)"
mapfile -t image_env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$TAG" | sed '/^$/d')
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
in_image() {
    chroot --userspec="$user" "$mount" /usr/bin/env -i "${image_env[@]}" HOME=/home/runpod "$@"
}

in_image runpod-worker --version | grep -q "runpod-worker" || fail "--version"
step "runpod-worker --version: $(in_image runpod-worker --version)"

in_image runpod-worker check-config >"$CACHE/check-config.log" 2>&1 || { cat "$CACHE/check-config.log"; fail "check-config"; }
step "check-config with the image's config: $(head -1 "$CACHE/check-config.log")"

mkdir -p "$mount/tmp/test_inputs"
cp handler/test_inputs/*.json "$mount/tmp/test_inputs/"
chmod -R a+r "$mount/tmp/test_inputs"
for input in handler/test_inputs/*.json; do
    name=$(basename "$input")
    case "$name" in
        example_torchscript.json) continue ;;  # its handler is not in the image's config
    esac
    in_image runpod-worker test-input --file "/tmp/test_inputs/$name" >"$CACHE/test-input-$name.log" 2>&1 \
        || { cat "$CACHE/test-input-$name.log"; fail "test-input $name"; }
done
step "test-input on every handler's input in handler/test_inputs"

in_image runpod-worker gpu-check --simulate 24GB >"$CACHE/gpu-check.log" 2>&1 \
    || { cat "$CACHE/gpu-check.log"; fail "gpu-check --simulate 24GB"; }
step "gpu-check on a simulated GPU: $(tail -1 "$CACHE/gpu-check.log")"

# `exec`: the background job is the worker itself (chroot and env exec too), so the kill below
# and cleanup's reach it. A subshell running `in_image` would be killed instead, and the worker
# inside the image left running after the test (it was, every run).
(exec chroot --userspec="$user" "$mount" /usr/bin/env -i "${image_env[@]}" HOME=/home/runpod \
    RUNPOD_AI_API_KEY=image-key RUNPOD_WORKER_PORT=0 runpod-worker local --port 0) \
    >"$CACHE/local.log" 2>&1 &
local_pid=$!
for _ in $(seq 300); do
    grep -q "^Submit a job" "$CACHE/local.log" && break
    kill -0 "$local_pid" 2>/dev/null || { cat "$CACHE/local.log"; fail "local exited"; }
    sleep 0.2
done
base=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$CACHE/local.log" | head -1)
[ -n "$base" ] || { cat "$CACHE/local.log"; fail "local printed no address"; }
answer=$(curl -s -m 60 -X POST "$base/v2/local/runsync" -H 'Authorization: Bearer image-key' \
    -H 'Content-Type: application/json' \
    -d '{"input": {"task": "classify", "text": "Whisk the eggs and bake for 20 minutes.", "labels": ["recipe", "invoice"]}}')
echo "$answer" | grep -q '"status":"COMPLETED"' || fail "local round trip: $answer"
echo "$answer" | grep -q '"label":"recipe"' || fail "local round trip: $answer"
step "local round trip from outside the image: COMPLETED, label recipe"

# SIGTERM drains and ends the worker itself: nothing of the image stays running.
kill -TERM "$local_pid"
for _ in $(seq 150); do
    kill -0 "$local_pid" 2>/dev/null || break
    sleep 0.2
done
kill -0 "$local_pid" 2>/dev/null && fail "local still runs 30 s after SIGTERM (pid $local_pid)"
wait "$local_pid" || fail "local exited $? after SIGTERM"
leftover=$(pgrep -u "${user%%:*}" -f "runpod-worker local" || true)
[ -z "$leftover" ] || fail "a runpod-worker local of the image's user is still running: $leftover"
local_pid=
step "local stopped on SIGTERM, nothing left running"
# The same image and entrypoint as a load-balancing endpoint's worker: PORT set, no job queue.
(exec chroot --userspec="$user" "$mount" /usr/bin/env -i "${image_env[@]}" HOME=/home/runpod \
    PORT=0 PORT_HEALTH=0 RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true runpod-worker serve) \
    >"$CACHE/balanced.log" 2>&1 &
local_pid=$!
balanced=
for _ in $(seq 300); do
    port=$(sed -n 's/^listening on http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$CACHE/balanced.log" | head -1)
    if [ -n "$port" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" = 200 ]; then
        balanced="http://127.0.0.1:$port"
        break
    fi
    kill -0 "$local_pid" 2>/dev/null || { cat "$CACHE/balanced.log"; fail "serve (load-balancing) exited"; }
    sleep 0.2
done
[ -n "$balanced" ] || { cat "$CACHE/balanced.log"; fail "serve (load-balancing) never answered its ping with 200"; }
answer=$(curl -s -m 60 -X POST "$balanced/runsync" -H 'Content-Type: application/json' \
    -d '{"input": {"task": "classify", "text": "Whisk the eggs and bake for 20 minutes.", "labels": ["recipe", "invoice"]}}')
echo "$answer" | grep -q '"label":"recipe"' || fail "load-balancing round trip: $answer"
kill -TERM "$local_pid"
wait "$local_pid" || fail "serve (load-balancing) exited $? after SIGTERM"
local_pid=
step "load-balancing mode (PORT set, no queue): ping 200, /runsync label recipe, SIGTERM exit 0"

# The sizes a registry would hold: each layer gzip-compressed, as `podman push --compress`
# writes them. The slim variant (CUDA_EXTRAS="": no on-demand CUDA library) reuses the build's
# cached layers; it runs a job too (the CPU path loads none of what it leaves out).
compressed_mb() {
    rm -rf "$CACHE/pushed"
    podman push -q --compress "$1" "dir:$CACHE/pushed" >/dev/null
    local bytes
    bytes=$(du -sb "$CACHE/pushed" | cut -f1)
    rm -rf "$CACHE/pushed"
    echo $((bytes / 1000000))
}
compressed=$(compressed_mb "$TAG")
step "size: $((size / 1000000)) MB uncompressed, $compressed MB compressed"
podman build --isolation chroot --format docker \
    --build-arg BUILDER_IMAGE="$BUILDER_BASE" \
    --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
    --build-arg MODELS=baked \
    --build-arg CUDA_EXTRAS= \
    -t "$TAG-slim" . >"$CACHE/build-slim.log" 2>&1 || { tail -30 "$CACHE/build-slim.log"; fail "podman build, slim"; }
slim_size=$(podman image inspect --format '{{.Size}}' "$TAG-slim")
slim_container=$(podman create "$TAG-slim")
slim_mount=$(podman mount "$slim_container")
mount -t proc proc "$slim_mount/proc" 2>/dev/null || true
cp handler/test_inputs/classify.json "$slim_mount/tmp/classify.json"
chmod a+r "$slim_mount/tmp/classify.json"
chroot --userspec="$user" "$slim_mount" /usr/bin/env -i "${image_env[@]}" HOME=/home/runpod \
    runpod-worker test-input --file /tmp/classify.json >"$CACHE/slim-test-input.log" 2>&1 \
    || { cat "$CACHE/slim-test-input.log"; fail "test-input in the slim image"; }
umount "$slim_mount/proc" 2>/dev/null || true
podman umount "$slim_container" >/dev/null
podman rm "$slim_container" >/dev/null
slim_compressed=$(compressed_mb "$TAG-slim")
podman rmi -f "$TAG-slim" >/dev/null
step "slim (CUDA_EXTRAS=\"\"): $((slim_size / 1000000)) MB uncompressed, $slim_compressed MB compressed; its classify job ran"
echo "image-test: OK ($TAG, $((size / 1000000)) MB uncompressed, $compressed MB compressed; slim $((slim_size / 1000000)) MB, $slim_compressed MB)"
