#!/usr/bin/env bash
# Runs every cargo-fuzz target (node/engine/fuzz, then node/fuzz) for a few
# seconds each, seeded with the corpora kept in the repository: what CI does
# on every run. New inputs go to a temporary directory, so the kept corpora
# do not change (grow them with a long run and `cargo fuzz cmin`, see the
# fuzz crates' Cargo.toml). A crash fails the script; libFuzzer leaves the
# input in <crate>/fuzz/artifacts/<target>/ and its log is printed.
#
# Usage: bash node/fuzz/short-run.sh [SECONDS per target, default 30] [CRATE...]
# CRATE is node/engine or node (both when absent). CI runs the engine's
# targets (model files, tokenizer: about 1.5 minutes to build); the node's
# need a 14-minute sanitizer build on 2 cores, so CI replays their corpora
# instead (`cargo test -p trine-node fuzz`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs=${1:-30}
case "$secs" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS per target] [node/engine|node ...]"; exit 2 ;;
esac
shift || true
crates=("$@")
[ ${#crates[@]} -gt 0 ] || crates=(node/engine node)
for crate in "${crates[@]}"; do
  [ -f "$crate/fuzz/Cargo.toml" ] || { echo "fuzz: no fuzz crate in $crate/fuzz (node/engine or node)"; exit 2; }
done
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# libFuzzer's sanitizer flags need nightly rustc; this lets the stable one.
export RUSTC_BOOTSTRAP=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for crate in "${crates[@]}"; do
  # A fresh clone has no lock file for the fuzz crate (it is not in the
  # workspace): start from the workspace's, so the code fuzzed is built
  # with the dependency versions the product ships with.
  [ -f "$crate/fuzz/Cargo.lock" ] || cp Cargo.lock "$crate/fuzz/Cargo.lock"
  echo "fuzz: building $crate/fuzz (release, AddressSanitizer)"
  (cd "$crate" && cargo fuzz build -O)
  for target in $(cd "$crate" && cargo fuzz list); do
    mkdir -p "$work/$target"
    dirs=("fuzz/corpus/$target")
    [ -d "$crate/fuzz/seeds/$target" ] && dirs+=("fuzz/seeds/$target")
    log="$work/$target.log"
    if ! (cd "$crate" && cargo fuzz run -O "$target" "$work/$target" "${dirs[@]}" -- \
      -max_total_time="$secs" -print_final_stats=1) >"$log" 2>&1; then
      tail -n 60 "$log"
      echo "fuzz: $crate $target FAILED; the input is in $crate/fuzz/artifacts/$target/"
      exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    kept=$(find "$work/$target" -type f | wc -l)
    echo "fuzz: $crate $target: ${runs:-?} runs in ${secs}s, 0 crashes, $kept new inputs"
  done
done
