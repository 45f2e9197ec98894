#!/bin/sh
# Runs `serve` from this kit on a GPU host the way the platform starts it (the SDK's webhook
# variables, pointed at the kit's own mock queue): the start-up checks and the warm-up on the real
# card, one classify job, one OpenAI embeddings request, /ping, then a SIGTERM drain.
#   cd gpu-kit && ./serve-check.sh        (torch==2.11.0 installed for python3; no internet)
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_LIB="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB"
cat > serve.toml <<'TOML'
[handler]
model_dir = "models"
[handlers.extract]
max_concurrency = 4
device = "cuda"
gpu_memory = "2GB"
[handlers.classify]
max_concurrency = 1
device = "cuda"
gpu_memory = "2GB"
TOML
./runpod-worker mock-queue --port 8123 --api-key k > mock.log 2>&1 &
MOCK=$!
for _ in $(seq 1 50); do grep -q "listening on" mock.log && break; sleep 0.1; done
B=http://127.0.0.1:8123/v2/ep
# As on the platform: $ID in the take URL and $RUNPOD_POD_ID in the others are the worker's id.
RUNPOD_WEBHOOK_GET_JOB="$B/job-take/\$ID?gpu=x" \
RUNPOD_WEBHOOK_POST_OUTPUT="$B/job-done/\$RUNPOD_POD_ID/\$ID?gpu=x" \
RUNPOD_WEBHOOK_POST_STREAM="$B/job-stream/\$RUNPOD_POD_ID/\$ID?gpu=x" \
RUNPOD_WEBHOOK_PING="$B/ping/\$RUNPOD_POD_ID?gpu=x" \
RUNPOD_POD_ID=gpu1 RUNPOD_AI_API_KEY=k RUNPOD_WORKER_CONFIG=serve.toml \
./runpod-worker serve --http-port 8124 > serve.out 2> serve.log &
SERVE=$!
start=$(date +%s%N)
for i in $(seq 1 180); do grep -q " ready: " serve.log && break; kill -0 $SERVE 2>/dev/null || break; sleep 0.5; done
echo "ready after $(( ($(date +%s%N) - start) / 1000000 )) ms"
grep -E "start-up checks|warm-up|ready:|resident|ERROR|WARN" serve.log
t0=$(date +%s%N)
curl -s -X POST "$B/runsync" -H 'Authorization: k' -H 'Content-Type: application/json' \
  -d '{"input": {"task": "classify", "text": "Preheat the oven to 180C and whisk the eggs.", "labels": ["invoice", "recipe", "poem"]}}'
echo; echo "first classify job: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
curl -s -X POST "$B/openai/v1/embeddings" -H 'Authorization: Bearer k' -H 'Content-Type: application/json' \
  -d '{"model": "all-MiniLM-L6-v2", "input": ["hello world"], "encoding_format": "float"}' | head -c 300
echo
curl -s http://127.0.0.1:8124/ping; echo
kill -TERM $SERVE; wait $SERVE; echo "serve exited $?"
kill $MOCK

