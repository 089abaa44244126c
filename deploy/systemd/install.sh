#!/usr/bin/env bash
# Installs a Trine node as a systemd service on this host (or into a
# scratch root with --root), idempotently: a second run changes nothing
# and says so.
#
#   install.sh [--root DIR] [--binary PATH] [--config FILE]
#              [--ca-dir DIR --name NODE [--san HOST ...]] [--no-enable]
#   install.sh [--root DIR] --uninstall [--purge]
#
# What it does (paths inside --root, / by default):
#   - system group and user `trine` (home /var/lib/trine, no login shell);
#   - /usr/local/bin/trine (0755) from --binary;
#   - /etc/systemd/system/trine.service (0644) from trine.service next to
#     this script;
#   - /etc/trine (0750 root:trine) and /etc/trine/trine.toml (0640
#     root:trine) from --config or trine.toml.example, only if absent: an
#     existing config is never overwritten;
#   - /var/lib/trine (0700 trine), with the data dir and TLS dir named in
#     the config (0700 trine);
#   - with --ca-dir: the node certificate, issued by `trine certs issue`
#     into the TLS dir unless one is there (node.key 0600 trine);
#   - on a host booted with systemd: daemon-reload, enable, and start,
#     unless the config still has the example's placeholder addresses
#     (edit its CHANGE lines, then start it or rerun). With --root it only
#     enables the unit offline (`systemctl --root DIR enable`), never
#     touching the host's systemd. --no-enable skips enabling and starting.
#   --uninstall stops and disables the service and removes the unit and
#   the binary; it keeps /etc/trine, /var/lib/trine and the user unless
#   --purge is given too.

set -euo pipefail
umask 022

readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly UNIT_SRC="$SCRIPT_DIR/trine.service"
readonly EXAMPLE_CONFIG="$SCRIPT_DIR/trine.toml.example"
readonly USER_NAME=trine
readonly GROUP_NAME=trine
readonly BIN_PATH=/usr/local/bin/trine
readonly UNIT_PATH=/etc/systemd/system/trine.service
readonly DROPIN_DIR=/etc/systemd/system/trine.service.d
readonly CONFIG_DIR=/etc/trine
readonly CONFIG_PATH=/etc/trine/trine.toml
readonly STATE_DIR=/var/lib/trine

usage() {
    cat <<'EOF'
usage: install.sh [--root DIR] [--binary PATH] [--config FILE]
                  [--ca-dir DIR --name NODE [--san HOST ...]] [--no-enable]
       install.sh [--root DIR] --uninstall [--purge]

  --root DIR      install into DIR instead of / (DIR/etc/passwd and
                  DIR/etc/group must exist); the host's systemd is not touched
  --binary PATH   the trine binary to install [default: target/release/trine
                  of this checkout, else keep the one already installed]
  --config FILE   config to install as /etc/trine/trine.toml when none is
                  there [default: trine.toml.example next to this script]
  --ca-dir DIR    cluster CA (ca.crt, ca.key from `trine certs init`): issue
                  this node's certificate into the config's tls_dir, unless
                  one is there
  --name NODE     node name for the certificate (and for the config, when
                  it is installed from the example)
  --san HOST      more host names or addresses in the certificate (repeat)
  --no-enable     do not enable or start the service
  --uninstall     stop and disable the service, remove unit and binary;
                  keep config, data and the user
  --purge         with --uninstall: also remove /etc/trine, /var/lib/trine
                  and the trine user and group
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
ok() { printf 'install.sh: ok: %s\n' "$*"; }
CHANGES=0
did() { CHANGES=$((CHANGES + 1)); printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# --- arguments ---------------------------------------------------------------
ROOT=/
BINARY=
CONFIG_SRC=
CA_DIR=
NODE_NAME=
SANS=()
ENABLE=1
UNINSTALL=0
PURGE=0

need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        --binary) need_value "$@"; BINARY=$2; shift 2 ;;
        --config) need_value "$@"; CONFIG_SRC=$2; shift 2 ;;
        --ca-dir) need_value "$@"; CA_DIR=$2; shift 2 ;;
        --name) need_value "$@"; NODE_NAME=$2; shift 2 ;;
        --san) need_value "$@"; SANS+=("$2"); shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ $EUID -eq 0 ]] || die "must run as root (it creates a system user and root-owned files); run it with sudo"
[[ $PURGE -eq 0 || $UNINSTALL -eq 1 ]] || die "--purge only goes with --uninstall: install.sh --uninstall --purge"
if [[ $UNINSTALL -eq 1 ]] && [[ -n $BINARY || -n $CONFIG_SRC || -n $CA_DIR || -n $NODE_NAME || ${#SANS[@]} -gt 0 ]]; then
    die "--uninstall takes only --root and --purge"
fi
if [[ -n $CA_DIR && -z $NODE_NAME ]]; then
    die "--ca-dir needs --name NODE, the node name to put in the certificate"
fi
if [[ -n $NODE_NAME && ! $NODE_NAME =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; then
    die "--name $NODE_NAME is not a valid node name: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
fi
if [[ ${#SANS[@]} -gt 0 && -z $CA_DIR ]]; then
    die "--san only matters with --ca-dir (it goes into the certificate)"
fi

[[ -d $ROOT ]] || die "--root $ROOT is not a directory; create it first"
ROOT=$(cd "$ROOT" && pwd -P)
R=${ROOT%/}               # "" for the host, so "$R/etc" is /etc
if [[ -n $R ]]; then
    [[ -f $R/etc/passwd && -f $R/etc/group ]] ||
        die "--root $ROOT has no etc/passwd or etc/group; copy the host's in (cp /etc/passwd /etc/group $ROOT/etc/) so the trine user can be added there"
    WHERE="in $ROOT"
else
    WHERE="on this host"
fi
p() { printf '%s%s' "$R" "$1"; }   # a path inside the root, as seen from here

# systemd is running only when installing into / on a host booted with it.
SYSTEMD_LIVE=0
if [[ -z $R && -d /run/systemd/system ]]; then SYSTEMD_LIVE=1; fi
systemctl_root() { if [[ -n $R ]]; then systemctl --root="$R" "$@"; else systemctl "$@"; fi; }
unit_enabled() { [[ $(systemctl_root is-enabled trine.service 2>/dev/null || true) == enabled ]]; }

# --- accounts (numeric ids come from the root's own passwd/group) -------------
lookup_id() { # lookup_id passwd|group NAME -> uid/gid or ""
    if [[ -z $R ]]; then
        getent "$1" "$2" | cut -d: -f3 || true
    else
        awk -F: -v n="$2" '$1 == n { print $3; exit }' "$R/etc/$1"
    fi
}

# --- small idempotent steps ---------------------------------------------------
# ensure_meta PATH MODE UID GID: fix the mode and owner of an existing path.
ensure_meta() {
    local path=$1 mode=$2 uid=$3 gid=$4 cur
    cur=$(stat -c '%a %u %g' "$path")
    if [[ $cur != "$mode $uid $gid" ]]; then
        chown "$uid:$gid" "$path"
        chmod "$mode" "$path"
        did "set ${path#"$R"} to mode $mode, owner $uid:$gid (was $cur)"
    fi
}

ensure_dir() { # ensure_dir PATH MODE UID GID
    local path=$1
    if [[ -L $path || (-e $path && ! -d $path) ]]; then
        die "${path#"$R"} exists and is not a directory; move it away and rerun"
    fi
    if [[ ! -d $path ]]; then
        mkdir -p "$path"
        chown "$3:$4" "$path"
        chmod "$2" "$path"
        did "created ${path#"$R"} (mode $2, owner $3:$4)"
    else
        ensure_meta "$@"
    fi
}

# install_file SRC DEST MODE UID GID WHAT: copy if missing or different
# (atomically: a running node keeps its old binary until restarted).
install_file() {
    local src=$1 dest=$2 mode=$3 uid=$4 gid=$5 what=$6 tmp
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        ok "$what ${dest#"$R"} is up to date"
        ensure_meta "$dest" "$mode" "$uid" "$gid"
        return 1
    fi
    tmp=$(dirname "$dest")/.$(basename "$dest").install.$$
    install -m "$mode" -o "$uid" -g "$gid" "$src" "$tmp"
    mv -f "$tmp" "$dest"
    did "installed $what ${dest#"$R"} (from $src)"
    return 0
}

# effective config: KEY -> value of `trine node --print-config`, with no
# TRINE_* variables of this shell leaking in.
EFFECTIVE=
read_config() { # read_config BIN FILE [NAME-IN-MESSAGES]
    EFFECTIVE=$(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$1" node --config "$2" --print-config 2>&1) || {
        printf '%s\n' "${EFFECTIVE//"$2"/${3:-$2}}" >&2
        return 1
    }
}
config_value() { # config_value KEY -> the unquoted string value
    printf '%s\n' "$EFFECTIVE" | sed -n "s/^$1 = \"\(.*\)\"\$/\1/p" | head -n 1
}

# ==============================================================================
uninstall() {
    say "uninstalling trine $WHERE"
    if [[ $SYSTEMD_LIVE -eq 1 ]]; then
        if systemctl is-active --quiet trine.service; then
            say "stopping trine (it drains in-flight requests first)"
            systemctl stop trine.service
            did "stopped trine.service"
        fi
        if unit_enabled; then
            systemctl disable --quiet trine.service
            did "disabled trine.service"
        fi
    elif [[ -f $(p "$UNIT_PATH") ]] && unit_enabled; then
        systemctl_root disable --quiet trine.service
        did "disabled trine.service $WHERE (offline)"
    fi
    if [[ -e $(p "$UNIT_PATH") ]]; then
        rm -f "$(p "$UNIT_PATH")"
        did "removed $UNIT_PATH"
    fi
    # A wants/ link left by hand would dangle now.
    if [[ -L $(p /etc/systemd/system/multi-user.target.wants/trine.service) ]]; then
        rm -f "$(p /etc/systemd/system/multi-user.target.wants/trine.service)"
        did "removed /etc/systemd/system/multi-user.target.wants/trine.service"
    fi
    if [[ -e $(p "$BIN_PATH") ]]; then
        rm -f "$(p "$BIN_PATH")"
        did "removed $BIN_PATH"
    fi
    if [[ $SYSTEMD_LIVE -eq 1 && $CHANGES -gt 0 ]]; then
        systemctl daemon-reload
        say "reloaded systemd"
    fi

    if [[ $PURGE -eq 1 ]]; then
        local path
        for path in "$DROPIN_DIR" "$CONFIG_DIR" "$STATE_DIR"; do
            if [[ -e $(p "$path") ]]; then
                rm -rf "$(p "$path")"
                did "removed $path (--purge)"
            fi
        done
        if [[ -n $(lookup_id passwd "$USER_NAME") ]]; then
            userdel ${R:+--root "$R"} "$USER_NAME"
            did "removed user $USER_NAME (--purge)"
        fi
        if [[ -n $(lookup_id group "$GROUP_NAME") ]]; then
            groupdel ${R:+--root "$R"} "$GROUP_NAME"
            did "removed group $GROUP_NAME (--purge)"
        fi
    else
        local kept=()
        [[ -e $(p "$CONFIG_DIR") ]] && kept+=("$CONFIG_DIR (config)")
        [[ -e $(p "$STATE_DIR") ]] && kept+=("$STATE_DIR (node data, certificates)")
        [[ -e $(p "$DROPIN_DIR") ]] && kept+=("$DROPIN_DIR (local drop-ins)")
        [[ -n $(lookup_id passwd "$USER_NAME") ]] && kept+=("user $USER_NAME")
        if [[ ${#kept[@]} -gt 0 ]]; then
            say "kept: $(printf '%s, ' "${kept[@]}" | sed 's/, $//'); remove them too with --uninstall --purge"
        fi
    fi
    if [[ $CHANGES -eq 0 ]]; then
        say "nothing to do: trine is not installed $WHERE"
    else
        say "done: $CHANGES change(s)"
    fi
}

if [[ $UNINSTALL -eq 1 ]]; then
    uninstall
    exit 0
fi

# ==============================================================================
say "installing trine $WHERE"
[[ -f $UNIT_SRC ]] || die "$UNIT_SRC is missing; run install.sh from a complete checkout (deploy/systemd/)"
[[ -f $EXAMPLE_CONFIG ]] || die "$EXAMPLE_CONFIG is missing; run install.sh from a complete checkout (deploy/systemd/)"
for tool in useradd groupadd install cmp stat systemctl; do
    command -v "$tool" >/dev/null || die "$tool not found; install it (useradd/groupadd: passwd package, systemctl: systemd)"
done

# --- the binary to install ------------------------------------------------------
if [[ -z $BINARY ]]; then
    default_bin=$(cd "$SCRIPT_DIR/../.." && pwd)/target/release/trine
    if [[ -x $default_bin ]]; then
        BINARY=$default_bin
    elif [[ -x $(p "$BIN_PATH") ]]; then
        BINARY=
        ok "no --binary given: keeping the installed $BIN_PATH"
    else
        die "no trine binary: build one (cargo build --release --bin trine) or give --binary PATH"
    fi
fi
if [[ -n $BINARY ]]; then
    [[ -f $BINARY && -x $BINARY ]] || die "--binary $BINARY is not an executable file; build it with cargo build --release --bin trine"
    BINARY=$(realpath "$BINARY")
    version=$("$BINARY" --version 2>/dev/null) || die "--binary $BINARY does not run ($BINARY --version failed); is it a trine build for this machine?"
    [[ $version == trine\ * ]] || die "--binary $BINARY is not trine (--version says '$version')"
    say "binary: $BINARY ($version)"
fi
if [[ -n $CONFIG_SRC && ! -f $CONFIG_SRC ]]; then
    die "--config $CONFIG_SRC is not a file; start from $EXAMPLE_CONFIG"
fi
if [[ -n $CA_DIR ]]; then
    [[ -f $CA_DIR/ca.crt && -f $CA_DIR/ca.key ]] ||
        die "--ca-dir $CA_DIR holds no ca.crt and ca.key; create the cluster CA once with: trine certs init --ca-dir $CA_DIR"
fi
# Every check on config and certificates uses the binary being installed.
RUN_BIN=${BINARY:-$(p "$BIN_PATH")}

# --- user and group -------------------------------------------------------------
if [[ -n $(lookup_id group "$GROUP_NAME") ]]; then
    ok "group $GROUP_NAME exists"
else
    groupadd --system ${R:+--root "$R"} "$GROUP_NAME"
    did "created system group $GROUP_NAME"
fi
if [[ -n $(lookup_id passwd "$USER_NAME") ]]; then
    ok "user $USER_NAME exists"
else
    shell=/usr/sbin/nologin
    for s in /usr/sbin/nologin /sbin/nologin /bin/false; do
        if [[ -x $(p "$s") ]]; then shell=$s; break; fi
    done
    useradd --system ${R:+--root "$R"} --gid "$GROUP_NAME" --home-dir "$STATE_DIR" \
        --no-create-home --shell "$shell" --comment "Trine node" "$USER_NAME"
    did "created system user $USER_NAME (home $STATE_DIR, shell $shell)"
fi
UID_=$(lookup_id passwd "$USER_NAME")
GID_=$(lookup_id group "$GROUP_NAME")
[[ -n $UID_ && -n $GID_ ]] || die "user or group $USER_NAME not found after creating it; check $(p /etc/passwd) and $(p /etc/group)"
if [[ -n $R ]]; then
    primary=$(awk -F: -v n="$USER_NAME" '$1 == n { print $4; exit }' "$R/etc/passwd")
else
    primary=$(getent passwd "$USER_NAME" | cut -d: -f4)
fi
[[ $primary == "$GID_" ]] || warn "user $USER_NAME's primary group is $primary, not $GROUP_NAME ($GID_); files below are group $GROUP_NAME"

# --- directories ------------------------------------------------------------------
ensure_dir "$(p /usr/local/bin)" 755 0 0
ensure_dir "$(p /etc/systemd/system)" 755 0 0
ensure_dir "$(p "$CONFIG_DIR")" 750 0 "$GID_"
ensure_dir "$(p "$STATE_DIR")" 700 "$UID_" "$GID_"

# --- binary and unit --------------------------------------------------------------
BIN_CHANGED=0
if [[ -n $BINARY ]]; then
    if install_file "$BINARY" "$(p "$BIN_PATH")" 755 0 0 "binary"; then BIN_CHANGED=1; fi
else
    ensure_meta "$(p "$BIN_PATH")" 755 0 0
fi
UNIT_CHANGED=0
if install_file "$UNIT_SRC" "$(p "$UNIT_PATH")" 644 0 0 "unit"; then UNIT_CHANGED=1; fi

# --- config ------------------------------------------------------------------------
CONFIG_FROM_EXAMPLE=0
if [[ -e $(p "$CONFIG_PATH") ]]; then
    ok "config $CONFIG_PATH exists: kept as it is (install.sh never overwrites it)"
    if [[ -n $CONFIG_SRC ]] && ! cmp -s "$CONFIG_SRC" "$(p "$CONFIG_PATH")"; then
        say "note: --config $CONFIG_SRC differs from the installed $CONFIG_PATH and was NOT installed; edit $CONFIG_PATH, or remove it and rerun"
    fi
    ensure_meta "$(p "$CONFIG_PATH")" 640 0 "$GID_"
else
    src=${CONFIG_SRC:-$EXAMPLE_CONFIG}
    tmp=$(p "$CONFIG_DIR")/.trine.toml.install.$$
    trap 'rm -f "$tmp"' EXIT
    cp "$src" "$tmp"
    if [[ -z $CONFIG_SRC ]]; then
        CONFIG_FROM_EXAMPLE=1
        if [[ -n $NODE_NAME ]]; then
            sed -i "s/^# name = .*/name = \"$NODE_NAME\"/" "$tmp"
        fi
    fi
    read_config "$RUN_BIN" "$tmp" "$src" || die "config $src is refused by trine (message above); fix it and rerun"
    chown "0:$GID_" "$tmp"
    chmod 640 "$tmp"
    mv -f "$tmp" "$(p "$CONFIG_PATH")"
    trap - EXIT
    did "installed config $CONFIG_PATH (from $src${NODE_NAME:+, name = \"$NODE_NAME\"})"
    if [[ $CONFIG_FROM_EXAMPLE -eq 1 ]]; then
        say "edit the lines marked CHANGE in $CONFIG_PATH (region, announce addresses, join/bootstrap) before the first start"
    fi
fi
read_config "$RUN_BIN" "$(p "$CONFIG_PATH")" ||
    die "$CONFIG_PATH is refused by trine (message above; the service would exit 78); fix it, check with: trine node --config $CONFIG_PATH --print-config"
ok "config $CONFIG_PATH is valid (trine node --print-config accepts it)"

DATA_DIR=$(config_value data_dir)
TLS_DIR=$(config_value tls_dir)
[[ -n $TLS_DIR ]] || TLS_DIR=$DATA_DIR/tls
CFG_NAME=$(config_value name)
RAFT_ANNOUNCE=$(config_value raft_announce)
for pair in "data_dir:$DATA_DIR" "tls_dir:$TLS_DIR"; do
    key=${pair%%:*} dir=${pair#*:}
    [[ $dir == /* ]] || die "$key \"$dir\" in $CONFIG_PATH is relative; use an absolute path under $STATE_DIR"
    if [[ $dir == "$STATE_DIR"/* ]]; then
        ensure_dir "$(p "$dir")" 700 "$UID_" "$GID_"
    else
        warn "$key $dir is outside $STATE_DIR: trine.service makes everything else read-only (ProtectSystem=strict); add ReadWritePaths=$dir in a drop-in (systemctl edit trine) and make it owned by $USER_NAME"
    fi
done

# --- certificate ---------------------------------------------------------------------
TLS=$(p "$TLS_DIR")
if [[ -n $CA_DIR ]]; then
    if [[ -f $TLS/node.crt || -f $TLS/node.key ]]; then
        ok "a node certificate is in $TLS_DIR: not reissued (remove node.crt and node.key there to issue a new one)"
    else
        san_args=()
        for s in "${SANS[@]}"; do san_args+=(--san "$s"); done
        (umask 077 && "$RUN_BIN" certs issue --ca-dir "$CA_DIR" --name "$NODE_NAME" --out "$TLS" "${san_args[@]}" >/dev/null) ||
            die "trine certs issue failed (message above); check --ca-dir $CA_DIR and --name $NODE_NAME"
        chown -R "$UID_:$GID_" "$TLS"
        chmod 700 "$TLS"
        chmod 600 "$TLS/node.key"
        chmod 644 "$TLS/node.crt" "$TLS/ca.crt"
        did "issued the certificate of $NODE_NAME into $TLS_DIR (names: $NODE_NAME${SANS[*]:+ ${SANS[*]}} localhost 127.0.0.1)"
        announce_host=${RAFT_ANNOUNCE%:*}
        if [[ -n $RAFT_ANNOUNCE ]] && [[ " $NODE_NAME ${SANS[*]} localhost 127.0.0.1 " != *" $announce_host "* ]]; then
            warn "raft_announce $RAFT_ANNOUNCE in $CONFIG_PATH names $announce_host, which is not in the certificate; peers will refuse it. Set raft_announce to one of the certificate's names, or reissue with --san $announce_host"
        fi
    fi
    if [[ -n $CFG_NAME && $CFG_NAME != "$NODE_NAME" ]]; then
        warn "the node's name in $CONFIG_PATH is '$CFG_NAME' but --name is '$NODE_NAME'; set name = \"$NODE_NAME\" there"
    fi
fi
# Certificates copied in by hand get the same treatment.
if [[ -d $TLS ]]; then
    for f in "$TLS"/*; do
        [[ -f $f ]] || continue
        case $(basename "$f") in
            *.key) ensure_meta "$f" 600 "$UID_" "$GID_" ;;
            *) ensure_meta "$f" 644 "$UID_" "$GID_" ;;
        esac
    done
fi

# --- systemd ---------------------------------------------------------------------------
if [[ $ENABLE -eq 0 ]]; then
    say "not enabling the service (--no-enable); later: systemctl enable --now trine"
elif [[ -n $R ]]; then
    if unit_enabled; then
        ok "trine.service is enabled $WHERE"
    else
        systemctl_root enable --quiet trine.service
        did "enabled trine.service $WHERE (offline, systemctl --root; the host's systemd was not touched)"
    fi
elif [[ $SYSTEMD_LIVE -eq 0 ]]; then
    if unit_enabled; then
        ok "trine.service is enabled"
    else
        systemctl enable --quiet trine.service
        did "enabled trine.service"
    fi
    say "systemd is not running on this host (no /run/systemd/system): not started; it starts at the next boot with systemd"
else
    if [[ $UNIT_CHANGED -eq 1 || $BIN_CHANGED -eq 1 ]]; then
        systemctl daemon-reload
        say "reloaded systemd"
    fi
    if unit_enabled; then
        ok "trine.service is enabled"
    else
        systemctl enable --quiet trine.service
        did "enabled trine.service"
    fi
    if systemctl is-active --quiet trine.service; then
        ok "trine.service is running"
        if [[ $UNIT_CHANGED -eq 1 || $BIN_CHANGED -eq 1 ]]; then
            say "the running node still uses the old binary/unit: restart it when convenient (it drains first): systemctl restart trine"
        fi
    elif grep -q 'example\.internal' "$CONFIG_PATH"; then
        say "not started: $CONFIG_PATH still has the example's placeholder addresses (example.internal); edit the lines marked CHANGE, then: systemctl start trine (or rerun install.sh)"
    else
        systemctl start trine.service
        did "started trine.service (follow it with: journalctl -fu trine)"
    fi
fi

if [[ $CHANGES -eq 0 ]]; then
    say "nothing changed: trine is installed $WHERE and up to date"
else
    say "done: $CHANGES change(s) $WHERE"
fi
