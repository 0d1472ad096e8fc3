#!/usr/bin/env bash
# The test suite's prerequisites: Debian packages whose programs the tests
# run for real (servers, procps, setpriv, the shells whose completion is
# tested, zstd for .tar.zst images, strace for the opens of hostile images,
# git for the clean checkout the package test installs from, script for
# the terminal tests, setfacl for the ACL a watch test sets). As root (CI, a fresh container)
# whatever is missing is installed with apt-get; as anyone else, one line
# names what is missing and how to install it, and the exit status is 1.
set -euo pipefail

# program -> the Debian package that ships it
declare -A needs=(
  [/usr/bin/cc]=build-essential
  [/usr/bin/make]=build-essential
  [/usr/bin/python3]=python3
  [/usr/bin/ps]=procps
  [/usr/bin/setpriv]=util-linux
  [/usr/sbin/runuser]=util-linux
  [/usr/bin/redis-server]=redis-server
  [/usr/bin/redis-cli]=redis-tools
  [/usr/sbin/nginx]=nginx-light
  [/usr/bin/memcached]=memcached
  [/usr/sbin/haproxy]=haproxy
  [/usr/sbin/postfix]=postfix
  [/usr/sbin/sshd]=openssh-server
  [/usr/bin/ssh]=openssh-client
  [/usr/sbin/dnsmasq]=dnsmasq-base
  [/usr/bin/psql]=postgresql-client
  [/usr/sbin/mariadbd]=mariadb-server
  [/usr/bin/mariadb]=mariadb-client
  [/usr/bin/etcd]=etcd-server
  [/usr/bin/etcdctl]=etcd-client
  [/usr/bin/zsh]=zsh
  [/usr/bin/fish]=fish
  [/usr/bin/zstd]=zstd
  [/usr/bin/strace]=strace
  [/usr/bin/git]=git
  [/usr/bin/script]=bsdutils
  [/usr/bin/prlimit]=util-linux
  [/usr/bin/ipcrm]=util-linux
  [/usr/bin/flock]=util-linux
  [/usr/bin/pgrep]=procps
  [/usr/bin/ss]=iproute2
  [/usr/bin/javac]=default-jdk-headless
  [/usr/bin/gunicorn]=gunicorn
  [/usr/sbin/vsftpd]=vsftpd
  [/usr/sbin/squid]=squid
  [/usr/sbin/lighttpd]=lighttpd
  [/usr/sbin/apache2]=apache2
  [/usr/bin/dbus-daemon]=dbus-daemon
  [/usr/bin/dbus-send]=dbus-bin
  [/usr/bin/dbus-monitor]=dbus-bin
  [/usr/bin/setfacl]=acl
)

# PostgreSQL's server lives under its major version, which is the
# distribution's (15 on Debian 12, 17 on Debian 13): any one will do, and
# the tests take the newest (test/servers.test.ts, the same glob).
postgres_installed() {
  local p
  for p in /usr/lib/postgresql/*/bin/postgres; do [ -x "$p" ] && return 0; done
  return 1
}

missing_packages() {
  local program missing=()
  for program in "${!needs[@]}"; do
    [ -x "$program" ] || missing+=("${needs[$program]}")
  done
  postgres_installed || missing+=(postgresql)
  [ ${#missing[@]} -eq 0 ] || printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' '
}

packages=$(missing_packages)
[ -z "$packages" ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "test prerequisites missing: ${packages}(as root: bash test/prerequisites.sh, or apt-get install -y ${packages% })" >&2
  exit 1
fi
echo "installing test prerequisites: ${packages% }" >&2
export DEBIAN_FRONTEND=noninteractive
# apt-get's own words go to a log; what is still missing is said in one
# line (a package this distribution does not have, no network, ...), and
# the log is kept for the whole story (a failed postinst names its
# package only there).
log=$(mktemp /tmp/appshot-prerequisites.XXXXXX.log)
# shellcheck disable=SC2086
if ! { apt-get update -qq && apt-get install -y -qq $packages; } >"$log" 2>&1; then
  echo "test prerequisites missing: $(missing_packages)(apt-get install failed: $(grep -m1 '^E:' "$log" || tail -n1 "$log"); its output is in $log)" >&2
  exit 1
fi
still=$(missing_packages)
if [ -n "$still" ]; then
  echo "test prerequisites missing: ${still}(apt-get installed them but the programs the tests run are not there; its output is in $log)" >&2
  exit 1
fi
rm -f "$log"
