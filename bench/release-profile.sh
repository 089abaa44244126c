#!/usr/bin/env bash
# Compares candidate release profiles of the `trine` binary on this machine:
# clean build time, binary size, HTTP requests/s of a running node (wrk on
# /healthz and /metrics), and start-to-ready time. Results go to stdout as a
# Markdown table for BENCHMARKS.md.
#   bash bench/release-profile.sh            (needs wrk, curl and bc: apt-get install wrk curl bc)
# Each variant builds from scratch in its own target dir under target/bench-profile.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk"; exit 1; }
command -v curl >/dev/null && command -v bc >/dev/null || { echo "curl or bc not found: apt-get install curl bc"; exit 1; }
root=$PWD/target/bench-profile
rounds=${ROUNDS:-3}
# name  lto  codegen-units
variants=("thin-16 thin 16" "fat-1 fat 1" "off-16 false 16")
declare -A build_s size_mb

for v in "${variants[@]}"; do
  read -r name lto cgu <<<"$v"
  dir=$root/$name
  rm -rf "$dir"
  echo "building $name (lto=$lto, codegen-units=$cgu) ..." >&2
  start=$(date +%s.%N)
  CARGO_PROFILE_RELEASE_LTO=$lto CARGO_PROFILE_RELEASE_CODEGEN_UNITS=$cgu \
    cargo build --release --locked --quiet --bin trine --target-dir "$dir"
  build_s[$name]=$(echo "$(date +%s.%N) - $start" | bc)
  size_mb[$name]=$(echo "scale=1; $(stat -c %s "$dir/release/trine") / 1048576" | bc)
done

# Starts a node from $1, prints "<http addr> <pid> <ms to ready>".
start_node() {
  local bin=$1 data
  data=$(mktemp -d)
  local t0 t1
  t0=$(date +%s%N)
  "$bin" node --data-dir "$data/d" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --log-level warn 2>/dev/null &
  local pid=$! addr=""
  until [ -n "$addr" ] && curl -fs "http://$addr/readyz" >/dev/null 2>&1; do
    addr=$(sed -n 's/.*"http": "\(.*\)".*/\1/p' "$data/d/endpoints.json" 2>/dev/null || true)
    sleep 0.002
  done
  t1=$(date +%s%N)
  echo "$addr $pid $(( (t1 - t0) / 1000000 ))"
}

rps() { wrk -t1 -c32 -d"${DURATION:-8}s" "$1" | awk '/Requests\/sec/ {print int($2)}'; }

declare -A healthz metrics ready
for round in $(seq "$rounds"); do
  for v in "${variants[@]}"; do
    read -r name _ _ <<<"$v"
    read -r addr pid ms < <(start_node "$root/$name/release/trine")
    healthz[$name]+="$(rps "http://$addr/healthz") "
    metrics[$name]+="$(rps "http://$addr/metrics") "
    ready[$name]+="$ms "
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    echo "round $round $name done" >&2
  done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| profile (lto, codegen-units) | clean build | binary | /healthz req/s | /metrics req/s | start to ready |"
echo "|---|---|---|---|---|---|"
for v in "${variants[@]}"; do
  read -r name lto cgu <<<"$v"
  printf '| %s (%s, %s) | %.0f s | %s MiB | %s | %s | %s ms |\n' "$name" "$lto" "$cgu" \
    "${build_s[$name]}" "${size_mb[$name]}" \
    "$(median <<<"${healthz[$name]}")" "$(median <<<"${metrics[$name]}")" "$(median <<<"${ready[$name]}")"
done
echo "(median of $rounds rounds; wrk -t1 -c32 -d${DURATION:-8}s against one node on loopback, both on this machine's cores)"
