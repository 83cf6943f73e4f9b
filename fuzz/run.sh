#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named as arguments) for a bounded time, one after
# another, and prints per target the executions, the seconds run and the crashes found.
# Exits non-zero if any target crashed; the inputs are in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh                      # every target, 60 s each
#   FUZZ_SECONDS=300 fuzz/run.sh route config
#
# Knobs: FUZZ_SECONDS (per target, default 60), FUZZ_JOBS (parallel libFuzzer jobs per target,
# default 1), FUZZ_TMPDIR (temp dir for the bundle target's caches; default /dev/shm when it
# exists, since the importer syncs each object), FUZZ_TOOLCHAIN (default nightly).
# Needs `cargo install cargo-fuzz` and a nightly toolchain.
set -uo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-1}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
if [[ -n "${FUZZ_TMPDIR:-}" ]]; then
    export TMPDIR="$FUZZ_TMPDIR"
elif [[ -d /dev/shm && -w /dev/shm ]]; then
    export TMPDIR=/dev/shm
fi

all=(route oci_names range www_authenticate jwt_claims token_response token_params config bundle)
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=("${all[@]}")

# Build once with the same flags `cargo fuzz run` uses below, so that no target rebuilds.
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
if ! cargo "+$toolchain" fuzz build --release --debug-assertions >"$logs/build.log" 2>&1; then
    tail -n 30 "$logs/build.log" >&2
    echo "build failed" >&2
    exit 2
fi

bin_dir="target/$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')/release"

# Files libFuzzer writes for a failing input: crash-, leak-, timeout-, oom-<sha1>.
crashes() { find "artifacts/$1" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l; }
failed=0
printf '%-18s %12s %8s %8s %8s %s\n' target executions seconds coverage crashes note
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(crashes "$t")
    start=$(date +%s)
    # The binary `cargo fuzz run` would start, run directly so that the time is fuzzing only.
    # Seeds are read from corpus/<t>; what libFuzzer adds there stays out of git (.gitignore).
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" "$bin_dir/$t" \
        -artifact_prefix="artifacts/$t/" -max_total_time="$seconds" -jobs="$jobs" \
        -workers="$jobs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "corpus/$t" >"$logs/$t.log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - start ))
    # With -jobs, each job writes fuzz-<n>.log in the current directory.
    cat fuzz-*.log >>"$logs/$t.log" 2>/dev/null
    rm -f fuzz-*.log
    execs=$(grep -h '^stat::number_of_executed_units' "$logs/$t.log" | awk '{s += $2} END {print s + 0}')
    # Edges covered, from the last status line libFuzzer printed.
    cov=$(grep -ho 'cov: [0-9]*' "$logs/$t.log" | tail -n 1 | awk '{print $2}')
    after=$(crashes "$t")
    crashes=$((after - before))
    note=""
    if [[ $rc -ne 0 || $crashes -gt 0 ]]; then
        failed=1
        note="FAILED (exit $rc): $(grep -m1 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$logs/$t.log")"
        cp "$logs/$t.log" "artifacts/$t/run.log"
    fi
    printf '%-18s %12s %8s %8s %8s %s\n' "$t" "$execs" "$elapsed" "${cov:--}" "$crashes" "$note"
done
exit "$failed"
