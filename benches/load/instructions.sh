#!/usr/bin/env bash
# User-space instructions berth spends per hot manifest request, counted by callgrind: a figure
# that repeats to within a few per cent where req/s on a shared VM swings by ±15%, so it is the
# one to compare two builds with (benches/load/README.md).
#
#   bash benches/load/instructions.sh [BERTH_BINARY]     (default: target/release/berth)
#
# Starts a docker-registry with one small image, then runs berth twice under
# `valgrind --tool=callgrind` with wrk -c8 against the manifest by tag (SHORT and LONG seconds),
# and prints (instructions of the long run - short run) / (requests of the long - short run):
# start-up and shutdown cancel out. Under valgrind sha2 uses its software SHA-256 (no SHA-NI),
# so the membership key weighs more than it does natively.
#
# Knobs: SHORT=1 LONG=10 (seconds of wrk), BERTH_RUST_LOG=warn (info: with the request log),
# KEEP=1 keeps the temp dir (callgrind files for callgrind_annotate).
# Needs (Debian packages): valgrind, docker-registry, wrk, curl.
set -euo pipefail

BIN=${1:-target/release/berth}
SHORT=${SHORT:-1}
LONG=${LONG:-10}
LEVEL=${BERTH_RUST_LOG:-warn}
for c in valgrind docker-registry wrk curl; do
  command -v "$c" >/dev/null || { echo "missing: $c (Debian package)" >&2; exit 1; }
done
[[ -x $BIN ]] || { echo "no berth binary at $BIN (cargo build --release --bin berth)" >&2; exit 1; }
BIN=$(realpath "$BIN")

T=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${KEEP:-0} == 1 ]]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

die() {
  echo "$*" >&2
  exit 1
}
# free_port, push_file, seed_image (shared with run.sh)
# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# wait_for URL SECONDS
wait_for() {
  for _ in $(seq $(($2 * 10))); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  die "$1 did not answer within $2 s"
}

free_port REG
mkdir -p "$T/seed"
cat >"$T/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: "$T/storage"
http:
  addr: "127.0.0.1:$REG"
  secret: instructions
EOF
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
PIDS+=("$!")
ORIGIN=http://127.0.0.1:$REG
REPO=bench/app
wait_for "$ORIGIN/v2/" 10
seed_image "$T/seed"
printf 'wrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"\n' >"$T/accept.lua"

# run SECONDS -> "instructions requests" of one berth under callgrind
run() {
  local port admin pid n ir
  free_port port
  free_port admin
  cat >"$T/berth.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[admin]
listen = "127.0.0.1:$admin"
[cache]
dir = "$T/cache-$1"
memory_bytes = "64MiB"
tag_ttl = "1h"
[[upstream]]
name = "origin"
url = "$ORIGIN"
default = true
auth = "public"
EOF
  RUST_LOG=$LEVEL valgrind --tool=callgrind --callgrind-out-file="$T/callgrind.$1" \
    "$BIN" serve --config "$T/berth.toml" >"$T/berth-$1.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_for "http://127.0.0.1:$port/v2/" 120
  curl -fsS -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$port/v2/bench/app/manifests/v1"
  wrk -t2 -c8 -d"$1"s -s "$T/accept.lua" "http://127.0.0.1:$port/v2/bench/app/manifests/v1" >/dev/null
  n=$(curl -fsS "http://127.0.0.1:$admin/metrics" |
    awk '/^berth_http_requests_total\{.*route="manifest"/ { s += $2 } END { print s + 0 }')
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  ir=$(awk '/^summary:/ { print $2 }' "$T/callgrind.$1")
  echo "$ir $n"
}

run "$SHORT" >"$T/short"
run "$LONG" >"$T/long"
read -r ir1 n1 <"$T/short"
read -r ir2 n2 <"$T/long"
((n2 > n1)) || { echo "the long run served no more requests than the short one" >&2; exit 1; }
echo "berth $("$BIN" --version | awk '{ print $2 }'), RUST_LOG=$LEVEL: $(((ir2 - ir1) / (n2 - n1))) instructions per hot manifest request ($n1 and $n2 requests in ${SHORT} s and ${LONG} s under callgrind)"
