#!/usr/bin/env bash
# Fuzzes the protocol parsers with AFL++ (cargo-afl), SECONDS per target, one
# target at a time (so a 2-core machine keeps a core for everything else).
#
#   fuzz/run.sh SECONDS [TARGET...]     targets: command hello lines (default: all)
#
# Installs cargo-afl if missing (`cargo install cargo-afl`, which builds the
# AFL++ it ships with: needs make and a C compiler, nothing downloaded beyond
# the crate). Fuzzes each target from its seeds in fuzz/corpus/<target>
# (afl-fuzz refuses to start when a seed itself crashes). The checks' own
# tests, which replay the seeds without AFL++, are
#   cargo test --manifest-path fuzz/Cargo.toml
# Exits non-zero when a target crashed or hung, printing each such input's path and bytes; replay one with
#   cargo run --manifest-path fuzz/Cargo.toml --bin TARGET -- PATH
# Findings stay in fuzz/out/<target>/ (not committed); copy an interesting
# one into fuzz/corpus/<target>/ to keep it as a seed.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_DIR=$(pwd)

usage() { echo "usage: $0 SECONDS [command|hello|lines ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
SECONDS_PER_TARGET=$1
shift
[[ $SECONDS_PER_TARGET =~ ^[1-9][0-9]*$ ]] || usage
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(command hello lines)
for t in "${TARGETS[@]}"; do
    case $t in command | hello | lines) ;; *) usage ;; esac
done

# Instrumented builds use other compiler flags than the broker's own: keep
# them in a target directory of their own, whatever the caller's
# CARGO_TARGET_DIR, so that neither build invalidates the other.
export CARGO_TARGET_DIR=$FUZZ_DIR/target

# --- Install what is missing (idempotent) ---------------------------------
if ! command -v make >/dev/null || ! command -v cc >/dev/null; then
    echo "== installing make and a C compiler (cargo-afl builds AFL++ from source)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends make gcc libc6-dev
fi
if ! cargo afl --version >/dev/null 2>&1; then
    echo "== installing cargo-afl"
    cargo install --locked cargo-afl
fi
# `cargo install` builds AFL++ for the toolchain in use; another toolchain
# (or a failed build at install time) needs `cargo afl config --build`, which
# builds it when missing and otherwise says it is already built.
if ! out=$(cargo afl config --build 2>&1); then
    if ! grep -q "already built" <<<"$out"; then
        echo "cannot build AFL++ for $(rustc --version) (cargo afl config --build):" >&2
        echo "$out" >&2
        exit 1
    fi
fi

echo "== building the instrumented targets (cargo afl build --release)"
cargo afl build --release --bins --quiet

# --- Fuzz, one target at a time -------------------------------------------
# In containers: no CPU frequency governor to check, core dumps may go to a
# pipe handler (no crash is lost: AFL++ sees the signal itself), no UI.
export AFL_SKIP_CPUFREQ=1
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_NO_UI=1
export AFL_NO_AFFINITY=1 # do not pin to a core other engineers' jobs use
export AFL_NO_STARTUP_CALIBRATION=1
export AFL_FAST_CAL=1

status=0
summary=()
for t in "${TARGETS[@]}"; do
    out=$FUZZ_DIR/out/$t
    rm -rf "$out" # a fresh campaign each run: the seeds are the corpus
    mkdir -p "$out"
    dict=()
    [ -f "$FUZZ_DIR/dict/$t.dict" ] && dict=(-x "$FUZZ_DIR/dict/$t.dict")
    echo "== fuzzing $t for ${SECONDS_PER_TARGET}s"
    # -V: stop after this long. -t: per-input timeout in ms; inputs are at
    # most 1 MiB, so a parser taking this long is quadratic somewhere, a bug
    # of its own reported as a hang (generous, for a loaded machine).
    set +e
    cargo afl fuzz -V "$SECONDS_PER_TARGET" -t 2000 "${dict[@]}" \
        -i "$FUZZ_DIR/corpus/$t" -o "$out" \
        "$CARGO_TARGET_DIR/release/$t" >"$out/afl.log" 2>&1
    rc=$?
    set -e
    stats=$out/default/fuzzer_stats
    if [ $rc -ne 0 ] || [ ! -f "$stats" ]; then
        echo "afl-fuzz failed on $t (exit $rc); its output:" >&2
        tail -n 40 "$out/afl.log" >&2
        status=1
        continue
    fi
    get() { sed -n "s/^$1 *: *//p" "$stats"; }
    line="$t: $(get execs_done) execs, $(get execs_per_sec) execs/s, corpus $(get corpus_count) (from $(get corpus_found) found), edges $(get edges_found)/$(get total_edges), crashes $(get saved_crashes), hangs $(get saved_hangs)"
    echo "$line"
    summary+=("$line")
    for kind in crashes hangs; do
        for f in "$out/default/$kind"/id:*; do
            [ -e "$f" ] || continue
            echo "!! $t: $kind input $f" >&2
            od -A x -t x1z -v "$f" | head -n 32 >&2
            status=1
        done
    done
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ $status -ne 0 ]; then
    echo "fuzzing found problems (above); replay one with: cargo run --manifest-path fuzz/Cargo.toml --bin TARGET -- PATH" >&2
fi
exit $status
