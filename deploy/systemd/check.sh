#!/usr/bin/env bash
# CI check of the bare-metal install (deploy/systemd/): installs into a
# scratch root with install.sh and checks the result, then uninstalls.
#
#   sudo TRINE_BIN=target/release/trine deploy/systemd/check.sh
#
# Needs root (install.sh chowns files and adds a user, though only inside
# the scratch root), systemd-analyze and systemctl (no running systemd:
# everything is offline), useradd/groupadd/userdel/groupdel, setpriv.
# Nothing outside the scratch root is changed; the check proves it for
# /etc/passwd, /etc/group and /etc/systemd/system. KEEP=1 keeps the
# scratch directory for a look afterwards.
#
# Checks, in order: the user and group; modes, owners and contents of every
# installed path; the node certificate; the unit enabled (offline); the
# config accepted by `trine node --print-config`; `systemd-analyze verify`
# of the installed unit, alone and with the GPU drop-in, silent; the offline
# `systemd-analyze security` exposure; a second run changes nothing; an
# existing config is never overwritten and bad modes are repaired; the node
# runs as the trine user on the installed files and stops cleanly on
# SIGTERM; bad input is refused; --uninstall keeps data; --purge removes
# everything.

set -euo pipefail
umask 022
START=$SECONDS

readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly INSTALL="$SCRIPT_DIR/install.sh"

step() { printf '\ncheck.sh: == %s\n' "$*"; }
pass() { printf 'check.sh: ok: %s\n' "$*"; }
fail() {
    printf '\ncheck.sh: FAILED: %s\n' "$*" >&2
    exit 1
}
show() { sed 's/^/    | /' "$1"; }

[[ $EUID -eq 0 ]] || fail "must run as root: install.sh chowns files and adds the trine user (inside a scratch root only). Run: sudo TRINE_BIN=$(printf %q "${TRINE_BIN:-target/release/trine}") $0"
[[ -n ${TRINE_BIN:-} ]] || fail "TRINE_BIN is not set; give the binary to install: TRINE_BIN=target/release/trine $0"
[[ -f $TRINE_BIN && -x $TRINE_BIN ]] || fail "TRINE_BIN=$TRINE_BIN is not an executable file (build it: cargo build --release --bin trine)"
TRINE_BIN=$(realpath "$TRINE_BIN")
for tool in systemd-analyze systemctl useradd groupadd userdel groupdel setpriv sha256sum stat find; do
    command -v "$tool" >/dev/null || fail "$tool not found; install it (systemd, passwd, util-linux, coreutils, findutils)"
done
printf 'check.sh: %s, %s\n' "$("$TRINE_BIN" --version)" "$(systemd-analyze --version | head -n 1)"

# --- scratch root: directories, the host's unit files, copies of passwd/group --
T=$(mktemp -d /tmp/trine-systemd-check.XXXXXX)
NODE_PID=
cleanup() {
    if [[ -n $NODE_PID ]] && kill -0 "$NODE_PID" 2>/dev/null; then kill -KILL "$NODE_PID" 2>/dev/null || true; fi
    if [[ ${KEEP:-0} == 1 ]]; then echo "check.sh: kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
chmod 755 "$T"   # the node runs as trine in the smoke test and must reach ROOT
ROOT=$T/root
mkdir -p "$ROOT/etc" "$ROOT/usr/lib/systemd" "$ROOT/usr/sbin" "$ROOT/var/lib"
grep -v '^trine:' /etc/passwd >"$ROOT/etc/passwd"
grep -v '^trine:' /etc/group >"$ROOT/etc/group"
[[ -f /etc/login.defs ]] && cp /etc/login.defs "$ROOT/etc/"
[[ -x /usr/sbin/nologin ]] && cp /usr/sbin/nologin "$ROOT/usr/sbin/"
# Unit files for `systemctl --root enable` (multi-user.target) and
# `systemd-analyze verify --root` (sysinit.target, ...).
HOST_UNITS=/usr/lib/systemd/system
[[ -d $HOST_UNITS ]] || HOST_UNITS=/lib/systemd/system
[[ -f $HOST_UNITS/multi-user.target ]] || fail "no systemd unit directory with multi-user.target on this host (looked in /usr/lib/systemd/system, /lib/systemd/system)"
cp -a "$HOST_UNITS/." "$ROOT/usr/lib/systemd/system/"

host_state() {
    sha256sum /etc/passwd /etc/group
    find /etc/systemd/system /usr/local/bin -maxdepth 2 -printf '%y %m %p\n' 2>/dev/null | sort
}
host_state >"$T/host.before"

"$TRINE_BIN" certs init --ca-dir "$T/ca" >/dev/null
NAME=trine-1
install_root() { "$INSTALL" --root "$ROOT" "$@"; }

# --- first install ---------------------------------------------------------------
step "first install into the scratch root"
install_root --binary "$TRINE_BIN" --ca-dir "$T/ca" --name "$NAME" \
    --san trine-1.example.internal --san 10.0.0.5 >"$T/run1.log" 2>&1 ||
    { show "$T/run1.log"; fail "install.sh failed on a fresh root (log above)"; }
show "$T/run1.log"
if grep -qi 'warning' "$T/run1.log"; then fail "the first install printed a warning (log above)"; fi
pass "install.sh succeeded"

step "user and group"
PW=$(awk -F: '$1 == "trine"' "$ROOT/etc/passwd")
GR=$(awk -F: '$1 == "trine"' "$ROOT/etc/group")
[[ -n $PW ]] || fail "user: no trine entry in the root's /etc/passwd"
[[ -n $GR ]] || fail "group: no trine entry in the root's /etc/group"
UID_=$(cut -d: -f3 <<<"$PW")
GID_=$(cut -d: -f3 <<<"$GR")
[[ $(cut -d: -f4 <<<"$PW") == "$GID_" ]] || fail "user: trine's primary group is not trine ($PW)"
[[ $(cut -d: -f6 <<<"$PW") == /var/lib/trine ]] || fail "user: trine's home is not /var/lib/trine ($PW)"
[[ $(cut -d: -f7 <<<"$PW") == */nologin || $(cut -d: -f7 <<<"$PW") == /bin/false ]] || fail "user: trine has a login shell ($PW)"
UID_MIN=$(awk '$1 == "UID_MIN" { print $2 }' /etc/login.defs 2>/dev/null || true)
((UID_ < ${UID_MIN:-1000})) || fail "user: trine (uid $UID_) is not a system user (below ${UID_MIN:-1000})"
pass "user trine uid $UID_, group trine gid $GID_: $PW"

step "modes, owners and contents"
expect() { # expect PATH TYPE MODE UID GID
    local path=$ROOT$1 got
    [[ -e $path || -L $path ]] || fail "$1 is missing"
    got=$(stat -c '%F %a %u %g' "$path")
    got=${got/regular empty file/regular file}
    [[ $got == "$2 $3 $4 $5" ]] || fail "$1: expected '$2 $3 $4 $5', got '$got'"
    pass "$1: $2, mode $3, owner $4:$5"
}
expect /usr/local/bin/trine "regular file" 755 0 0
expect /etc/systemd/system/trine.service "regular file" 644 0 0
expect /etc/trine directory 750 0 "$GID_"
expect /etc/trine/trine.toml "regular file" 640 0 "$GID_"
expect /var/lib/trine directory 700 "$UID_" "$GID_"
expect /var/lib/trine/data directory 700 "$UID_" "$GID_"
expect /var/lib/trine/tls directory 700 "$UID_" "$GID_"
expect /var/lib/trine/tls/node.key "regular file" 600 "$UID_" "$GID_"
expect /var/lib/trine/tls/node.crt "regular file" 644 "$UID_" "$GID_"
expect /var/lib/trine/tls/ca.crt "regular file" 644 "$UID_" "$GID_"
cmp -s "$TRINE_BIN" "$ROOT/usr/local/bin/trine" || fail "/usr/local/bin/trine differs from TRINE_BIN"
cmp -s "$SCRIPT_DIR/trine.service" "$ROOT/etc/systemd/system/trine.service" || fail "the installed unit differs from deploy/systemd/trine.service"
[[ -z $(ls -A "$ROOT/var/lib/trine/data") ]] || fail "/var/lib/trine/data is not empty before the first start (the node would refuse it)"
pass "binary and unit match their sources; data dir empty"

step "node certificate"
if command -v openssl >/dev/null; then
    openssl verify -CAfile "$T/ca/ca.crt" "$ROOT/var/lib/trine/tls/node.crt" >/dev/null ||
        fail "certificate: node.crt does not verify against the test CA"
    SAN=$(openssl x509 -in "$ROOT/var/lib/trine/tls/node.crt" -noout -ext subjectAltName)
    for want in "DNS:$NAME" DNS:trine-1.example.internal "IP Address:10.0.0.5"; do
        grep -qF "$want" <<<"$SAN" || fail "certificate: $want is not among the names: $SAN"
    done
    pass "node.crt is signed by the CA and names $(tr -d '\n' <<<"${SAN#*Alternative Name:}" | sed 's/^ *//')"
else
    pass "openssl not installed: certificate contents not checked (files and modes were)"
fi

step "unit enabled (offline)"
LINK=$ROOT/etc/systemd/system/multi-user.target.wants/trine.service
[[ -L $LINK ]] || fail "enable: no symlink multi-user.target.wants/trine.service in the root"
[[ $(readlink "$LINK") == /etc/systemd/system/trine.service ]] || fail "enable: the wants symlink points to $(readlink "$LINK")"
[[ $(systemctl --root="$ROOT" is-enabled trine.service) == enabled ]] || fail "enable: systemctl --root is-enabled does not say enabled"
pass "multi-user.target.wants/trine.service -> /etc/systemd/system/trine.service; is-enabled: enabled"

step "config accepted by the binary"
env -i PATH=/usr/bin:/bin "$TRINE_BIN" node --config "$ROOT/etc/trine/trine.toml" --print-config >"$T/effective.toml" 2>&1 ||
    { show "$T/effective.toml"; fail "config: trine node --print-config refuses the installed /etc/trine/trine.toml"; }
for want in "name = \"$NAME\"" 'data_dir = "/var/lib/trine/data"' 'tls_dir = "/var/lib/trine/tls"' 'grpc_addr = "0.0.0.0:7400"'; do
    grep -qxF "$want" "$T/effective.toml" || fail "config: the effective config lacks: $want"
done
pass "trine node --config /etc/trine/trine.toml --print-config: accepted (name, data_dir, tls_dir, listeners as expected)"

step "systemd-analyze verify (--root: ExecStart resolved inside the scratch root)"
verify() { # any output (unknown keys, bad values are only warnings) fails
    local out rc=0
    out=$(systemd-analyze verify --root="$ROOT" trine.service 2>&1) || rc=$?
    if [[ $rc -ne 0 || -n $out ]]; then
        printf '%s\n' "$out" | sed 's/^/    | /'
        fail "systemd-analyze verify $1: exit $rc, output above (any output fails: systemd only warns about unknown keys and bad values)"
    fi
}
verify "of the installed unit"
pass "trine.service verifies cleanly"
mkdir "$ROOT/etc/systemd/system/trine.service.d"
cp "$SCRIPT_DIR/trine-gpu.conf.example" "$ROOT/etc/systemd/system/trine.service.d/gpu.conf"
verify "with the GPU drop-in (trine-gpu.conf.example)"
rm -r "$ROOT/etc/systemd/system/trine.service.d"
pass "trine.service + trine-gpu.conf.example verify cleanly"
# The binary check is real: without it in the root, verify must complain.
mv "$ROOT/usr/local/bin/trine" "$T/trine.moved"
if systemd-analyze verify --root="$ROOT" trine.service >/dev/null 2>&1; then
    fail "systemd-analyze verify passes with /usr/local/bin/trine missing from the root; it would not catch a wrong ExecStart"
fi
mv "$T/trine.moved" "$ROOT/usr/local/bin/trine"
pass "verify fails when ExecStart's binary is missing from the root (so it checks the root's path)"

step "the unit's settings"
UNIT=$ROOT/etc/systemd/system/trine.service
for want in Type=simple User=trine Group=trine \
    'ExecStart=/usr/local/bin/trine node --config /etc/trine/trine.toml' \
    StateDirectory=trine ConfigurationDirectory=trine Restart=on-failure RestartPreventExitStatus=78 \
    KillSignal=SIGTERM UMask=0077 NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
    PrivateDevices=yes ProtectKernelTunables=yes ProtectKernelModules=yes ProtectKernelLogs=yes \
    ProtectControlGroups=yes ProtectClock=yes ProtectHostname=yes \
    'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK' RestrictNamespaces=yes \
    RestrictRealtime=yes RestrictSUIDSGID=yes LockPersonality=yes MemoryDenyWriteExecute=yes \
    SystemCallArchitectures=native SystemCallFilter=@system-service CapabilityBoundingSet= \
    AmbientCapabilities= ReadWritePaths=/var/lib/trine WantedBy=multi-user.target; do
    grep -qxF "$want" "$UNIT" || fail "unit: the line '$want' is missing from trine.service"
done
for key in RestartSec StartLimitIntervalSec StartLimitBurst LimitNOFILE; do
    grep -q "^$key=" "$UNIT" || fail "unit: $key= is missing from trine.service"
done
# The drain (shutdown_timeout of the example config) must end before systemd's SIGKILL.
to_s() { case $1 in *m) echo $((${1%m} * 60)) ;; *s) echo "${1%s}" ;; *) echo "$1" ;; esac; }
STOP=$(to_s "$(sed -n 's/^TimeoutStopSec=//p' "$UNIT")")
DRAIN=$(to_s "$(sed -n 's/^shutdown_timeout = "\(.*\)"$/\1/p' "$T/effective.toml")")
[[ -n $STOP && -n $DRAIN ]] && ((STOP > DRAIN)) ||
    fail "unit: TimeoutStopSec (${STOP:-unset}s) must exceed the config's shutdown_timeout (${DRAIN:-unset}s)"
pass "every required directive is there; TimeoutStopSec ${STOP}s > shutdown_timeout ${DRAIN}s"

step "systemd-analyze security (offline)"
systemd-analyze security --offline=yes --root="$ROOT" trine.service >"$T/security.txt" 2>&1 || true
SCORE=$(sed -n 's/.*Overall exposure level for trine.service: \([0-9.]*\).*/\1/p' "$T/security.txt")
[[ -n $SCORE ]] || { show "$T/security.txt"; fail "security: no exposure level in the output above"; }
# --threshold is the exposure times 10: fail above 2.0 (it is about 1.1).
systemd-analyze security --offline=yes --root="$ROOT" --threshold=20 trine.service >/dev/null 2>&1 ||
    { grep '✗' "$T/security.txt" | sed 's/^/    | /'; fail "security: exposure $SCORE is above 2.0; the unit lost hardening (findings above)"; }
pass "exposure level $SCORE (at most 2.0 allowed)"

# --- idempotence -------------------------------------------------------------------
listing() { # type, mode, owner, mtime, link target and hash of everything installed
    (cd "$ROOT" && find . -path ./usr/lib/systemd -prune -o -printf '%y %m %U:%G %T@ %p -> %l\n' | sort &&
        find . -path ./usr/lib/systemd -prune -o -type f -print0 | sort -z | xargs -0 sha256sum)
}
step "a second run changes nothing"
listing >"$T/before.txt"
install_root --binary "$TRINE_BIN" --ca-dir "$T/ca" --name "$NAME" \
    --san trine-1.example.internal --san 10.0.0.5 >"$T/run2.log" 2>&1 ||
    { show "$T/run2.log"; fail "idempotence: the second run failed"; }
show "$T/run2.log"
listing >"$T/after.txt"
diff -u "$T/before.txt" "$T/after.txt" >"$T/diff.txt" || { show "$T/diff.txt"; fail "idempotence: the second run changed the root (diff above)"; }
grep -q 'nothing changed' "$T/run2.log" || fail "idempotence: the second run did not say 'nothing changed'"
pass "identical listing (type, mode, owner, mtime, sha256 of $(grep -c . "$T/after.txt") entries) and 'nothing changed'"

step "an existing config is kept, bad modes are repaired"
echo '# local edit' >>"$ROOT/etc/trine/trine.toml"
chmod 644 "$ROOT/var/lib/trine/tls/node.key"
install_root --binary "$TRINE_BIN" --config "$SCRIPT_DIR/trine.toml.example" >"$T/run3.log" 2>&1 ||
    { show "$T/run3.log"; fail "rerun with --config failed"; }
show "$T/run3.log"
grep -qx '# local edit' "$ROOT/etc/trine/trine.toml" || fail "config: install.sh overwrote an existing /etc/trine/trine.toml"
grep -q 'NOT installed' "$T/run3.log" || fail "config: install.sh did not say that --config was not installed over the existing one"
expect /var/lib/trine/tls/node.key "regular file" 600 "$UID_" "$GID_"
sed -i '$d' "$ROOT/etc/trine/trine.toml"

# --- the node runs as trine on what was installed ----------------------------------
step "smoke: the installed node runs as uid $UID_ and drains on SIGTERM"
# The config's absolute paths point at the host; TRINE_* variables move them
# into the root and the listeners onto free loopback ports. umask 077 as
# in the unit. init: a one-node cluster with the issued certificate.
(
    umask 077
    exec env -i PATH=/usr/bin:/bin \
        TRINE_DATA_DIR="$ROOT/var/lib/trine/data" TRINE_TLS_DIR="$ROOT/var/lib/trine/tls" \
        TRINE_MODEL_CACHE="$ROOT/var/lib/trine/hub" TRINE_GRPC_ADDR=127.0.0.1:0 \
        TRINE_HTTP_ADDR=127.0.0.1:0 TRINE_P2P_LISTEN=/ip4/127.0.0.1/tcp/0 TRINE_RAFT_ADDR=127.0.0.1:0 \
        TRINE_RAFT_ANNOUNCE= TRINE_INIT=true TRINE_LOG_FORMAT=text TRINE_SHUTDOWN_TIMEOUT=5s \
        setpriv --reuid="$UID_" --regid="$GID_" --clear-groups --no-new-privs \
        "$ROOT/usr/local/bin/trine" node --config "$ROOT/etc/trine/trine.toml"
) >"$T/node.log" 2>&1 &
NODE_PID=$!
EP=$ROOT/var/lib/trine/data/endpoints.json
for _ in $(seq 1 150); do
    [[ -s $EP ]] && break
    kill -0 "$NODE_PID" 2>/dev/null || { show "$T/node.log"; fail "smoke: the node exited at start (log above)"; }
    sleep 0.1
done
[[ -s $EP ]] || { show "$T/node.log"; fail "smoke: no endpoints.json after 15 s (log above)"; }
HTTP=$(sed -n 's/.*"http": "\(.*\)".*/\1/p' "$EP")
if command -v curl >/dev/null; then
    curl -fsS --max-time 5 "http://$HTTP/healthz" >/dev/null || { show "$T/node.log"; fail "smoke: GET http://$HTTP/healthz failed"; }
    pass "node up as uid $UID_: /healthz on $HTTP answers"
else
    pass "node up as uid $UID_ (curl not installed: /healthz not asked)"
fi
kill -TERM "$NODE_PID"
RC=0
wait "$NODE_PID" || RC=$?
NODE_PID=
[[ $RC -eq 0 ]] || { show "$T/node.log"; fail "smoke: the node exited $RC after SIGTERM, not 0 (log above)"; }
grep -q 'stopped cleanly' "$T/node.log" || { show "$T/node.log"; fail "smoke: no 'stopped cleanly' in the node's log"; }
FOREIGN=$(find "$ROOT/var/lib/trine" \( ! -user "$UID_" -o ! -group "$GID_" \) -printf '%p ')
[[ -z $FOREIGN ]] || fail "smoke: files in /var/lib/trine not owned by trine: $FOREIGN"
LOOSE=$(find "$ROOT/var/lib/trine/data" -perm /077 -printf '%p ')
[[ -z $LOOSE ]] || fail "smoke: files in the data dir readable by others (umask 077 expected): $LOOSE"
pass "SIGTERM: drained, exit 0; every file under /var/lib/trine is trine's and private"

# --- bad input is refused with a message ------------------------------------------
step "bad input is refused"
refuse() { # refuse WANT-IN-MESSAGE ARGS...
    local want=$1 rc=0
    shift
    "$INSTALL" "$@" >"$T/bad.log" 2>&1 || rc=$?
    [[ $rc -ne 0 ]] || { show "$T/bad.log"; fail "install.sh $* succeeded but should have failed"; }
    grep -q "$want" "$T/bad.log" || { show "$T/bad.log"; fail "install.sh $*: the error does not say '$want'"; }
    pass "install.sh $*: $(grep -m1 'error:' "$T/bad.log" | sed 's/^install.sh: //')"
}
mkdir -p "$T/empty"
printf 'data_dir = "/var/lib/trine/data"\nbogus = 1\n' >"$T/bad.toml"
refuse 'ca-dir needs --name' --root "$ROOT" --ca-dir "$T/ca"
refuse 'no etc/passwd' --root "$T/empty" --binary "$TRINE_BIN"
refuse 'not an executable' --root "$ROOT" --binary "$T/nonexistent"
refuse 'trine certs init' --root "$ROOT" --binary "$TRINE_BIN" --ca-dir "$T/empty" --name "$NAME"
refuse 'purge only goes with --uninstall' --root "$ROOT" --purge
ROOT2=$T/root2
mkdir -p "$ROOT2/etc"
cp "$ROOT/etc/passwd" "$ROOT/etc/group" "$ROOT2/etc/"
refuse 'refused by trine' --root "$ROOT2" --binary "$TRINE_BIN" --config "$T/bad.toml" --no-enable
[[ ! -e $ROOT2/etc/trine/trine.toml ]] || fail "a refused config was installed anyway"

# --- uninstall -----------------------------------------------------------------------
step "--uninstall removes unit and binary, keeps config and data"
install_root --uninstall >"$T/un1.log" 2>&1 || { show "$T/un1.log"; fail "--uninstall failed"; }
show "$T/un1.log"
for gone in /etc/systemd/system/trine.service /etc/systemd/system/multi-user.target.wants/trine.service /usr/local/bin/trine; do
    [[ ! -e $ROOT$gone && ! -L $ROOT$gone ]] || fail "--uninstall left $gone"
done
for kept in /etc/trine/trine.toml /var/lib/trine/tls/node.key /var/lib/trine/data/trine-data.json; do
    [[ -e $ROOT$kept ]] || fail "--uninstall removed $kept (it must keep config and data)"
done
grep -q '^trine:' "$ROOT/etc/passwd" || fail "--uninstall removed the trine user (only --purge may)"
pass "unit, wants link and binary gone; config, certificate, data and user kept"
install_root --uninstall >"$T/un2.log" 2>&1 || { show "$T/un2.log"; fail "a second --uninstall failed"; }
grep -q 'nothing to do' "$T/un2.log" || { show "$T/un2.log"; fail "a second --uninstall did not say 'nothing to do'"; }
pass "a second --uninstall: nothing to do"

step "--uninstall --purge removes everything"
install_root --uninstall --purge >"$T/un3.log" 2>&1 || { show "$T/un3.log"; fail "--uninstall --purge failed"; }
show "$T/un3.log"
for gone in /etc/trine /var/lib/trine /etc/systemd/system/trine.service /usr/local/bin/trine; do
    [[ ! -e $ROOT$gone ]] || fail "--purge left $gone"
done
! grep -q '^trine:' "$ROOT/etc/passwd" || fail "--purge left the trine user in /etc/passwd"
! grep -q '^trine:' "$ROOT/etc/group" || fail "--purge left the trine group in /etc/group"
pass "/etc/trine, /var/lib/trine, user and group gone"

step "the host was not touched"
host_state >"$T/host.after"
diff -u "$T/host.before" "$T/host.after" >"$T/host.diff" || { show "$T/host.diff"; fail "the host's /etc/passwd, /etc/group, /etc/systemd/system or /usr/local/bin changed"; }
pass "/etc/passwd, /etc/group, /etc/systemd/system, /usr/local/bin unchanged"

printf '\ncheck.sh: PASSED in %ds (exposure %s)\n' $((SECONDS - START)) "$SCORE"
