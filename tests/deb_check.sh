#!/bin/bash
# tests/deb_check.sh DEB: install the amd64 package on this machine (root), check it, run it,
# remove and purge it, and check what is left (`make test-deb`; CI runs it).
#
# - every file of the package landed, owned by root, 0755 for the binary and 0644 otherwise, the
#   configuration registered as a conffile; the sysusers file created user and group sglora;
# - `sglora bundle verify` and a `generate` work from the installed paths alone;
# - the installed unit's ExecStart line, run as the unit runs it (user sglora, CAP_LEASE only,
#   StateDirectory/CacheDirectory as systemd would create them), serves a Generate call on a
#   private system-like bus that loads only the installed D-Bus policy;
# - remove keeps the conffile and the state; purge removes them; nothing else is left.
set -euo pipefail
deb=$(realpath "$1")
tests_dir=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "deb_check: needs root (it installs a package)" >&2; exit 2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
work=$(mktemp -d)
cleanup() {
  [ -n "${daemon_pid:-}" ] && kill "$daemon_pid" 2>/dev/null || true
  [ -n "${bus_pid:-}" ] && kill "$bus_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if dpkg-query -W -f='${Status}' sglora 2>/dev/null | grep -qx 'install ok installed'; then
  fail "sglora is already installed here; this check installs and purges it"
fi

echo "== install $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$deb" >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "apt-get install"; }

echo "== files, owners, modes"
n=0
while IFS= read -r path; do
  [ "$path" = /. ] && continue
  [ -e "$path" ] || fail "$path is listed by dpkg but missing"
  owner=$(stat -L -c %U:%G "$path")
  [ "$owner" = root:root ] || fail "$path is owned by $owner"
  mode=$(stat -L -c %a "$path")
  if [ -d "$path" ]; then
    want=755
  elif [ "$path" = /usr/bin/sglora ]; then
    want=755
  else
    want=644
  fi
  [ "$mode" = "$want" ] || fail "$path has mode $mode, expected $want"
  n=$((n + 1))
done < <(dpkg -L sglora)
echo "$n paths checked"
for f in /usr/bin/sglora /usr/lib/sglora/models/default/manifest.json /lib/systemd/system/sglorad.service \
  /usr/share/dbus-1/system.d/org.sglora.Generator1.conf \
  /usr/share/dbus-1/system-services/org.sglora.Generator1.service /usr/lib/sysusers.d/sglora.conf \
  /usr/share/dbus-1/interfaces/org.sglora.Generator1.xml /etc/sglora/sglorad.toml \
  /usr/share/doc/sglora/copyright /usr/share/man/man1/sglora.1.gz; do
  [ -f "$f" ] || fail "$f not installed"
done
dpkg-query -W -f='${Conffiles}\n' sglora | grep -q '^ /etc/sglora/sglorad.toml ' || fail "sglorad.toml is not a conffile"
getent passwd sglora >/dev/null || fail "user sglora not created"
getent group sglora >/dev/null || fail "group sglora not created"

echo "== the installed binary on the installed bundle"
cd "$work"
sglora bundle verify
desc="Given the name of an animal, find the broader category it is a kind of."
sglora generate "$desc" -o "$work/adapter" --seed 7 >/dev/null
[ -s "$work/adapter/adapter_model.safetensors" ] || fail "generate wrote no weights"

echo "== the installed unit's ExecStart on a private system bus with the installed policy"
exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/sglorad.service)
[ -n "$exec_start" ] || fail "no ExecStart in the installed unit"
sock="$work/system_bus_socket"
chmod 755 "$work"
sed -e "s#@LISTEN@#unix:path=$sock#" -e "s#@POLICY@#/usr/share/dbus-1/system.d/org.sglora.Generator1.conf#" \
  "$tests_dir/system-bus.conf.in" >"$work/system.conf"
dbus-daemon --config-file="$work/system.conf" --nofork --nopidfile >/dev/null 2>&1 &
bus_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || fail "private bus did not start"
# What systemd does for StateDirectory=sglora (0750) and CacheDirectory=sglora (0700).
install -d -o sglora -g sglora -m 0750 /var/lib/sglora
install -d -o sglora -g sglora -m 0700 /var/cache/sglora
# shellcheck disable=SC2086 # the unit's command line, split as systemd splits it (no quoting in it)
env DBUS_SYSTEM_BUS_ADDRESS="unix:path=$sock" STATE_DIRECTORY=/var/lib/sglora CACHE_DIRECTORY=/var/cache/sglora \
  setpriv --reuid sglora --regid sglora --init-groups --inh-caps +lease --ambient-caps +lease -- \
  $exec_start >"$work/daemon.log" 2>&1 &
daemon_pid=$!
addr="--address=unix:path=$sock"
for _ in $(seq 100); do
  busctl "$addr" call org.sglora.Generator1 /org/sglora/Generator1 org.sglora.Generator1 ListExperts >/dev/null 2>&1 && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/daemon.log"; fail "the installed daemon exited"; }
  sleep 0.2
done
experts=$(busctl "$addr" call org.sglora.Generator1 /org/sglora/Generator1 org.sglora.Generator1 ListExperts) \
  || { cat "$work/daemon.log"; fail "ListExperts"; }
echo "ListExperts: ${experts:0:60}..."
busctl "$addr" --timeout=60 call org.sglora.Generator1 /org/sglora/Generator1 org.sglora.Generator1 \
  Generate 'sa{sv}' "$desc" 0 >"$work/generate.out" || { cat "$work/daemon.log"; fail "Generate over D-Bus"; }
grep -q 'bundle' "$work/generate.out" || fail "Generate returned no provenance: $(cat "$work/generate.out")"
[ -e /var/lib/sglora/cache.db ] || fail "the daemon wrote no cache database"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || fail "the daemon exited with $? on SIGTERM"
daemon_pid=
kill "$bus_pid"; bus_pid=

echo "== remove: the conffile and the state stay"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q sglora >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "apt-get remove"; }
[ -e /usr/bin/sglora ] && fail "/usr/bin/sglora left after remove"
[ -d /usr/lib/sglora ] && fail "/usr/lib/sglora left after remove"
[ -f /etc/sglora/sglorad.toml ] || fail "remove took the conffile"
[ -d /var/lib/sglora ] || fail "remove took the state"

echo "== purge: nothing left but the user and group (Debian policy keeps them)"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q sglora >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "apt-get purge"; }
for p in /etc/sglora /var/lib/sglora /var/cache/sglora /usr/lib/sglora /usr/share/doc/sglora \
  /lib/systemd/system/sglorad.service /usr/share/dbus-1/system.d/org.sglora.Generator1.conf \
  /usr/lib/sysusers.d/sglora.conf; do
  [ -e "$p" ] && fail "$p left after purge"
done
dpkg-query -W -f='${Status}' sglora 2>/dev/null | grep -qx 'install ok installed' && fail "dpkg still lists sglora"
echo "deb_check: ok ($n paths)"
