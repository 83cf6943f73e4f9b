#!/usr/bin/env bash
# Load benchmark: berth vs nginx proxy_cache, both in front of the same real docker-registry.
#
#   bash benches/load/run.sh                  # full run (~2-3 min on an idle 2-core box)
#   QUICK=1 bash benches/load/run.sh          # smoke run: short wrk runs, no 512 MiB blobs
#   BIG=1 bash benches/load/run.sh            # + peak RSS while 32 clients pull 32 distinct
#                                             #   512 MiB blobs cold (16 GiB of seed data)
#
# Knobs (environment variables; sizes take 4096, 4KiB, 64MiB, 1GiB, also 4K/64M/1G, all 1024-based):
#   DURATION=10s        wrk duration per hot scenario (QUICK: 3s)
#   WRK_THREADS=2       wrk -t (default with CLIENT_CPUS: one per CPU in the list)
#   WRK_CONNS=8         wrk -c (hot blob scenarios)
#   MANIFEST_CONNS="8 64"  wrk -c values for the hot manifest scenario
#   MANIFEST_ROUNDS=3   rounds of the manifest scenario, the order of the three targets rotated
#                       each round; the table gives the median round of each (QUICK: 1)
#   SMALL_SIZE=1MiB     blob for the hot requests/s scenario
#   HOT_SIZE=64MiB      blob for the hot throughput scenario
#   COLD_SIZE=512MiB    blob for the cold pull (one per target: berth, nginx, direct) (QUICK: 64MiB)
#   CONC_SIZE=64MiB     blob for the concurrent cold scenario (one per proxy)
#   CONC_CLIENTS=32     clients in the concurrent cold scenario
#   SCENARIOS="hot small manifest cold wan conc"   which of the default scenarios to run
#   WAN_RATE=500MiB     the wan scenario's paced origin link (a size per second, per connection)
#   BIG=0               1: run the many-distinct-blobs peak-RSS scenario
#   BIG_SIZE=512MiB     per-blob size in the BIG scenario
#   BIG_CLIENTS=32      distinct blobs / clients in the BIG scenario
#   SKIP_BUILD=0        1: do not run `cargo build --release` (use the existing binary)
#   BERTH_BIN=...       berth binary to test (default: target/release/berth of this checkout)
#   BERTH_WORKERS=N     berth's server.worker_threads (default: one per CPU)
#   ORIGIN_RATE=125MiB  put a paced "WAN link" (benches/load/ratelink.rs, a size per second, per
#                       connection) between the origin and berth, nginx and the direct pulls;
#                       unset: loopback
#   BERTH_RUST_LOG=warn berth's RUST_LOG (an ambient RUST_LOG is ignored)
#   SERVER_CPUS, CLIENT_CPUS  CPU lists for taskset (e.g. 0 and 1): berth, nginx and the registry
#                       run on SERVER_CPUS, wrk on CLIENT_CPUS; unset: no pinning
#   KEEP_TMP=0          1: keep the temp dir (logs, configs, caches) and print where it is
#   TMPDIR=...          where the temp dir goes (mktemp -d); needs the disk space below
#
# Disk: ~6 GiB by default (origin ~3.2 GiB, each cache ~1.2 GiB); BIG=1 adds 2 x BIG_CLIENTS x
# BIG_SIZE at peak (32 x 512 MiB: +32 GiB; berth's BIG cache is deleted before nginx's BIG pass).
# The script refuses to start without (generous) room. Everything lives in one mktemp -d directory,
# removed at exit (on failure only the logs and configs are kept, and their path is printed).
#
# Tools (Debian packages): docker-registry, nginx (or nginx-light), wrk, curl, coreutils, openssl;
# and a Rust toolchain for the build (berth and the ratelink pacer, benches/load/ratelink.rs). Client, proxies and origin share the machine: run it on a quiet
# box and read the numbers as relative (berth/nginx in the same run), not absolute.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

KNOBS=(QUICK DURATION WRK_THREADS WRK_CONNS SMALL_SIZE HOT_SIZE COLD_SIZE CONC_SIZE CONC_CLIENTS
  BIG BIG_SIZE BIG_CLIENTS SCENARIOS SKIP_BUILD BERTH_BIN BERTH_WORKERS ORIGIN_RATE WAN_RATE
  BERTH_RUST_LOG KEEP_TMP MANIFEST_CONNS MANIFEST_ROUNDS SERVER_CPUS CLIENT_CPUS)
COMMAND=""
for k in "${KNOBS[@]}"; do
  if [[ -n ${!k+x} ]]; then COMMAND+="$k=${!k} "; fi
done
COMMAND+="bash benches/load/run.sh"

QUICK=${QUICK:-0}
# Command prefixes pinning the servers and wrk to CPU lists (taskset execs the command, so a
# background server's $! is still its pid); empty arrays without SERVER_CPUS / CLIENT_CPUS.
PIN_SERVER=()
PIN_CLIENT=()
[[ -z ${SERVER_CPUS:-} ]] || PIN_SERVER=(taskset -c "$SERVER_CPUS")
[[ -z ${CLIENT_CPUS:-} ]] || PIN_CLIENT=(taskset -c "$CLIENT_CPUS")
if [[ $QUICK == 1 ]]; then
  DURATION=${DURATION:-3s}
  COLD_SIZE=${COLD_SIZE:-64MiB}
  MANIFEST_ROUNDS=${MANIFEST_ROUNDS:-1}
fi
DURATION=${DURATION:-10s}
# wrk threads: 2, or one per CPU wrk is pinned to (two wrk threads sharing one CPU make the
# client's own run queue the p99: up to a scheduler slice, 3 ms)
if [[ -z ${WRK_THREADS:-} ]]; then
  WRK_THREADS=2
  [[ -z ${CLIENT_CPUS:-} ]] || WRK_THREADS=$("${PIN_CLIENT[@]}" nproc)
fi
WRK_CONNS=${WRK_CONNS:-8}
SMALL_SIZE=${SMALL_SIZE:-1MiB}
HOT_SIZE=${HOT_SIZE:-64MiB}
COLD_SIZE=${COLD_SIZE:-512MiB}
CONC_SIZE=${CONC_SIZE:-64MiB}
CONC_CLIENTS=${CONC_CLIENTS:-32}
BIG=${BIG:-0}
BIG_SIZE=${BIG_SIZE:-512MiB}
BIG_CLIENTS=${BIG_CLIENTS:-32}
SKIP_BUILD=${SKIP_BUILD:-0}
BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
BERTH_RUST_LOG=${BERTH_RUST_LOG:-warn}
KEEP_TMP=${KEEP_TMP:-0}
WAN_RATE=${WAN_RATE:-500MiB}
SCENARIOS=${SCENARIOS:-hot small manifest cold wan conc}
MANIFEST_CONNS=${MANIFEST_CONNS:-8 64}
MANIFEST_ROUNDS=${MANIFEST_ROUNDS:-3}
REPO=bench
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------------
# helpers

log() { printf '[load %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
# free_port, push_file, seed_image (shared with instructions.sh)
# shellcheck source=benches/load/lib.sh
source "$HERE/lib.sh"

# to_bytes 64MiB -> 67108864
to_bytes() {
  local s=$1
  [[ $s =~ ^([0-9]+)([KMGT]?)(i?B)?$ ]] || die "bad size '$s' (use e.g. 4096, 4KiB, 64MiB, 1GiB)"
  local n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
  case $u in
    "") echo "$n" ;;
    K) echo $((n << 10)) ;;
    M) echo $((n << 20)) ;;
    G) echo $((n << 30)) ;;
    T) echo $((n << 40)) ;;
  esac
}

# human 67108864 -> "64 MiB"
human() {
  local b=$1
  if ((b >= 1 << 30 && b % (1 << 30) == 0)); then
    echo "$((b >> 30)) GiB"
  elif ((b >= 1 << 20 && b % (1 << 20) == 0)); then
    echo "$((b >> 20)) MiB"
  elif ((b >= 1 << 10 && b % (1 << 10) == 0)); then
    echo "$((b >> 10)) KiB"
  else
    echo "$b B"
  fi
}

# calc 'awk expression' -> result (floating point)
calc() { awk "BEGIN { v = $1; print v }"; }

# is_num X: true when X is a (possibly fractional) number
is_num() { [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }

# ratio A B -> A/B with 2 decimals, "-" when either is missing or B is 0
ratio() {
  if is_num "$1" && is_num "$2" && [[ $(calc "($2) == 0") == 0 ]]; then
    calc "sprintf(\"%.2f\", ($1) / ($2))"
  else
    echo "-"
  fi
}

PIDS=()
# stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL; forget the pid
stop_pid() {
  local pid=$1 i
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM for 10 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=(${keep[@]+"${keep[@]}"})
}

T=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  local j
  # background client pipelines and samplers first (their children by parent pid), then servers
  for j in $(jobs -p); do
    pkill -TERM -P "$j" 2>/dev/null
    kill -TERM "$j" 2>/dev/null
  done
  for j in ${PIDS[@]+"${PIDS[@]}"}; do stop_pid "$j"; done
  wait 2>/dev/null
  if [[ -n $T && -d $T ]]; then
    if [[ $KEEP_TMP == 1 ]]; then
      log "kept temp dir: $T"
    elif [[ $rc != 0 ]]; then
      # keep logs and configs to look at, drop the bulky blob copies
      rm -rf "$T/registry/storage" "$T/berth"/cache* "$T/nginx/cache" "$T/seed" "$T/clients"
      log "failed (exit $rc); logs and configs kept in $T (rm -rf it when done)"
    else
      rm -rf "$T"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_http URL PID: until URL answers anything over HTTP. 0: ready; 1: the process exited;
# 2: no answer within 10 s
wait_http() {
  local url=$1 pid=$2 i
  for i in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || return 1
    if curl -s -o /dev/null -m 1 "$url"; then return 0; fi
    sleep 0.05
  done
  return 2
}

# started NAME PID LOGFILE URL...: 0 when every URL answers; 1 when the process exited because
# its port was taken meanwhile (retry on another port); dies otherwise
started() {
  local name=$1 pid=$2 logfile=$3 url rc
  shift 3
  for url in "$@"; do
    rc=0
    wait_http "$url" "$pid" || rc=$?
    if ((rc == 1)) && grep -qi 'address already in use' "$logfile" 2>/dev/null; then
      stop_pid "$pid"
      log "$name: port taken meanwhile, retrying on another"
      return 1
    fi
    if ((rc != 0)); then
      tail -n 30 "$logfile" >&2 || true
      stop_pid "$pid"
      if ((rc == 1)); then die "$name exited during startup (log above: $logfile)"; fi
      die "$name did not answer $url within 10 s (log above: $logfile)"
    fi
  done
}

status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# rss_sampler OUTFILE PID...: writes the max of the summed VmRSS (KiB) of the pids, 10 Hz
rss_sampler() {
  local out=$1 max=0 sum v p
  shift
  echo 0 >"$out"
  while true; do
    sum=0
    for p in "$@"; do
      v=$(status_kib "$p" VmRSS)
      sum=$((sum + ${v:-0}))
    done
    if ((sum > max)); then
      max=$sum
      echo "$max" >"$out"
    fi
    sleep 0.1
  done
}

nginx_pids() { echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" || true); }

# ---------------------------------------------------------------------------------------------
# prerequisites

need() { # need BINARY DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 || MISSING+=("$1 (Debian package: $2)")
}
MISSING=()
need docker-registry docker-registry
need nginx nginx
need wrk wrk
need curl curl
need sha256sum coreutils
need awk gawk
need pgrep procps
need openssl openssl
[[ $SKIP_BUILD == 1 ]] || need cargo "rustup / cargo"
if ((${#MISSING[@]})); then
  for m in "${MISSING[@]}"; do log "missing: $m"; done
  die "install the missing tools, e.g. sudo apt-get install docker-registry nginx wrk curl"
fi

SMALL_BYTES=$(to_bytes "$SMALL_SIZE")
HOT_BYTES=$(to_bytes "$HOT_SIZE")
COLD_BYTES=$(to_bytes "$COLD_SIZE")
CONC_BYTES=$(to_bytes "$CONC_SIZE")
BIG_BYTES=$(to_bytes "$BIG_SIZE")

if [[ $SKIP_BUILD != 1 ]]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --quiet --bin berth --example ratelink) ||
    die "cargo build --release failed"
fi
[[ -x $BERTH_BIN ]] || die "no berth binary at $BERTH_BIN"
RATELINK_BIN=$ROOT/target/release/examples/ratelink
if [[ -n ${ORIGIN_RATE:-} ]] || has wan; then
  [[ -x $RATELINK_BIN ]] || die "ORIGIN_RATE and the wan scenario need $RATELINK_BIN (cargo build --release --example ratelink)"
fi

# REGISTRY_* variables override docker-registry's config file; the caller's must not leak in.
for v in $(compgen -e | grep '^REGISTRY_' || true); do unset "$v"; done

T=$(mktemp -d -t berth-load.XXXXXX)
mkdir -p "$T/seed" "$T/registry/storage" "$T/berth" "$T/nginx" "$T/clients"

# disk space: origin copy + up to two cache copies of everything seeded, plus slack
NEED=$(((SMALL_BYTES + HOT_BYTES + 6 * COLD_BYTES + 2 * CONC_BYTES) * 3 + (2 << 30)))
if [[ $BIG == 1 ]]; then NEED=$((NEED + 2 * BIG_CLIENTS * BIG_BYTES)); fi
AVAIL=$(($(df -Pk "$T" | awk 'NR == 2 { print $4 }') * 1024))
if ((AVAIL < NEED)); then
  die "need ~$((NEED >> 30)) GiB free under $(dirname "$T"), have $((AVAIL >> 30)) GiB (set TMPDIR)"
fi

# both caches get the same byte budget: at least 4 GiB, more when BIG needs it
CACHE_BYTES=$((4 << 30))
if [[ $BIG == 1 ]] && ((BIG_CLIENTS * BIG_BYTES + (1 << 30) > CACHE_BYTES)); then
  CACHE_BYTES=$((BIG_CLIENTS * BIG_BYTES + (1 << 30)))
fi
CACHE_MIB=$((CACHE_BYTES >> 20))

declare -A R=() # results

# ---------------------------------------------------------------------------------------------
# origin: docker-registry with filesystem storage, info logs (one line per request)

REG_LOG=$T/registry/registry.log
for attempt in 1 2 3 4; do
  ((attempt < 4)) || die "docker-registry: no free port after 3 attempts"
  free_port REG_PORT
  cat >"$T/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: "$T/registry/storage"
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "127.0.0.1:$REG_PORT"
  secret: berth-load-bench
EOF
  "${PIN_SERVER[@]}" docker-registry serve "$T/registry/config.yml" >"$T/registry/access.log" 2>"$REG_LOG" &
  REG_PID=$!
  PIDS+=("$REG_PID")
  ORIGIN=http://127.0.0.1:$REG_PORT
  started docker-registry "$REG_PID" "$REG_LOG" "$ORIGIN/v2/" && break
done
log "docker-registry $(docker-registry --version | awk '{print $3}') on $ORIGIN (pid $REG_PID)"

# FRONT is what berth, nginx and the direct pulls fetch from: the registry itself, or, with
# ORIGIN_RATE, a rate-limited link in front of it (an origin across a WAN, as in production).
# start_link VAR RATE: a paced link (benches/load/ratelink.rs) in front of the registry; its
# host:port goes to VAR. It paces each response to RATE bytes/s against an absolute schedule
# (nginx's limit_rate paces per whole second and lets short transfers run up to 2x the rate).
start_link() {
  local port
  free_port port
  "$RATELINK_BIN" "127.0.0.1:$port" "127.0.0.1:$REG_PORT" "$(to_bytes "$2")" 2>>"$T/link.log" &
  PIDS+=("$!")
  printf -v "$1" '%s' "127.0.0.1:$port"
  for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
  log "paced link ($(human "$(to_bytes "$2")")/s per connection) on http://127.0.0.1:$port in front of the registry"
}
FRONT_HOSTPORT=127.0.0.1:$REG_PORT
if [[ -n ${ORIGIN_RATE:-} ]]; then start_link FRONT_HOSTPORT "$ORIGIN_RATE"; fi
FRONT=http://$FRONT_HOSTPORT
# The wan scenario reaches the registry over its own paced link: berth through a second
# upstream ("wan", routed by path prefix), nginx through a second location.
WAN_HOSTPORT=""
if has wan; then start_link WAN_HOSTPORT "$WAN_RATE"; fi

# Lines the registry logged for GETs of one blob / for every request.
upstream_gets() { grep -F "/blobs/sha256:$1" "$REG_LOG" | grep -c 'http.request.method=GET' || true; }
upstream_requests() { grep -c 'http.request.method=' "$REG_LOG" || true; }

# prefetch_idle ADMIN_URL: waits (at most 30 s) until that berth has no image prefetch running.
# Serving a manifest from the origin starts fills of the image's blobs in the background; their
# origin GETs must land before a measured run starts counting origin requests.
prefetch_idle() {
  local i n
  for ((i = 0; i < 300; i++)); do
    n=$(curl -fsS "$1/metrics" 2>/dev/null | awk '$1 == "berth_prefetch_images_running" { print $2 }')
    [[ $n == 0 ]] && return 0
    sleep 0.1
  done
  log "WARNING: $1: image prefetch still running after 30 s (berth_prefetch_images_running=${n:-unknown})"
}

# seed_random BYTES -> digest of a fresh random blob pushed to the origin
seed_random() {
  local f=$T/seed/blob
  head -c "$1" /dev/urandom >"$f"
  push_file "$f"
  rm -f "$f"
}

log "seeding the origin with random blobs for: $SCENARIOS"
seed_image "$T/seed"
MANIFEST_ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json'

if has small; then SMALL_DG=$(seed_random "$SMALL_BYTES"); fi
if has hot; then HOT_DG=$(seed_random "$HOT_BYTES"); fi
if has cold; then
  COLD_BERTH_DG=$(seed_random "$COLD_BYTES")
  COLD_NGINX_DG=$(seed_random "$COLD_BYTES")
  COLD_DIRECT_DG=$(seed_random "$COLD_BYTES")
fi
if has wan; then
  WAN_BERTH_DG=$(seed_random "$COLD_BYTES")
  WAN_NGINX_DG=$(seed_random "$COLD_BYTES")
  WAN_DIRECT_DG=$(seed_random "$COLD_BYTES")
fi
if has conc; then
  CONC_BERTH_DG=$(seed_random "$CONC_BYTES")
  CONC_NGINX_DG=$(seed_random "$CONC_BYTES")
fi
BIG_DGS=()
if [[ $BIG == 1 ]]; then
  log "seeding $BIG_CLIENTS x $(human "$BIG_BYTES") for BIG"
  for _ in $(seq "$BIG_CLIENTS"); do BIG_DGS+=("$(seed_random "$BIG_BYTES")"); done
fi

# ---------------------------------------------------------------------------------------------
# berth and nginx

BERTH_STARTS=0
# start_berth CACHE_DIR: plain HTTP, admin listener, the registry as default upstream
start_berth() {
  local attempt
  for attempt in 1 2 3 4; do
    ((attempt < 4)) || die "berth: no free port after 3 attempts"
    start_berth_once "$1" && return 0
  done
}
start_berth_once() {
  BERTH_STARTS=$((BERTH_STARTS + 1))
  BERTH_LOG=$T/berth/berth-$BERTH_STARTS.log
  free_port BERTH_PORT
  free_port BERTH_ADMIN_PORT
  cat >"$T/berth/berth.toml" <<EOF
[server]
listen = "127.0.0.1:$BERTH_PORT"
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:$BERTH_ADMIN_PORT"

[cache]
dir = "$1"
disk_bytes = "${CACHE_MIB}MiB"
memory_bytes = "256MiB"
tag_ttl = "1h"

[[upstream]]
name = "origin"
url = "$FRONT"
default = true
auth = "public"
EOF
  if [[ -n $WAN_HOSTPORT ]]; then
    printf '\n[[upstream]]\nname = "wan"\nurl = "http://%s"\nauth = "public"\n' "$WAN_HOSTPORT" >>"$T/berth/berth.toml"
  fi
  if [[ -n ${BERTH_WORKERS:-} ]]; then
    sed -i "s/^shutdown_grace = \"2s\"/shutdown_grace = \"2s\"\nworker_threads = $BERTH_WORKERS/" "$T/berth/berth.toml"
  fi
  RUST_LOG=$BERTH_RUST_LOG "${PIN_SERVER[@]}" "$BERTH_BIN" serve --config "$T/berth/berth.toml" >"$BERTH_LOG" 2>&1 &
  BERTH_PID=$!
  PIDS+=("$BERTH_PID")
  BERTH=http://127.0.0.1:$BERTH_PORT
  BERTH_ADMIN=http://127.0.0.1:$BERTH_ADMIN_PORT
  started berth "$BERTH_PID" "$BERTH_LOG" "http://127.0.0.1:$BERTH_ADMIN_PORT/healthz" "$BERTH/v2/" || return 1
  log "berth on $BERTH (pid $BERTH_PID, cache $(human "$CACHE_BYTES"))"
}

NGINX_DIR=$T/nginx
start_nginx() {
  local attempt
  for attempt in 1 2 3 4; do
    ((attempt < 4)) || die "nginx: no free port after 3 attempts"
    start_nginx_once && return 0
  done
}
start_nginx_once() {
  local d=$NGINX_DIR user_line="" workers
  mkdir -p "$d/cache" "$d/logs" "$d/tmp/client" "$d/tmp/proxy" "$d/tmp/fastcgi" "$d/tmp/uwsgi" "$d/tmp/scgi"
  free_port NGINX_PORT
  # a root master would run its workers as nobody, who cannot enter the 0700 temp dir
  if [[ $(id -u) == 0 ]]; then user_line="user root;"; fi
  # one worker per CPU it may run on (nginx 1.22's "auto" counts every online CPU, pinned or not)
  workers=$("${PIN_SERVER[@]}" nproc)
  cat >"$d/nginx.conf" <<EOF
$user_line
daemon off;
worker_processes $workers;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path $d/tmp/client;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    # wrk keeps connections open; the default (1000) would make nginx close them now and then
    keepalive_requests 1000000;

    proxy_cache_path $d/cache levels=1:2 keys_zone=reg:50m max_size=${CACHE_MIB}m inactive=1d use_temp_path=off;

    upstream origin {
        server $FRONT_HOSTPORT;
        keepalive 32;
    }
    upstream wan {
        server ${WAN_HOSTPORT:-$FRONT_HOSTPORT};
        keepalive 32;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_cache reg;
    proxy_cache_key \$uri;
    proxy_cache_lock on;
    proxy_cache_lock_timeout 10m;
    # default 5s: a slower fill would let one more request through to the origin
    proxy_cache_lock_age 10m;
    proxy_cache_valid 200 206 1d;
    proxy_buffering on;
    proxy_read_timeout 10m;

    server {
        listen 127.0.0.1:$NGINX_PORT;
        add_header X-Cache-Status \$upstream_cache_status always;
        location /v2/ {
            proxy_pass http://origin;
        }
        # the wan scenario: /v2/wan/<repo>/... over the paced link
        location /v2/wan/ {
            rewrite ^/v2/wan/(.*)\$ /v2/\$1 break;
            proxy_pass http://wan;
        }
    }
}
EOF
  nginx -q -t -p "$d/" -e "$d/logs/error.log" -c "$d/nginx.conf" 2>>"$d/logs/stderr.log" ||
    {
      cat "$d/logs/stderr.log" >&2
      die "nginx -t failed"
    }
  : >"$d/logs/error.log"
  "${PIN_SERVER[@]}" nginx -p "$d/" -e "$d/logs/error.log" -c "$d/nginx.conf" 2>>"$d/logs/stderr.log" &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
  NGINX=http://127.0.0.1:$NGINX_PORT
  started nginx "$NGINX_PID" "$d/logs/error.log" "$NGINX/v2/" || return 1
  log "nginx $(nginx -v 2>&1 | sed 's|.*/||') on $NGINX (master pid $NGINX_PID, cache $(human "$CACHE_BYTES"))"
}

start_berth "$T/berth/cache"
start_nginx

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------------
# scenarios

CURL_ERR=$T/clients/curl.err

# cache_header TARGET HEADERFILE -> the proxy's hit/miss header value
cache_header() {
  local name=x-berth-cache
  [[ $1 == nginx ]] && name=x-cache-status
  tr -d '\r' <"$2" | awk -v n="$name:" 'tolower($1) == n { print $2 }' | tail -n 1
}

# warm TARGET URL DIGEST|"" [HEADER]: GET once (checks the sha256 for blobs), then GET again and
# check the proxy says it is a hit
warm() {
  local target=$1 url=$2 dg=$3 got h
  shift 3
  got=$(curl -sS "$@" -D "$T/clients/warm.h" "$url" 2>>"$CURL_ERR" | sha256sum | cut -d' ' -f1) || true
  if [[ -n $dg && $got != "$dg" ]]; then
    log "WARNING: $target: warm-up GET $url returned wrong bytes (sha256 $got)"
    R[$target.errors]=$((${R[$target.errors]:-0} + 1))
  fi
  curl -sS "$@" -D "$T/clients/warm.h" -o /dev/null "$url" 2>>"$CURL_ERR" || true
  h=$(cache_header "$target" "$T/clients/warm.h")
  if [[ ${h,,} != hit ]]; then
    log "WARNING: $target: second GET of $url is not a cache hit (cache header: '${h:-none}')"
    R[$target.errors]=$((${R[$target.errors]:-0} + 1))
  fi
}

# run_wrk KEY URL [wrk args...]: stores KEY.requests, .bytes, .duration_us, .p50_us, ...,
# KEY.upstream (origin requests during the run)
run_wrk() {
  local key=$1 url=$2 out=$T/clients/wrk-$1.txt before kv line
  shift 2
  before=$(upstream_requests)
  "${PIN_CLIENT[@]}" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$DURATION" --timeout 30s --latency \
    -s "$HERE/report.lua" "$@" "$url" >"$out" 2>&1 || log "WARNING: wrk exited non-zero ($out)"
  line=$(grep '^WRKRESULT ' "$out" || true)
  if [[ -z $line ]]; then
    log "WARNING: no wrk result for $key:"
    cat "$out" >&2
    return 0
  fi
  for kv in ${line#WRKRESULT }; do R[$key.${kv%%=*}]=${kv#*=}; done
  sleep 0.2
  R[$key.upstream]=$(($(upstream_requests) - before))
  local errs=$((${R[$key.status_errors]} + ${R[$key.connect_errors]} + ${R[$key.read_errors]} + ${R[$key.write_errors]} + ${R[$key.timeouts]}))
  R[$key.errs]=$errs
  R[$key.rps]=$(calc "sprintf(\"%.0f\", ${R[$key.requests]} / (${R[$key.duration_us]} / 1e6))")
  R[$key.mibs]=$(calc "sprintf(\"%.1f\", ${R[$key.bytes]} / (${R[$key.duration_us]} / 1e6) / 1048576)")
  R[$key.p50]=$(calc "sprintf(\"%.2f\", ${R[$key.p50_us]} / 1000)")
  R[$key.p99]=$(calc "sprintf(\"%.2f\", ${R[$key.p99_us]} / 1000)")
  log "$key: ${R[$key.rps]} req/s, ${R[$key.mibs]} MiB/s, p50 ${R[$key.p50]} ms, p99 ${R[$key.p99]} ms, errors $errs, origin requests during run ${R[$key.upstream]}"
}

# median_round KEY N: copies req/s and requests of the round of KEY.r0 .. KEY.r<N-1> with the
# median requests/s to KEY, takes p50 and p99 as each one's median over the rounds, and lists
# every round's req/s in KEY.rounds and p99 in KEY.p99s
median_round() {
  local key=$1 n=$2 r best list=""
  for ((r = 0; r < n; r++)); do list+="${R[$key.r$r.rps]:-0} r$r"$'\n'; done
  best=$(printf '%s' "$list" | sort -n | awk -v m=$(((n + 1) / 2)) 'NR == m { print $2 }')
  R[$key.rounds]=$(printf '%s' "$list" | awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $1 }')
  for f in rps requests; do R[$key.$f]=${R[$key.$best.$f]:-}; done
  # latencies: each percentile's own median over the rounds (one round's tail is noise)
  for f in p50 p99; do
    R[$key.$f]=$(for ((r = 0; r < n; r++)); do echo "${R[$key.r$r.$f]:-0}"; done | sort -n |
      awk -v m=$(((n + 1) / 2)) 'NR == m')
  done
  R[$key.p99s]=$(for ((r = 0; r < n; r++)); do echo "${R[$key.r$r.p99]:-0}"; done | paste -sd, | sed 's/,/, /g')
  R[$key.errs]=0 R[$key.upstream]=0
  for ((r = 0; r < n; r++)); do
    R[$key.errs]=$((R[$key.errs] + ${R[$key.r$r.errs]:-0}))
    R[$key.upstream]=$((R[$key.upstream] + ${R[$key.r$r.upstream]:-0}))
  done
}

# cold_pull KEY URL DIGEST: TTFB and total time of one GET (body to /dev/null)
cold_pull() {
  local key=$1 url=$2 dg=$3 w code ttfb total size
  w=$(curl -sS -o /dev/null -w '%{http_code} %{time_starttransfer} %{time_total} %{size_download}' \
    "$url" 2>>"$CURL_ERR") || w="ERR - - 0"
  read -r code ttfb total size <<<"$w"
  R[$key.code]=$code
  if [[ $code == 200 && $size == "$COLD_BYTES" ]]; then
    R[$key.ttfb]=$(calc "sprintf(\"%.1f\", $ttfb * 1000)")
    R[$key.total]=$(calc "sprintf(\"%.2f\", $total)")
    R[$key.mibs]=$(calc "sprintf(\"%.0f\", $size / $total / 1048576)")
  else
    log "WARNING: cold pull $key: HTTP $code, $size bytes (expected 200, $COLD_BYTES)"
    R[$key.ttfb]=ERR R[$key.total]=ERR
  fi
  sleep 0.2
  R[$key.upstream]=$(upstream_gets "$dg")
  log "cold $key: HTTP $code, TTFB ${R[$key.ttfb]} ms, total ${R[$key.total]} s (${R[$key.mibs]:-?} MiB/s), origin GETs ${R[$key.upstream]}"
}

# settle: flush dirty pages before a cold scenario, so that the gigabytes seeded and cached so far
# are not written back (and writers throttled) while berth and nginx fill their caches
settle() {
  local t0=$SECONDS
  sync
  ((SECONDS - t0 < 2)) || log "sync before the next scenario took $((SECONDS - t0)) s"
}

# read_back TARGET URL DIGEST: what a proxy stored must be the blob: read it back (now a hit)
# and hash it; a mismatch counts as a problem of TARGET
read_back() {
  local got
  got=$(curl -sS "$2" 2>>"$CURL_ERR" | sha256sum | cut -d' ' -f1) || true
  if [[ $got != "$3" ]]; then
    log "WARNING: $1: re-reading $2 gave sha256 $got, want $3"
    R[$1.errors]=$((${R[$1.errors]:-0} + 1))
  fi
}

# concurrent TARGET KEY N URL... : N clients at once (client i fetches URL[i % #URLs]), each body
# piped through sha256sum; stores KEY.ok (right bytes and 200), KEY.ttfb_med/_max, KEY.wall
concurrent() {
  local target=$1 key=$2 n=$3 dir=$T/clients/$2 i j t0 t1 url
  shift 3
  local urls=("$@") pids=()
  mkdir -p "$dir"
  t0=$(date +%s.%N)
  for ((i = 0; i < n; i++)); do
    url=${urls[i % ${#urls[@]}]}
    curl -sS -D "$dir/h.$i" -w '%{stderr}W %{http_code} %{time_starttransfer} %{time_total}\n' \
      "$url" 2>"$dir/w.$i" | sha256sum >"$dir/s.$i" &
    pids+=("$!")
  done
  for j in "${pids[@]}"; do wait "$j" || true; done
  t1=$(date +%s.%N)
  local ok=0 bad=0 hits=0 misses=0 ttfbs=() totals=() code ttfb total want got h
  for ((i = 0; i < n; i++)); do
    url=${urls[i % ${#urls[@]}]}
    want=${url##*sha256:}
    got=$(cut -d' ' -f1 <"$dir/s.$i")
    read -r _ code ttfb total <<<"$(grep '^W ' "$dir/w.$i" | tail -n 1)" || true
    if [[ $code == 200 && $got == "$want" ]]; then
      ok=$((ok + 1))
    else
      bad=$((bad + 1))
      log "WARNING: $key client $i: HTTP ${code:-?}, sha256 ${got:0:16}... (want ${want:0:16}...): $(grep -v '^W ' "$dir/w.$i" | head -n 2 | tr '\n' ' ')"
    fi
    is_num "${ttfb:-}" && ttfbs+=("$ttfb")
    is_num "${total:-}" && totals+=("$total")
    h=$(cache_header "$target" "$dir/h.$i")
    case ${h,,} in hit) hits=$((hits + 1)) ;; miss) misses=$((misses + 1)) ;; esac
  done
  R[$key.ok]="$ok/$n"
  R[$key.wall]=$(calc "sprintf(\"%.2f\", $t1 - $t0)")
  if ((${#ttfbs[@]})); then
    R[$key.ttfb_med]=$(printf '%s\n' "${ttfbs[@]}" | sort -g | awk '{ a[NR] = $1 } END { printf "%.0f", a[int((NR + 1) / 2)] * 1000 }')
    R[$key.ttfb_max]=$(printf '%s\n' "${ttfbs[@]}" | sort -g | tail -n 1 | awk '{ printf "%.0f", $1 * 1000 }')
  fi
  R[$key.hits]=$hits R[$key.misses]=$misses
  log "$key: $ok/$n correct, wall ${R[$key.wall]} s, TTFB median ${R[$key.ttfb_med]:-?} ms / max ${R[$key.ttfb_max]:-?} ms, cache header: $misses miss, $hits hit, $((n - hits - misses)) other"
  rm -rf "$dir"
}

B=$BERTH N=$NGINX
blob() { echo "$1/v2/$REPO/blobs/sha256:$2"; }
wan_blob() { echo "$1/v2/wan/$REPO/blobs/sha256:$2"; }
# rate_label 500MiB -> "500 MiB/s"
rate_label() { echo "$(human "$(to_bytes "$1")")/s"; }

# berth_alive: records and reports a berth that died
berth_alive() {
  if ! kill -0 "$BERTH_PID" 2>/dev/null; then
    R[berth.errors]=$((${R[berth.errors]:-0} + 1))
    log "WARNING: berth (pid $BERTH_PID) is not running any more; its log: $BERTH_LOG"
    tail -n 20 "$BERTH_LOG" >&2 || true
    return 1
  fi
}

# hot_blob KEY DIGEST: warm the blob in both proxies (checked), then wrk it through each
hot_blob() {
  local t base
  for t in berth nginx; do
    base=$B
    [[ $t == nginx ]] && base=$N
    warm "$t" "$(blob "$base" "$2")" "$2"
    run_wrk "$t.$1" "$(blob "$base" "$2")"
  done
  berth_alive || true
}

if has hot; then
  log "scenario: hot $(human "$HOT_BYTES") blob throughput (wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION)"
  hot_blob hot "$HOT_DG"
fi

if has small; then
  log "scenario: hot $(human "$SMALL_BYTES") blob requests/s"
  hot_blob small "$SMALL_DG"
fi

if has manifest; then
  log "scenario: hot manifest by tag ($REPO:v1) requests/s and latency at -c$MANIFEST_CONNS (berth's request log off, then on)"
  for t in berth nginx; do
    base=$B
    [[ $t == nginx ]] && base=$N
    warm "$t" "$base/v2/$REPO/manifests/v1" "$MANIFEST_DG" -H "$MANIFEST_ACCEPT"
  done
  # berth with its request log on (a line per request at RUST_LOG=info, the default, written to
  # a file as a service manager would collect it): a second berth process, same config, its own
  # cache; the first berth keeps RUST_LOG=$BERTH_RUST_LOG.
  saved=("$BERTH" "$BERTH_PID" "$BERTH_LOG" "$BERTH_ADMIN")
  BERTH_RUST_LOG=info start_berth "$T/berth/cache-log"
  BL=$BERTH BL_PID=$BERTH_PID BL_LOG=$BERTH_LOG BL_ADMIN=$BERTH_ADMIN
  BERTH=${saved[0]} BERTH_PID=${saved[1]} BERTH_LOG=${saved[2]} BERTH_ADMIN=${saved[3]}
  warm berth "$BL/v2/$REPO/manifests/v1" "$MANIFEST_DG" -H "$MANIFEST_ACCEPT"
  prefetch_idle "$BERTH_ADMIN"
  prefetch_idle "$BL_ADMIN"
  # Interleaved, so that a burst of load elsewhere on the box hits all three alike, and the
  # order rotated every round: on 2 CPUs whichever target runs at a given position gains or
  # loses up to a quarter of its rate (a control run with both berths logging measured 0.97
  # and 1.08), so a single fixed order would bias one target. Each target's median round is
  # reported.
  declare -A URL=([berth]=$B [nginx]=$N [berthlog]=$BL)
  order=(berth nginx berthlog)
  for c in $MANIFEST_CONNS; do
    for ((r = 0; r < MANIFEST_ROUNDS; r++)); do
      for ((i = 0; i < 3; i++)); do
        t=${order[(i + r) % 3]}
        WRK_CONNS=$c run_wrk "$t.manifest$c.r$r" "${URL[$t]}/v2/$REPO/manifests/v1" -H "$MANIFEST_ACCEPT"
      done
    done
    for t in berth nginx berthlog; do median_round "$t.manifest$c" "$MANIFEST_ROUNDS"; done
  done
  R[berthlog.lines]=$(grep -c '"request"\|request' "$BL_LOG" || true)
  stop_pid "$BL_PID"
  mv "$BL_LOG" "$T/berth/request-log.txt"
  berth_alive || true
fi

if has cold; then
  settle
  log "scenario: cold $(human "$COLD_BYTES") pull (one fresh blob per target)"
  cold_pull direct.cold "$(blob "$FRONT" "$COLD_DIRECT_DG")" "$COLD_DIRECT_DG"
  cold_pull berth.cold "$(blob "$B" "$COLD_BERTH_DG")" "$COLD_BERTH_DG"
  cold_pull nginx.cold "$(blob "$N" "$COLD_NGINX_DG")" "$COLD_NGINX_DG"
  read_back berth "$(blob "$B" "$COLD_BERTH_DG")" "$COLD_BERTH_DG"
  read_back nginx "$(blob "$N" "$COLD_NGINX_DG")" "$COLD_NGINX_DG"
  # The floor for any proxy that verifies a blob before releasing its last byte (berth must:
  # a corrupt origin body may never reach a client complete-looking): hashing it once on one
  # core with OpenSSL's SHA-256 (SHA-NI where the CPU has it). No pipeline can beat this.
  rate=$(openssl speed -evp sha256 -bytes 262144 -seconds 1 2>/dev/null |
    awk '$1 == "sha256" { v = $2; sub(/k$/, "", v); print v * 1000 }')
  if is_num "${rate:-}"; then
    R[floor.cold.total]=$(calc "sprintf(\"%.2f\", $COLD_BYTES / $rate)")
    R[floor.cold.mibs]=$(calc "sprintf(\"%.0f\", $rate / 1048576)")
    log "cold floor: SHA-256 of $(human "$COLD_BYTES") on one core takes ${R[floor.cold.total]} s (${R[floor.cold.mibs]} MiB/s)"
  fi
  berth_alive || true
fi

if has wan; then
  settle
  log "scenario: cold $(human "$COLD_BYTES") pull over a $(rate_label "$WAN_RATE") origin link (one fresh blob per target)"
  cold_pull direct.wan "$(blob "http://$WAN_HOSTPORT" "$WAN_DIRECT_DG")" "$WAN_DIRECT_DG"
  cold_pull berth.wan "$(wan_blob "$B" "$WAN_BERTH_DG")" "$WAN_BERTH_DG"
  cold_pull nginx.wan "$(wan_blob "$N" "$WAN_NGINX_DG")" "$WAN_NGINX_DG"
  read_back berth "$(wan_blob "$B" "$WAN_BERTH_DG")" "$WAN_BERTH_DG"
  read_back nginx "$(wan_blob "$N" "$WAN_NGINX_DG")" "$WAN_NGINX_DG"
  berth_alive || true
fi

if has conc; then
  settle
  log "scenario: $CONC_CLIENTS concurrent cold GETs of one $(human "$CONC_BYTES") blob"
  concurrent berth berth.conc "$CONC_CLIENTS" "$(blob "$B" "$CONC_BERTH_DG")"
  sleep 0.5
  R[berth.conc.upstream]=$(upstream_gets "$CONC_BERTH_DG")
  concurrent nginx nginx.conc "$CONC_CLIENTS" "$(blob "$N" "$CONC_NGINX_DG")"
  sleep 0.5
  R[nginx.conc.upstream]=$(upstream_gets "$CONC_NGINX_DG")
  log "origin GETs for the concurrent blob: berth ${R[berth.conc.upstream]}, nginx ${R[nginx.conc.upstream]}"
  berth_alive || true
fi

R[berth.hwm]=$(($(status_kib "$BERTH_PID" VmHWM) / 1024))
R[berth.rss]=$(($(status_kib "$BERTH_PID" VmRSS) / 1024))
hwm=0
for p in $(nginx_pids); do hwm=$((hwm + $(status_kib "$p" VmHWM))); done
R[nginx.hwm]=$((hwm / 1024))
log "peak RSS so far: berth VmHWM ${R[berth.hwm]} MiB (now ${R[berth.rss]} MiB); nginx sum of VmHWM over its processes ${R[nginx.hwm]} MiB"

# ---------------------------------------------------------------------------------------------
# BIG: peak RSS while many clients pull distinct large blobs cold (fresh berth process, so its
# VmHWM covers only this scenario)

if [[ $BIG == 1 ]]; then
  log "scenario BIG: $BIG_CLIENTS clients x $BIG_CLIENTS distinct $(human "$BIG_BYTES") blobs, cold"
  stop_pid "$BERTH_PID"
  rm -rf "$T/berth/cache"
  settle
  start_berth "$T/berth/cache-big"
  urls=()
  for dg in "${BIG_DGS[@]}"; do urls+=("$(blob "$BERTH" "$dg")"); done
  rss_sampler "$T/clients/rss-berth" "$BERTH_PID" &
  sampler=$!
  concurrent berth berth.big "$BIG_CLIENTS" "${urls[@]}"
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  R[berth.big.hwm]=$(($(status_kib "$BERTH_PID" VmHWM) / 1024))
  R[berth.big.rssmax]=$(($(cat "$T/clients/rss-berth") / 1024))
  [[ ${R[berth.big.ok]} == "$BIG_CLIENTS/$BIG_CLIENTS" ]] &&
    R[berth.big.mibs]=$(calc "sprintf(\"%.0f\", $BIG_CLIENTS * $BIG_BYTES / ${R[berth.big.wall]} / 1048576)")
  log "BIG berth: VmHWM ${R[berth.big.hwm]} MiB, max sampled VmRSS ${R[berth.big.rssmax]} MiB, aggregate ${R[berth.big.mibs]:-?} MiB/s"
  stop_pid "$BERTH_PID"
  rm -rf "$T/berth/cache-big"
  settle

  urls=()
  for dg in "${BIG_DGS[@]}"; do urls+=("$(blob "$N" "$dg")"); done
  # shellcheck disable=SC2046
  rss_sampler "$T/clients/rss-nginx" $(nginx_pids) &
  sampler=$!
  concurrent nginx nginx.big "$BIG_CLIENTS" "${urls[@]}"
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  R[nginx.big.rssmax]=$(($(cat "$T/clients/rss-nginx") / 1024))
  [[ ${R[nginx.big.ok]} == "$BIG_CLIENTS/$BIG_CLIENTS" ]] &&
    R[nginx.big.mibs]=$(calc "sprintf(\"%.0f\", $BIG_CLIENTS * $BIG_BYTES / ${R[nginx.big.wall]} / 1048576)")
  log "BIG nginx: max sampled VmRSS (sum over processes) ${R[nginx.big.rssmax]} MiB, aggregate ${R[nginx.big.mibs]:-?} MiB/s"
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# berth warnings/errors it logged (RUST_LOG=warn)
BERTH_LOG_LINES=$(cat "$T"/berth/berth-*.log | grep -c . || true)
NGINX_ERR_LINES=$(grep -c . "$NGINX_DIR/logs/error.log" || true)

# ---------------------------------------------------------------------------------------------
# summary

v() { echo "${R[$1]:--}"; }
row() { # metric berth nginx [direct]
  local m=$1 b=$2 n=$3 d=${4:--}
  local bd="-" nd="-"
  # a scenario that did not run (SCENARIOS) leaves no row
  [[ $b$n$d == --- || $b$n$d == "- / -- / --" ]] && return 0
  if [[ $d != - ]]; then
    bd=$(ratio "$b" "$d")
    nd=$(ratio "$n" "$d")
  fi
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$m" "$b" "$n" "$d" "$(ratio "$b" "$n")" "$bd" "$nd"
}

CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown)
REV=$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)
HS=$(human "$HOT_BYTES") SS=$(human "$SMALL_BYTES") CS=$(human "$COLD_BYTES") QS=$(human "$CONC_BYTES")

{
  echo
  echo "## berth load benchmark"
  echo
  echo "command: \`$COMMAND\`"
  echo
  echo "- berth $REV (release build), nginx $(nginx -v 2>&1 | sed 's|.*/||'), docker-registry $(docker-registry --version | awk '{print $3}'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')"
  echo "- $(nproc) CPUs ($CPU), $(uname -sr); load average at start $LOAD_START, at end $LOAD_END"
  if [[ -n ${SERVER_CPUS:-}${CLIENT_CPUS:-} ]]; then
    echo "- pinned (taskset): berth, nginx and the registry on CPUs ${SERVER_CPUS:-any}, wrk on CPUs ${CLIENT_CPUS:-any}"
  fi
  echo "- client (wrk/curl), proxies and origin on one machine, loopback; wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION for blobs, -c${MANIFEST_CONNS// / and -c} for the manifest ($MANIFEST_ROUNDS rounds, order rotated, median round)"
  echo "- ↑ higher is better, ↓ lower is better; ratios are left column / right column"
  echo
  echo "| metric | berth | nginx | direct | berth/nginx | berth/direct | nginx/direct |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  row "hot $HS blob, MiB/s ↑" "$(v berth.hot.mibs)" "$(v nginx.hot.mibs)"
  row "hot $SS blob, req/s ↑" "$(v berth.small.rps)" "$(v nginx.small.rps)"
  for c in $MANIFEST_CONNS; do
    row "hot manifest by tag -c$c, request log off, req/s ↑" "$(v berth.manifest$c.rps)" "$(v nginx.manifest$c.rps)"
    row "hot manifest by tag -c$c, request log off, p50 / p99 (medians of the rounds), ms ↓" "$(v berth.manifest$c.p50) / $(v berth.manifest$c.p99)" "$(v nginx.manifest$c.p50) / $(v nginx.manifest$c.p99)"
    row "hot manifest by tag -c$c, berth's request log on (⁴), req/s ↑" "$(v berthlog.manifest$c.rps)" "$(v nginx.manifest$c.rps)"
    row "hot manifest by tag -c$c, berth's request log on (⁴), p50 / p99 (medians of the rounds), ms ↓" "$(v berthlog.manifest$c.p50) / $(v berthlog.manifest$c.p99)" "$(v nginx.manifest$c.p50) / $(v nginx.manifest$c.p99)"
    row "hot manifest by tag -c$c, berth's req/s with the log on ÷ off ↑" "$(ratio "$(v berthlog.manifest$c.rps)" "$(v berth.manifest$c.rps)")" "-"
    row "hot manifest by tag -c$c, req/s of every round (berth log off; log on ⁴)" "$(v berth.manifest$c.rounds); $(v berthlog.manifest$c.rounds)" "$(v nginx.manifest$c.rounds)"
    row "hot manifest by tag -c$c, p99 ms of every round (berth log off; log on ⁴)" "$(v berth.manifest$c.p99s); $(v berthlog.manifest$c.p99s)" "$(v nginx.manifest$c.p99s)"
  done
  errs=(0 0) ups=(0 0)
  for k in hot small $(for c in $MANIFEST_CONNS; do echo "manifest$c"; done); do
    errs[0]=$((errs[0] + ${R[berth.$k.errs]:-0} + ${R[berthlog.$k.errs]:-0}))
    errs[1]=$((errs[1] + ${R[nginx.$k.errs]:-0}))
    ups[0]=$((ups[0] + ${R[berth.$k.upstream]:-0} + ${R[berthlog.$k.upstream]:-0}))
    ups[1]=$((ups[1] + ${R[nginx.$k.upstream]:-0}))
  done
  row "hot runs: failed requests (non-2xx, socket errors) ↓" "${errs[0]}" "${errs[1]}"
  row "hot runs: origin requests during wrk ↓" "${ups[0]}" "${ups[1]}"
  row "cold $CS pull, time to first byte, ms ↓" "$(v berth.cold.ttfb)" "$(v nginx.cold.ttfb)" "$(v direct.cold.ttfb)"
  row "cold $CS pull, total, s ↓" "$(v berth.cold.total)" "$(v nginx.cold.total)" "$(v direct.cold.total)"
  row "cold $CS pull, total vs SHA-256 of it on one core (²), s ↓" "$(v berth.cold.total)" "$(v nginx.cold.total)" "$(v floor.cold.total)"
  row "cold $CS pull, origin GETs" "$(v berth.cold.upstream)" "$(v nginx.cold.upstream)" "$(v direct.cold.upstream)"
  row "cold $CS pull over a $(rate_label "$WAN_RATE") origin link (³), time to first byte, ms ↓" "$(v berth.wan.ttfb)" "$(v nginx.wan.ttfb)" "$(v direct.wan.ttfb)"
  row "cold $CS pull over a $(rate_label "$WAN_RATE") origin link (³), total, s ↓" "$(v berth.wan.total)" "$(v nginx.wan.total)" "$(v direct.wan.total)"
  row "cold $CS pull over a $(rate_label "$WAN_RATE") origin link (³), origin GETs" "$(v berth.wan.upstream)" "$(v nginx.wan.upstream)" "$(v direct.wan.upstream)"
  row "$CONC_CLIENTS× concurrent cold $QS: origin GETs ↓" "$(v berth.conc.upstream)" "$(v nginx.conc.upstream)"
  row "$CONC_CLIENTS× concurrent cold $QS: clients with 200 + right sha256" "$(v berth.conc.ok)" "$(v nginx.conc.ok)"
  row "$CONC_CLIENTS× concurrent cold $QS: TTFB median, ms ↓" "$(v berth.conc.ttfb_med)" "$(v nginx.conc.ttfb_med)"
  row "$CONC_CLIENTS× concurrent cold $QS: TTFB max, ms ↓" "$(v berth.conc.ttfb_max)" "$(v nginx.conc.ttfb_max)"
  row "$CONC_CLIENTS× concurrent cold $QS: all done, s ↓" "$(v berth.conc.wall)" "$(v nginx.conc.wall)"
  row "peak RSS after all of the above, MiB ↓ (nginx: sum of VmHWM)" "$(v berth.hwm)" "$(v nginx.hwm)"
  if [[ $BIG == 1 ]]; then
    BS=$(human "$BIG_BYTES")
    row "BIG $BIG_CLIENTS× distinct cold $BS: peak RSS, MiB ↓ (¹)" "$(v berth.big.hwm)" "$(v nginx.big.rssmax)"
    row "BIG $BIG_CLIENTS× distinct cold $BS: clients with 200 + right sha256" "$(v berth.big.ok)" "$(v nginx.big.ok)"
    row "BIG $BIG_CLIENTS× distinct cold $BS: aggregate MiB/s ↑" "$(v berth.big.mibs)" "$(v nginx.big.mibs)"
  fi
  row "other problems (warm-up not a hit, bad bytes, process died) ↓" "$(v berth.errors | sed 's/^-$/0/')" "$(v nginx.errors | sed 's/^-$/0/')"
  echo
  if [[ $BIG == 1 ]]; then
    echo "(¹) berth: VmHWM of a berth restarted with an empty cache just for this scenario (max sampled VmRSS ${R[berth.big.rssmax]:-?} MiB); nginx: max of the summed VmRSS of master + workers, sampled at 10 Hz."
    echo
  fi
  if [[ -n ${R[floor.cold.total]:-} ]]; then
    echo "(²) direct column: the time OpenSSL needs to SHA-256 the blob once on one core (\`openssl speed -evp sha256\`: ${R[floor.cold.mibs]} MiB/s), the lower bound for any proxy that verifies the digest before it sends the last byte, as berth does; nginx does not verify."
    echo
  fi
  if has wan; then
    echo "(³) the registry behind benches/load/ratelink.rs, which paces every response to $(rate_label "$WAN_RATE") (\`WAN_RATE=$WAN_RATE\`), as an origin across a WAN; berth, nginx and the direct pull each fetch a distinct fresh blob through it."
    echo
  fi
  if has manifest; then
    echo "(⁴) request logs: every row but these is berth at RUST_LOG=$BERTH_RUST_LOG (no line per request) and nginx with \`access_log off\`. These rows are a second berth process at RUST_LOG=info (berth's default: one line per request, handed to a writer thread, stderr redirected to a file; it wrote ${R[berthlog.lines]:-?} request lines), measured interleaved with the other two."
    echo
  fi
  echo "berth logged $BERTH_LOG_LINES line(s) at RUST_LOG=$BERTH_RUST_LOG; nginx error.log has $NGINX_ERR_LINES line(s)."
} | tee "$T/summary.md"

if ((BERTH_LOG_LINES)); then
  log "berth log (first 20 lines):"
  cat "$T"/berth/berth-*.log | head -n 20 >&2
fi
if ((NGINX_ERR_LINES)); then
  log "nginx error.log (first 10 lines):"
  head -n 10 "$NGINX_DIR/logs/error.log" >&2
fi
