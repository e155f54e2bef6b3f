#!/usr/bin/env bash
# CI's short fuzzing run: builds every target on the machine's stable
# toolchain with libFuzzer's coverage instrumentation (the flags cargo-fuzz
# passes, without a sanitizer: safe Rust needs none) and runs each for
# SECONDS (default 10) on a copy of its seed corpus, so that a parser that
# starts to panic on its seeds or near them fails CI. Long runs: run.sh.
#
#   fuzz/ci.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-10}
targets=(manifest sections page_map migration_stream http_request config_toml cpu_model)

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
cargo build --release --locked --target-dir target/ci --target x86_64-unknown-linux-gnu --bins

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
printf '| target | seconds | executions | crashes |\n|---|---:|---:|---:|\n'
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "$work/$t-artifacts"
    cp -r corpus/"$t"/. "$work/$t"/ 2>/dev/null || true
    dict=()
    [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
    log="$work/$t.log"
    if ./target/ci/x86_64-unknown-linux-gnu/release/"$t" "$work/$t" "${dict[@]}" -max_total_time="$secs" \
        -max_len=131072 -print_final_stats=1 -artifact_prefix="$work/$t-artifacts/" \
        >"$log" 2>&1; then
        crashes=0
    else
        crashes=1
        status=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    printf '| %s | %s | %s | %s |\n' "$t" "$secs" "${execs:-?}" "$crashes"
    if [ "$crashes" != 0 ]; then
        echo "--- $t ---" >&2
        tail -40 "$log" >&2
    fi
done
exit $status
