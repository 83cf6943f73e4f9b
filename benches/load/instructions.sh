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

# free_port VAR: a loopback port nothing listens on right now.
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      printf -v "$1" '%s' "$p"
      return
    fi
  done
  echo "no free port" >&2
  exit 1
}
# wait_for URL SECONDS
wait_for() {
  for _ in $(seq $(($2 * 10))); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not answer within $2 s" >&2
  exit 1
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
O=http://127.0.0.1:$REG
wait_for "$O/v2/" 10

push() {
  local dg loc
  dg=$(sha256sum "$1" | cut -d' ' -f1)
  loc=$(curl -fsS -D - -o /dev/null -X POST "$O/v2/bench/app/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
  [[ $loc == http* ]] || loc=$O$loc
  curl -fsS -o /dev/null -H 'Content-Type: application/octet-stream' -T "$1" "$loc&digest=sha256:$dg"
  echo "$dg"
}
head -c 4096 /dev/urandom >"$T/seed/layer"
L=$(push "$T/seed/layer")
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"config":{}}' \
  "$L" >"$T/seed/config"
C=$(push "$T/seed/config")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":4096}]}' \
  "$C" "$(stat -c %s "$T/seed/config")" "$L" >"$T/seed/manifest"
curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary @"$T/seed/manifest" "$O/v2/bench/app/manifests/v1"
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
url = "$O"
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
