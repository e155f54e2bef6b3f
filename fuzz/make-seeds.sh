#!/usr/bin/env bash
# Writes seed corpora for the fuzz targets from real inputs, into
# fuzz/corpus/<target>/gen-* (ignored by git: they are made again from
# the repository at any time), and the dictionary fuzz/dict/cpu_model.dict.
#
#   fuzz/make-seeds.sh [DIR...]
#
# DIR: snapshot directories, or directories with snapshots somewhere below
# them; by default the repository's snapshot fixtures. From each snapshot
# (at most 10):
#   manifest          its manifest.json (up to 1 MiB)
#   sections          its state sections, as the target's records (jq)
#   migration_stream  a destination's stream carrying its configuration,
#                     CPU and sections, as the target's records (jq)
#   page_map          its page-map.bin, if it is a diff snapshot (jq)
# and, from the sources:
#   config_toml       the TOML blocks of docs/CONFIG.md
#   cpu_model         the psABI levels of crates/stasis-cpu/src/model.rs as
#                     feature changes; every feature name as a dictionary
#   migration_stream  a version-1 hello, and frames without a handshake
#   page_map          two small maps
# The committed seeds (http_request, config_toml, cpu_model) are not
# touched. Needs bash, GNU coreutils and awk; jq for the snapshot seeds
# other than the manifests.

set -euo pipefail
export LC_ALL=C

fuzz=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$fuzz")
corpus=$fuzz/corpus
for t in manifest sections page_map migration_stream http_request config_toml cpu_model; do
    mkdir -p "$corpus/$t"
done
mkdir -p "$fuzz/dict"

if [ $# -gt 0 ]; then
    dirs=("$@")
else
    dirs=("$repo/crates/stasis/tests/fixtures" "$repo/crates/stasis-snapshot/tests/fixtures")
fi

have_jq=false
if command -v jq >/dev/null 2>&1; then
    have_jq=true
else
    echo "make-seeds.sh: jq not found: from snapshots only manifest seeds are made (install jq for sections, page_map and migration_stream seeds)" >&2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- binary output -------------------------------------------------------

# One byte: the low 8 bits of $1.
u8() { printf "\\$(printf '%03o' "$(($1 & 255))")"; }
# Little-endian u16 and u32.
u16le() { u8 "$1"; u8 "$(($1 >> 8))"; }
u32le() { u8 "$1"; u8 "$(($1 >> 8))"; u8 "$(($1 >> 16))"; u8 "$(($1 >> 24))"; }

# A migration_stream record: frame kind $1, the payload in file $2.
record() {
    local size
    size=$(wc -c <"$2")
    if ((size > 65535)); then
        echo "make-seeds.sh: a kind-$1 frame of $size bytes does not fit a record; left out" >&2
        return 1
    fi
    u8 "$1"
    u16le "$size"
    cat "$2"
}

# --- snapshots -------------------------------------------------------------

# name, instance, version, optional (0/1), offset, size of each section of
# manifest $1, tab-separated.
section_list() {
    jq -r '.body.sections[] | [.name, .instance, .version, (if .optional then 1 else 0 end), .offset, .size] | @tsv' "$1"
}

# $3 bytes of file $1 from offset $2.
payload() {
    dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=65536 status=none
}

# The sections target's input for manifest $1 and state file $2: a header
# byte (vCPUs - 1), then one record per section, its name written out
# (tag 0x7f, bit 7 for optional).
sections_seed() {
    local m=$1 state=$2 vcpus name instance version optional offset size
    vcpus=$(jq -r '.body.vm_config.vcpus // 1' "$m")
    u8 "$(((vcpus - 1) & 3))"
    while IFS=$'\t' read -r name instance version optional offset size; do
        ((size <= 65535)) || continue
        u8 "$((0x7f | optional << 7))"
        u8 "${#name}"
        printf '%s' "$name"
        u8 "$version"
        u8 "${#instance}"
        printf '%s' "$instance"
        u16le "$size"
        payload "$state" "$offset" "$size"
    done < <(section_list "$m")
}

# The migration_stream target's input for manifest $1 and state file $2
# (mode 1: records, with the handshake): hello, the VM description, a
# memory batch with one zero page, round-end, every section, state-done.
migration_seed() {
    local m=$1 state=$2 name instance version optional offset size
    u8 1
    printf '{"protocol_min":1,"protocol_max":2,"software":"stasis 0.1.0"}' >"$tmp/p"
    record 1 "$tmp/p"
    jq -c '{vm_config: .body.vm_config, cpu: .body.cpu, memory_bytes: ([.body.memory.regions[].size] | add)}' "$m" >"$tmp/p"
    record 4 "$tmp/p"
    # One page, the zeros at guest physical 0 (entry kind 1: no data).
    { u32le 1; u32le 1; u32le 0; } >"$tmp/p"
    record 6 "$tmp/p"
    printf '{"round":1,"pages":1}' >"$tmp/p"
    record 7 "$tmp/p"
    while IFS=$'\t' read -r name instance version optional offset size; do
        {
            u16le "${#name}"
            printf '%s' "$name"
            u16le "${#instance}"
            printf '%s' "$instance"
            u32le "$version"
            u8 "$optional"
            payload "$state" "$offset" "$size"
        } >"$tmp/p"
        record 8 "$tmp/p" || continue
    done < <(section_list "$m")
    : >"$tmp/p"
    record 9 "$tmp/p"
}

# The page_map target's input for manifest $1 in directory $2: the
# padding of the last byte, then the map; fails for a full snapshot.
page_map_seed() {
    local m=$1 dir=$2 file pages bytes
    file=$(jq -r '.body.memory.page_map.file // empty' "$m")
    [ -n "$file" ] && [ -f "$dir/$file" ] || return 1
    pages=$(jq '.body.memory.page_size as $ps | ([.body.memory.regions[].size] | add) / $ps | floor' "$m")
    bytes=$(wc -c <"$dir/$file")
    u8 "$((bytes * 4 - pages))"
    cat "$dir/$file"
}

n=0
while IFS= read -r -d '' m; do
    n=$((n + 1))
    [ "$n" -le 10 ] || break
    dir=$(dirname "$m")
    rel=${dir#"$repo"/}
    id=$(printf '%s' "$rel" | tr -c 'A-Za-z0-9._-' '-')
    if [ "$(wc -c <"$m")" -le 1048576 ]; then
        cp "$m" "$corpus/manifest/gen-$id.json"
    fi
    $have_jq || continue
    # A manifest jq cannot read is still a manifest seed.
    state=$dir/$(jq -r '.body.state_file // empty' "$m" 2>/dev/null || true)
    if [ -f "$state" ]; then
        sections_seed "$m" "$state" >"$corpus/sections/gen-$id" ||
            rm -f "$corpus/sections/gen-$id"
        migration_seed "$m" "$state" >"$corpus/migration_stream/gen-$id" ||
            rm -f "$corpus/migration_stream/gen-$id"
    fi
    page_map_seed "$m" "$dir" >"$corpus/page_map/gen-$id" || rm -f "$corpus/page_map/gen-$id"
    echo "seeds from $rel" >&2
done < <(find "${dirs[@]}" -name manifest.json -type f -print0 | sort -z)
[ "$n" -gt 0 ] || echo "make-seeds.sh: no manifest.json under ${dirs[*]}" >&2

# --- from the sources ------------------------------------------------------

# migration_stream: a source that speaks only version 1.
{
    u8 1
    printf '{"protocol_min":1,"protocol_max":1,"software":"stasis 0.0.9"}' >"$tmp/p"
    record 1 "$tmp/p"
} >"$corpus/migration_stream/gen-hello-v1"
# migration_stream: frames of a further connection and of post-copy, no
# handshake (mode 3).
{
    u8 3
    printf '{"session":"00112233445566778899aabbccddeeff","index":1}' >"$tmp/p"
    record 18 "$tmp/p"
    { u32le 4096; u32le 0; u32le 8192; u32le 0; } >"$tmp/p"
    record 14 "$tmp/p"
    : >"$tmp/p"
    record 15 "$tmp/p"
    record 16 "$tmp/p"
    record 19 "$tmp/p"
} >"$corpus/migration_stream/gen-lane-postcopy"

# page_map: no pages; six pages (zero, here, parent, zero, here, zero).
u8 0 >"$corpus/page_map/gen-empty"
{ u8 2; u8 0x24; u8 0x01; } >"$corpus/page_map/gen-six-pages"

# config_toml: the examples of docs/CONFIG.md, one file per block.
awk -v out="$corpus/config_toml/gen-config-md-" '
    /^```toml$/ { n++; f = 1; next }
    /^```$/ { f = 0; next }
    f { print > (out n ".toml") }
' "$repo/docs/CONFIG.md"

# cpu_model: each psABI level as feature changes on the level below it,
# KVM's optional features, and host without AVX-512.
model_rs=$repo/crates/stasis-cpu/src/model.rs
# The features of constant $1 of model.rs, as +a,+b,...
level() {
    awk -v c="pub const $1:" '
        index($0, c) == 1 { f = 1 }
        f {
            while (match($0, /"[^"]*"/)) {
                printf "%s+%s", sep, substr($0, RSTART + 1, RLENGTH - 2)
                sep = ","
                $0 = substr($0, RSTART + RLENGTH)
            }
        }
        f && /\];/ { exit }
    ' "$model_rs"
}
printf 'x86-64,%s' "$(level PSABI_V2)" >"$corpus/cpu_model/gen-v2-on-x86-64"
printf 'x86-64-v2,%s' "$(level PSABI_V3)" >"$corpus/cpu_model/gen-v3-on-v2"
printf 'x86-64-v3,%s' "$(level PSABI_V4)" >"$corpus/cpu_model/gen-v4-on-v3"
printf 'x86-64,%s' "$(level KVM_GUEST_OPTIONAL)" >"$corpus/cpu_model/gen-kvm-optional"
printf 'host,%s' "$(level PSABI_V4 | sed 's/+/-/g')" >"$corpus/cpu_model/gen-host-without-v4"

# The cpu_model dictionary: every feature name and alias, every model name.
{
    echo "# Generated by make-seeds.sh from crates/stasis-cpu: feature names, aliases, models."
    sed -nE 's/^    \("([a-z0-9_.-]+)",.*/"\1"/p' \
        "$repo/crates/stasis-cpu/src/names.rs" "$repo/crates/stasis-cpu/src/feature.rs"
    sed -nE 's/.*CpuModel::[A-Za-z0-9_]+ => "([a-z0-9-]+)",?$/"\1"/p' "$model_rs"
    printf '"%s"\n' "," "+" "-" "x86-64-v1" "cpuid 0x" " bit "
} | awk '!seen[$0]++' >"$fuzz/dict/cpu_model.dict"

for t in manifest sections page_map migration_stream http_request config_toml cpu_model; do
    printf '%-17s %3d seeds\n' "$t" "$(find "$corpus/$t" -maxdepth 1 -type f | wc -l)"
done
