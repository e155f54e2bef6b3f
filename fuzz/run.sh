#!/usr/bin/env bash
# Runs fuzz targets for a fixed time each and prints what they did:
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; TARGET to every target. Each target is
# built first (not counted in its time), then run on corpus/<target> with
# libFuzzer's -max_total_time, -max_len (per target, below),
# -print_final_stats=1 and dict/<target>.dict when there is one. Prints a
# table (target | seconds | executions | execs/s | crashes) and exits 1 if
# any target crashed (or failed to build or run), 2 on a usage error or
# when cargo-fuzz is missing.
#
# Environment:
#   FUZZ_BUILD_ARGS  more `cargo fuzz build/run` options, e.g.
#                    "--sanitizer none" (faster; safe Rust needs no ASan)
#   FUZZ_ARGS        more libFuzzer options, e.g. "-rss_limit_mb=4096"
#
# Crashes go to artifacts/<target>/ (crash-*, oom-*, timeout-*, leak-*);
# the logs of the last run to target/run-logs/<target>.log.

set -uo pipefail

fuzz=$(cd "$(dirname "$0")" && pwd)
cd "$fuzz"

all=(manifest sections page_map migration_stream http_request config_toml cpu_model)

# The largest input libFuzzer makes for each target.
max_len() {
    case $1 in
        manifest) echo 1048576 ;;        # a 1 TiB guest's manifest is ~6 MiB; 1 MiB covers every shape
        sections) echo 131072 ;;         # a vCPU section is ~20 KB
        migration_stream) echo 131072 ;; # description, CPU and sections of a small VM
        config_toml) echo 16384 ;;
        cpu_model) echo 1024 ;;          # a command-line argument
        *) echo 65536 ;;                 # page_map, http_request
    esac
}

usage() {
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    echo "targets: ${all[*]}" >&2
    exit 2
}

secs=60
if [ $# -gt 0 ]; then
    case $1 in
        '' | *[!0-9]*) usage ;;
    esac
    secs=$1
    shift
fi
[ "$secs" -gt 0 ] || usage
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    case " ${all[*]} " in
        *" $t "*) ;;
        *) echo "run.sh: unknown target '$t'" >&2; usage ;;
    esac
done

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "run.sh: no nightly toolchain (cargo-fuzz needs one): rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "run.sh: 'cargo fuzz' is missing. Install it with:" >&2
    echo "    cargo install cargo-fuzz" >&2
    exit 2
fi

# Build against the dependency versions the product locks.
if [ ! -f Cargo.lock ] && [ -f ../Cargo.lock ]; then
    cp ../Cargo.lock Cargo.lock
    echo "run.sh: started fuzz/Cargo.lock from the workspace's" >&2
fi

read -r -a build_args <<<"${FUZZ_BUILD_ARGS:-}"
read -r -a fuzz_args <<<"${FUZZ_ARGS:-}"
logs=$fuzz/target/run-logs
mkdir -p "$logs"

# Crash artifacts of target $1.
artifacts() {
    find "$fuzz/artifacts/$1" -maxdepth 1 -type f \
        \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null | sort
}

rows=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: building" >&2
    if ! cargo +nightly fuzz build ${build_args[@]+"${build_args[@]}"} "$t" >"$logs/$t.build.log" 2>&1; then
        echo "run.sh: $t does not build; see $logs/$t.build.log" >&2
        rows+=("$t|-|-|-|build failed")
        failed=1
        continue
    fi
    dict=()
    [ -f "dict/$t.dict" ] && dict=("-dict=$fuzz/dict/$t.dict")
    artifacts "$t" >"$logs/$t.before"
    echo "== $t: fuzzing for ${secs}s" >&2
    start=$(date +%s%N)
    cargo +nightly fuzz run ${build_args[@]+"${build_args[@]}"} "$t" "$fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -print_final_stats=1 \
        ${dict[@]+"${dict[@]}"} ${fuzz_args[@]+"${fuzz_args[@]}"} >"$logs/$t.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    elapsed=$(awk -v ns="$((end - start))" 'BEGIN { printf "%.0f", ns / 1e9 }')

    execs=$(awk '/^stat::number_of_executed_units:/ { n = $2 } END { print n }' "$logs/$t.log")
    rate=$(awk '/^stat::average_exec_per_sec:/ { n = $2 } END { print n }' "$logs/$t.log")
    if [ -z "$rate" ] && [ -n "$execs" ] && [ "$elapsed" -gt 0 ]; then
        rate=$((execs / elapsed))
    fi
    new=$(comm -13 "$logs/$t.before" <(artifacts "$t"))
    crashes=$(printf '%s' "$new" | grep -c . || true)
    if [ "$crashes" -gt 0 ]; then
        failed=1
        status=$crashes
        echo "run.sh: $t found $crashes problem(s):" >&2
        printf '%s\n' "$new" | sed 's/^/    /' >&2
        echo "  reproduce: cargo +nightly fuzz run $t <artifact>; log: $logs/$t.log" >&2
    elif [ "$rc" -ne 0 ]; then
        failed=1
        status="error (exit $rc)"
        echo "run.sh: $t exited with $rc; see $logs/$t.log" >&2
    else
        status=0
    fi
    rows+=("$t|$elapsed|${execs:-?}|${rate:-?}|$status")
done

echo
printf '| %-16s | %7s | %12s | %8s | %s\n' target seconds executions execs/s crashes
printf '|%s|%s|%s|%s|%s\n' ------------------ --------- -------------- ---------- --------
for r in "${rows[@]}"; do
    IFS='|' read -r t s e x c <<<"$r"
    printf '| %-16s | %7s | %12s | %8s | %s\n' "$t" "$s" "$e" "$x" "$c"
done
exit "$failed"
