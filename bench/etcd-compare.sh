#!/usr/bin/env bash
# etcd beside Trine's control plane, same machine, same voter count: a
# 3-member etcd cluster (Debian's etcd-server, WAL fsynced per batch as
# Trine's sled log is) on loopback, loaded by etcd's own checker
# (`etcdctl check perf`). Needs: apt-get install etcd-server etcd-client.
# Usage: bash bench/etcd-compare.sh [s|m|l|xl]   (etcd's load profiles)
set -euo pipefail
load=${1:-l}
command -v etcd >/dev/null && command -v etcdctl >/dev/null || {
  echo "needs etcd and etcdctl: apt-get install etcd-server etcd-client"; exit 1; }
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
cluster="m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "m$i" --data-dir "$dir/m$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token bench \
    >"$dir/m$i.log" 2>&1 &
  pids+=($!)
done
endpoints="http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793"
for _ in $(seq 50); do
  ETCDCTL_API=3 etcdctl --endpoints="$endpoints" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
etcd --version | head -n1
ETCDCTL_API=3 etcdctl --endpoints="$endpoints" check perf --load="$load"
