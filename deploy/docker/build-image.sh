#!/usr/bin/env bash
# Builds Trine's container images with no registry: each image is FROM
# scratch, holding the binary, the C libraries it links (found with ldd),
# busybox (from Debian's busybox-static, for a shell, wget and the
# HEALTHCHECK) and a non-root user. CI and users both run this script; with a
# registry, deploy/docker/Dockerfile is the conventional multi-stage build.
#
#   deploy/docker/build-image.sh [--binary PATH] [--tag TAG] [--monitoring] [--no-trine]
#                                [--prometheus-tag TAG] [--alertmanager-tag TAG]
#
#   --binary PATH   the trine binary to put in the image (default: build it
#                   with `cargo build --release --locked --bin trine`)
#   --tag TAG       the trine image's tag (default: trine:local)
#   --monitoring    also build trine-prometheus:local and
#                   trine-alertmanager:local from Debian's prometheus and
#                   prometheus-alertmanager packages (docker-compose.yml runs them)
#   --no-trine      only the monitoring images
#   --prometheus-tag TAG, --alertmanager-tag TAG
#                   their tags (defaults as above)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

binary=""
tag="trine:local"
monitoring=0
prometheus_tag="trine-prometheus:local"
alertmanager_tag="trine-alertmanager:local"
trine=1
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    --monitoring) monitoring=1; shift ;;
    --no-trine) trine=0; monitoring=1; shift ;;
    --prometheus-tag) prometheus_tag=${2:?--prometheus-tag needs a name}; shift 2 ;;
    --alertmanager-tag) alertmanager_tag=${2:?--alertmanager-tag needs a name}; shift 2 ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found: install Docker Engine (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer: start it (systemctl start docker) or add this user to the docker group"
command -v ldd >/dev/null || die "ldd not found: apt-get install libc-bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/trine-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A Debian package's files, unpacked under $work/debs/<pkg> without
# installing it (apt-get download needs no root; an empty package list does).
deb() {
  local pkg=$1 dir=$work/debs/$1
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir"
    if ! (cd "$work/debs" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
      [ "$(id -u)" -eq 0 ] || die "apt-get download $pkg failed; run 'sudo apt-get update' and retry"
      say "apt-get update (for $pkg)"
      apt-get update -qq
      (cd "$work/debs" && apt-get download -qq "$pkg") || die "apt-get download $pkg failed: is deb.debian.org reachable?"
    fi
    dpkg-deb -x "$work"/debs/"${pkg}"_*.deb "$dir"
  fi
  printf '%s\n' "$dir"
}

# Copies an executable and every library ldd says it loads into a rootfs,
# at the same paths.
with_libs() {
  local exe=$1 root=$2
  local line path
  while read -r line; do
    path=""
    case "$line" in
      *"=> not found"*) die "$exe needs ${line%% *}, which is not installed here" ;;
      *"=> /"*) path=${line#*=> }; path=${path%% (*} ;;
      /*) path=${line%% (*} ;;
    esac
    [ -n "$path" ] || continue
    mkdir -p "$root$(dirname "$path")"
    cp -L "$path" "$root$path"
  done < <(ldd "$exe" 2>/dev/null || true)
}

# The common base: busybox (+ applet links), passwd/group with the service
# user, nsswitch and CA certificates; $2 is the user (name:uid).
base_rootfs() {
  local root=$1 user=$2 uid=$3
  local bb
  bb=$(deb busybox-static)/bin/busybox
  mkdir -p "$root"/{bin,etc,tmp,usr/local/bin,etc/ssl/certs}
  cp "$bb" "$root/bin/busybox"
  local applet
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\n%s:x:%s:%s:%s:/var/lib/%s:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    "$user" "$uid" "$uid" "$user" "$user" >"$root/etc/passwd"
  printf 'root:x:0:\n%s:x:%s:\nnogroup:x:65534:\n' "$user" "$uid" >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  fi
}

# Packs a rootfs as root-owned, and the listed state directories as owned
# by uid:uid, mode 0700 (ADD keeps a tar's owners and modes).
pack() {
  local ctx=$1 uid=$2; shift 2
  tar --numeric-owner --owner=0 --group=0 -C "$ctx/rootfs" -cf "$ctx/base.tar" .
  mkdir -p "$ctx/state"
  local d
  for d in "$@"; do
    mkdir -p "$ctx/state/$d"
    chmod 0700 "$ctx/state/$d"
  done
  tar --numeric-owner --owner="$uid" --group="$uid" -C "$ctx/state" -cf "$ctx/state.tar" .
}

build() {
  local ctx=$1 tag=$2
  say "docker build -t $tag"
  docker build -q -t "$tag" -f "$ctx/Dockerfile" "$ctx" >/dev/null
  say "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

if [ "$trine" -eq 1 ]; then
  if [ -z "$binary" ]; then
    say "cargo build --release --locked --bin trine (a few minutes on a small machine)"
    (cd "$repo" && cargo build --release --locked --bin trine)
    binary=$repo/target/release/trine
  fi
  [ -x "$binary" ] || die "$binary is not an executable trine binary"
  ctx=$work/trine
  mkdir -p "$ctx/rootfs"
  base_rootfs "$ctx/rootfs" trine 10001
  cp "$binary" "$ctx/rootfs/usr/local/bin/trine"
  with_libs "$binary" "$ctx/rootfs"
  # /var/lib/trine: the node's data dir (a volume); /certs and /models: the
  # compose testnet's shared volumes take their owner from these.
  pack "$ctx" 10001 var/lib/trine certs models
  cp "$here/scratch/Dockerfile.trine" "$ctx/Dockerfile"
  build "$ctx" "$tag"
fi

if [ "$monitoring" -eq 1 ]; then
  for svc in prometheus alertmanager; do
    case $svc in
      prometheus) pkg=prometheus; exe=usr/bin/prometheus; tools=usr/bin/promtool ;;
      alertmanager) pkg=prometheus-alertmanager; exe=usr/bin/prometheus-alertmanager; tools=usr/bin/amtool ;;
    esac
    src=$(deb "$pkg")
    ctx=$work/$svc
    mkdir -p "$ctx/rootfs"
    base_rootfs "$ctx/rootfs" "$svc" 10002
    for f in $exe $tools; do
      mkdir -p "$ctx/rootfs/$(dirname "$f")"
      cp "$src/$f" "$ctx/rootfs/$f"
      with_libs "$src/$f" "$ctx/rootfs"
    done
    # Templates (alertmanager's default.tmpl) and web assets.
    if [ -d "$src/usr/share/prometheus" ]; then
      mkdir -p "$ctx/rootfs/usr/share"
      cp -a "$src/usr/share/prometheus" "$ctx/rootfs/usr/share/"
    fi
    mkdir -p "$ctx/rootfs/etc/$svc"
    pack "$ctx" 10002 "var/lib/$svc"
    cp "$here/scratch/Dockerfile.$svc" "$ctx/Dockerfile"
    if [ "$svc" = prometheus ]; then build "$ctx" "$prometheus_tag"; else build "$ctx" "$alertmanager_tag"; fi
  done
fi
