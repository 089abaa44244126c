#!/bin/sh
# Starts a Trine node in a StatefulSet pod (busybox sh; ConfigMap
# trine-scripts, mounted at /etc/trine/scripts).
#
#   start.sh certs   init container: issue this pod's node certificate from
#                    the cluster CA (Secret trine-ca at $CA_DIR) into
#                    $TRINE_TLS_DIR, unless a current one is there
#   start.sh node    main container: copy the admin token (Secret
#                    trine-admin-token at $ADMIN_TOKEN_DIR) to
#                    $TRINE_ADMIN_TOKEN_FILE (0600), then exec `trine node`
#                    with this pod's name, announce addresses and --init
#                    (the seed pod) or --join/--bootstrap (every other pod)
#
# From the downward API: POD_NAME, POD_NAMESPACE, POD_IP, TOPOLOGY_REGION,
# TOPOLOGY_ZONE. From ConfigMap trine-config: TRINE_* node settings and
# SEED_POD, PEER_SERVICE, CLUSTER_DOMAIN, RENEW_CERT_AFTER_DAYS.
set -eu

mode=${1:-node}
say() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: error: $*" >&2; exit 1; }

: "${POD_NAME:?POD_NAME is not set (downward API metadata.name)}"
: "${POD_NAMESPACE:?POD_NAMESPACE is not set (downward API metadata.namespace)}"
PEER_SERVICE=${PEER_SERVICE:-trine-peers}
CLUSTER_DOMAIN=${CLUSTER_DOMAIN:-cluster.local}
SEED_POD=${SEED_POD:-trine-0}
CA_DIR=${CA_DIR:-/etc/trine/ca}
ADMIN_TOKEN_DIR=${ADMIN_TOKEN_DIR:-/etc/trine/admin}
TRINE=${TRINE:-trine}
tls=${TRINE_TLS_DIR:-/var/lib/trine/tls}

# Ports: the ones the node listens on (trine-config), so announce and join
# addresses follow a port change there.
port_of() { echo "${1##*:}"; }
raft_port=$(port_of "${TRINE_RAFT_ADDR:-0.0.0.0:7403}")
p2p_port=${TRINE_P2P_LISTEN:-/ip4/0.0.0.0/tcp/7402}
p2p_port=${p2p_port%%,*}
p2p_port=${p2p_port#*/tcp/}
p2p_port=${p2p_port%%/*}

# The names peers dial this pod by (the headless Service's pod records).
short=$POD_NAME.$PEER_SERVICE
fqdn=$POD_NAME.$PEER_SERVICE.$POD_NAMESPACE.svc.$CLUSTER_DOMAIN

certs() {
  if [ -s "$tls/node.crt" ] && [ -s "$tls/node.key" ] && [ -s "$tls/ca.crt" ]; then
    days=${RENEW_CERT_AFTER_DAYS:-300}
    if [ -n "$(find "$tls/node.crt" -mtime +"$days" 2>/dev/null)" ]; then
      say "node certificate in $tls is older than $days days: issuing a new one"
    else
      if [ -r "$CA_DIR/ca.crt" ] && ! cmp -s "$CA_DIR/ca.crt" "$tls/ca.crt"; then
        say "warning: $tls/ca.crt differs from the CA in Secret trine-ca; keeping the current certificate (delete $tls to re-issue)"
      fi
      say "node certificate present in $tls"
      return 0
    fi
  fi
  if ! [ -r "$CA_DIR/ca.crt" ] || ! [ -r "$CA_DIR/ca.key" ]; then
    die "no cluster CA in $CA_DIR: create Secret trine-ca from \`trine certs init --ca-dir DIR\` (see deploy/k8s/README.md)"
  fi
  # `trine certs issue` wants the CA key as a 0600 file it can read: a
  # Secret volume's files belong to root, and with fsGroup the kubelet makes
  # them group-readable, which certs issue refuses. Copy the CA to /tmp
  # (memory-backed), 0600 and ours, and remove it afterwards. (certs issue
  # only reads the CA dir, so the read-only mount itself is no problem.)
  work=/tmp/trine-ca.$$
  trap 'rm -rf "$work"' EXIT
  (umask 077 && mkdir -p "$work/ca" &&
    cat "$CA_DIR/ca.crt" >"$work/ca/ca.crt" &&
    cat "$CA_DIR/ca.key" >"$work/ca/ca.key")
  # Issue into a fresh directory and swap it in, so an interrupted start
  # never leaves half a TLS dir (certs issue will not overwrite files).
  rm -rf "$tls.new"
  "$TRINE" certs issue --ca-dir "$work/ca" --name "$POD_NAME" \
    --san "$fqdn" --san "$short" \
    --san "$POD_NAME.$PEER_SERVICE.$POD_NAMESPACE" \
    --san "$POD_NAME.$PEER_SERVICE.$POD_NAMESPACE.svc" \
    --out "$tls.new"
  rm -rf "$work" "$tls.old"
  if [ -e "$tls" ]; then mv "$tls" "$tls.old"; fi
  mv "$tls.new" "$tls"
  rm -rf "$tls.old"
  say "issued a node certificate for $POD_NAME ($short, $fqdn) into $tls"
}

node() {
  [ -s "$tls/node.crt" ] ||
    die "no node certificate in $tls: the certs init container issues it (start.sh certs)"
  export TRINE_TLS_DIR="$tls"

  # The admin token: the node (and the CLI) refuse a secret file that group
  # or others can read, and with fsGroup the kubelet makes Secret files
  # group-readable; so copy it, 0600 and ours, into memory-backed /tmp.
  token=${TRINE_ADMIN_TOKEN_FILE:-/tmp/trine-admin.token}
  [ -r "$ADMIN_TOKEN_DIR/token" ] ||
    die "no admin token in $ADMIN_TOKEN_DIR: create Secret trine-admin-token from \`trine token secret --out FILE\` (see deploy/k8s/README.md)"
  rm -f "$token"
  (umask 077 && cat "$ADMIN_TOKEN_DIR/token" >"$token")
  export TRINE_ADMIN_TOKEN_FILE="$token"

  # Region and zone: an explicit TRINE_REGION / TRINE_ZONE (trine-config or
  # the pod's env) wins; else the pod's topology labels; else the node's
  # default. An empty TRINE_REGION is an invalid setting to the node.
  if [ -z "${TRINE_REGION:-}" ]; then
    unset TRINE_REGION
    if [ -n "${TOPOLOGY_REGION:-}" ]; then
      export TRINE_REGION="$TOPOLOGY_REGION"
    else
      say "warning: no region: set TRINE_REGION, or run on Kubernetes with PodTopologyLabelsAdmission and nodes labelled topology.kubernetes.io/region; the node says \"local\""
    fi
  fi
  if [ -z "${TRINE_ZONE:-}" ] && [ -n "${TOPOLOGY_ZONE:-}" ]; then
    export TRINE_ZONE="$TOPOLOGY_ZONE"
  fi

  # The node records a gRPC and an HTTP address in the cluster, and peers
  # dial them (forwarded requests, model downloads, cluster views): this
  # pod's DNS name, while it listens on 0.0.0.0.
  grpc_port=$(port_of "${TRINE_GRPC_ADDR:-0.0.0.0:7400}")
  http_port=$(port_of "${TRINE_HTTP_ADDR:-0.0.0.0:7401}")
  export TRINE_GRPC_ANNOUNCE="${TRINE_GRPC_ANNOUNCE:-$short:$grpc_port}"
  export TRINE_HTTP_ANNOUNCE="${TRINE_HTTP_ANNOUNCE:-$short:$http_port}"

  set -- node --name "$POD_NAME" \
    --p2p-announce "/dns4/$short/tcp/$p2p_port" \
    --raft-announce "$short:$raft_port"
  if [ "$POD_NAME" = "$SEED_POD" ]; then
    # Ignored by the node once its data dir belongs to a cluster.
    set -- "$@" --init
  else
    set -- "$@" --join "$SEED_POD.$PEER_SERVICE:$raft_port" \
      --bootstrap "/dns4/$SEED_POD.$PEER_SERVICE/tcp/$p2p_port"
  fi
  say "region=${TRINE_REGION:-local} zone=${TRINE_ZONE:-} grpc=${TRINE_GRPC_ADDR:-} (announce ${TRINE_GRPC_ANNOUNCE:-none}) http=${TRINE_HTTP_ADDR:-} (announce ${TRINE_HTTP_ANNOUNCE:-none})"
  say "exec $TRINE $*"
  exec "$TRINE" "$@"
}

case $mode in
  certs) certs ;;
  node) node ;;
  *) die "unknown mode '$mode' (certs or node)" ;;
esac
