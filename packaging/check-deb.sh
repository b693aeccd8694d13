#!/usr/bin/env bash
# Checks a built Debian package (.ci/run builds one): the files, links, conffile and relations
# that let `apt install ./postern_*.deb` replace Postfix. Prints what it checked; exits non-zero
# at the first thing missing.
#
#   packaging/check-deb.sh target/ci-deb/postern_0.1.0-1_amd64.deb
set -euo pipefail

deb=${1:?usage: check-deb.sh PACKAGE.deb}
fail() { echo "check-deb: $*" >&2; exit 1; }

field() { dpkg-deb -f "$deb" "$1"; }
has_all() {             # has_all FIELD ITEM...: every item is in the field's comma list
    local f=$1 value item
    shift
    value=$(field "$f")
    for item in "$@"; do
        grep -qE "(^|, *)$item( |,|$)" <<< "$value" || fail "$f lacks $item (is: $value)"
    done
    echo "check-deb: $f: $value"
}
has_all Provides mail-transport-agent
has_all Conflicts mail-transport-agent postfix
has_all Replaces mail-transport-agent postfix

listing=$(dpkg-deb -c "$deb" | awk '{ print $1, $6, $7, $8 }')
entry() {               # entry TYPE PATH [TARGET]: a file (-) or link (l) in the package
    local type=$1 path=$2 target=${3:-} line
    line=$(grep -E "^$type[^ ]* \./$path( |$)" <<< "$listing") || fail "no $path in the package"
    [ -z "$target" ] || grep -q -- "-> $target\$" <<< "$line" || fail "$path does not point to $target: $line"
    echo "check-deb: $line"
}
entry - usr/bin/postern
entry l usr/sbin/sendmail ../bin/postern
entry l usr/bin/mailq postern
entry - etc/postern/config.toml
entry - usr/lib/systemd/system/postern.service
entry - usr/lib/sysusers.d/postern.conf

ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl"
grep -qx /etc/postern/config.toml "$ctl/conffiles" || fail "/etc/postern/config.toml is not a conffile"
echo "check-deb: conffiles: $(tr '\n' ' ' < "$ctl/conffiles")"
grep -q 'Type=notify' <(dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./usr/lib/systemd/system/postern.service) ||
    fail "the unit is not Type=notify"
echo "check-deb: ok"
