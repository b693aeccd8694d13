#!/usr/bin/env bash
# End-to-end relay throughput: Postern against Postfix configured as the same relay.
#
#   benches/relay.sh [N]            # N messages per relay (default 20000; or env N=...)
#
# For each relay in turn (Postern, then Postfix), freshly started on an empty queue in a
# temporary directory:
#
#   smtp-source -s 50 -m N -l 4096  ->  relay under test  ->  smtp-sink (counts messages)
#
# and the figure is N / (time from the start of smtp-source until the sink has received the
# end of DATA of all N messages); for Postern also the CPU it spent per message (user + system from
# /proc/PID/stat over the run, divided by N) and its peak resident memory (VmHWM). Both relays relay everything to the sink on loopback without
# TLS, store each message durably before answering 250 and log every delivery; Postfix keeps
# its default concurrency towards the next hop (20), as does Postern
# (delivery.max_connections_per_destination).
#
# Needs root (Postfix's master runs as root; smtp-sink drops to `nobody`), the Debian
# `postfix` package (smtp-source, smtp-sink) and cargo. Only loopback addresses are used.
# The system Postfix configuration (/etc/postfix) is not touched: Postfix runs as a private
# instance (`postfix -c TMP/postfix/etc`) with its own queue, data directory and log file.
#
# Environment: N, TIMEOUT (seconds allowed per relay for all deliveries, default 300),
# SKIP_BUILD=1 (use the existing target/release/postern), CARGO_BUILD_FLAGS (extra flags for
# `cargo build --release`; default --ignore-rust-version, as some dependencies declare a newer
# rustc than they need), KEEP=1 (keep the temp directory; also kept on failure or when Postern
# logged a WARN/ERROR other than the self-signed certificate notice), POSTERN_BIN and
# POSTERN_CONFIG (another binary and its config.toml, e.g. an older build for an A/B run; implies
# SKIP_BUILD), DKIM=rsa|ed25519 (Postern signs every message with a key made for the run),
# ONLY=postern (skip Postfix; for A/B runs between Postern builds), BENCH_DIR (where the
# temporary directory with both queues goes, default /tmp; refused on tmpfs unless FORCE=1),
# SYSCALLS=1 (also print Postern's system calls per message by kind and its context switches,
# counted over the run with perf's syscall tracepoints; needs Debian's linux-perf),
# PROFILE=FILE (also record Postern's on-CPU call stacks over the run into FILE with
# `perf record`; read it with `perf report -i FILE --no-children`). Postern's CPU is also
# printed by thread (tokio workers, spool writer, ledger writer, ...), from /proc/PID/task.
#
# Run it on an otherwise idle machine: a concurrent cargo build skews both figures.
set -euo pipefail

N=${1:-${N:-20000}}
SESSIONS=${SESSIONS:-50}
SIZE=4096
TIMEOUT=${TIMEOUT:-300}
FROM=bench@example.test
RCPT=someone@example.org

case $N in '' | *[!0-9]*) echo "relay.sh: N must be a positive integer, got '$N'" >&2; exit 2 ;; esac
[ "$N" -gt 0 ] || { echo "relay.sh: N must be positive" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${POSTERN_BIN:-$ROOT/target/release/postern}
CONFIG=${POSTERN_CONFIG:-$ROOT/config.toml}
[ -z "${POSTERN_BIN:-}" ] || SKIP_BUILD=1

die() { echo "relay.sh: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (the private Postfix instance's master runs as root)"
for t in smtp-source smtp-sink postfix postconf ss timeout; do
    command -v "$t" > /dev/null || die "$t not found (apt-get install postfix iproute2 coreutils)"
done
MAIL_OWNER=$(postconf -dh mail_owner)

# Both queues live under $BENCH_DIR. On tmpfs (or ramfs) fsync costs nothing, so the figures
# would say nothing about durable relaying: refuse unless FORCE=1, and then say so loudly.
BENCH_DIR=${BENCH_DIR:-/tmp}
T=$(mktemp -d "$BENCH_DIR/postern-relay-bench.XXXXXX")
chmod 755 "$T"          # Postfix daemons run as $MAIL_OWNER below this directory
FSTYPE=$(stat -f -c %T "$T")
log "queues on $T (filesystem: $FSTYPE)"
case $FSTYPE in
    tmpfs | ramfs)
        if [ "${FORCE:-}" != 1 ]; then
            rmdir "$T"
            die "$BENCH_DIR is $FSTYPE, where fsync is free: the figures would not measure durable relaying. Set BENCH_DIR to a directory on a disk, or FORCE=1 to run anyway."
        fi
        for _ in 1 2 3; do
            echo "relay.sh: WARNING: queues on $FSTYPE (FORCE=1): fsync is free, these figures overstate both relays" >&2
        done
        ;;
esac

SINK_PID=
SOURCE_PID=
POSTERN_PID=
PF_ETC=
PF_RUNNING=

stop_pid() {            # stop_pid PID: SIGTERM, wait up to 15 s, then SIGKILL
    local pid=$1 i
    kill -TERM "$pid" 2> /dev/null || return 0
    for i in $(seq 150); do
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2> /dev/null || true
    wait "$pid" 2> /dev/null || true
}

stop_postfix() {
    [ -n "$PF_RUNNING" ] || return 0
    PF_RUNNING=
    local master children pid
    master=$(tr -dc 0-9 < "$T/postfix/spool/pid/master.pid" 2> /dev/null || true)
    children=
    [ -n "$master" ] && children=$(ps -o pid= --ppid "$master" 2> /dev/null || true)
    timeout 60 postfix -c "$PF_ETC" stop > /dev/null 2>&1 || true
    # `postfix stop` waits for the master; make sure it and its children are gone.
    for pid in $master $children; do
        kill -0 "$pid" 2> /dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2> /dev/null || true
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$SOURCE_PID" ] && stop_pid "$SOURCE_PID"
    [ -n "$POSTERN_PID" ] && stop_pid "$POSTERN_PID"
    stop_postfix
    [ -n "$SINK_PID" ] && stop_pid "$SINK_PID"
    if [ "$rc" != 0 ] || [ -n "${KEEP:-}" ]; then
        echo "relay.sh: logs kept in $T" >&2
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback TCP port (not listening now, and not handed out before in this run).
USED_PORTS=" "
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 30000))
        case $USED_PORTS in *" $p "*) continue ;; esac
        if [ -z "$(ss -Htln "sport = :$p")" ]; then
            USED_PORTS="$USED_PORTS$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

wait_listening() {      # wait_listening PORT WHAT PID-or-empty
    local port=$1 what=$2 pid=${3:-}
    for _ in $(seq 300); do
        [ -n "$(ss -Htln "src 127.0.0.1 and sport = :$port")" ] && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2> /dev/null; then die "$what exited before listening"; fi
        sleep 0.1
    done
    die "$what not listening on 127.0.0.1:$port after 30 s"
}

calc() { awk "BEGIN { x = $1; printf \"%.6f\", x }"; }   # calc EXPR: floating point
CLK_TCK=$(getconf CLK_TCK)
# cpu_ticks PID: user and system CPU time so far, in clock ticks (/proc/PID/stat fields 14, 15).
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
# thread_ticks PID: "name ticks" per kind of thread (user + system so far; numbered threads such
# as sled-io-3 summed under their name without the number). The comm is what follows "(" in
# /proc/PID/task/TID/stat, so the fields are counted from the ")" that ends it.
thread_ticks() {
    for t in /proc/"$1"/task/*; do
        name=$(cat "$t/comm" 2> /dev/null) || continue
        name=${name%%-[0-9]*}
        sed 's/.*) //' "$t/stat" 2> /dev/null | awk -v n="${name// /_}" '{ print n, $12 + $13 }'
    done | awk '{ a[$1] += $2 } END { for (k in a) print k, a[k] }' | sort
}

# Messages fully received (end of DATA seen) by the sink: the last "mesg=" of its -c counter.
sink_count() {
    local tail_bytes rec
    tail_bytes=$(tail -c 200 "$SINK_OUT" 2> /dev/null | tr '\r' '\n') || true
    rec=$(printf '%s\n' "$tail_bytes" | grep -o 'mesg=[0-9]*' | tail -n 1) || true
    echo "${rec#mesg=}"
}

SINK_PORT=$(free_port)
SINK_OUT=
BUSY_NOTE=

start_sink() {          # a fresh sink (and counter) for each relay
    SINK_OUT=$T/sink-$1.out
    # -c: running counters; -a: no AUTH offered; runs as nobody (required as root).
    smtp-sink -u nobody -c -a -m 256 "127.0.0.1:$SINK_PORT" 1024 > "$SINK_OUT" 2>&1 &
    SINK_PID=$!
    wait_listening "$SINK_PORT" smtp-sink "$SINK_PID"
}

stop_sink() {
    stop_pid "$SINK_PID"
    SINK_PID=
}

busy_check() {          # a compiler running next to the benchmark skews it; say so (once)
    case " $BUSY_NOTE " in *" $1 "*) return 0 ;; esac
    if pgrep -x rustc > /dev/null || pgrep -x cc1 > /dev/null; then
        BUSY_NOTE="$BUSY_NOTE $1"
        log "warning: a compiler is running during the $1 run; its figure will be skewed"
    fi
}

# run_load NAME PORT: times smtp-source into the relay until the sink counted N messages.
# Sets SECONDS_TAKEN and INJECT_SECONDS.
run_load() {
    local name=$1 port=$2 t0 t1 now count src_rc inject= polls=0
    t0=$(date +%s.%N)
    timeout "$TIMEOUT" smtp-source -s "$SESSIONS" -m "$N" -l "$SIZE" -f "$FROM" -t "$RCPT" \
        "127.0.0.1:$port" > "$T/source-$name.out" 2>&1 &
    SOURCE_PID=$!
    while :; do
        count=$(sink_count)
        count=${count:-0}
        now=$(date +%s.%N)
        if [ -n "$SOURCE_PID" ] && ! kill -0 "$SOURCE_PID" 2> /dev/null; then
            src_rc=0
            wait "$SOURCE_PID" || src_rc=$?
            SOURCE_PID=
            inject=$(calc "$now - $t0")
            if [ "$src_rc" = 124 ]; then
                die "$name: stalled: smtp-source did not finish in ${TIMEOUT}s; sink received $count of $N"
            elif [ "$src_rc" != 0 ]; then
                sed 's/^/    /' "$T/source-$name.out" >&2
                die "$name: smtp-source failed (exit $src_rc) after ${inject}s; sink has $count"
            fi
        fi
        if [ "$count" -ge "$N" ]; then
            t1=$now
            break
        fi
        if awk "BEGIN { exit !($now - $t0 > $TIMEOUT) }"; then
            die "$name: stalled: sink received $count of $N messages in ${TIMEOUT}s"
        fi
        polls=$((polls + 1))
        [ $((polls % 20)) = 0 ] && busy_check "$name"
        sleep 0.05
    done
    if [ -n "$SOURCE_PID" ]; then  # cannot happen unless the relay delivers before it answers
        wait "$SOURCE_PID" || die "$name: smtp-source failed"
        SOURCE_PID=
        inject=$(calc "$(date +%s.%N) - $t0")
    fi
    SECONDS_TAKEN=$(calc "$t1 - $t0")
    INJECT_SECONDS=$inject
}

# ---------------------------------------------------------------------------------------------
# Postern

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building Postern (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet ${CARGO_BUILD_FLAGS---ignore-rust-version}) || die "cargo build failed"
fi
[ -x "$BIN" ] || die "$BIN not built"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

PT=$T/postern
mkdir -p "$PT/data" "$PT/certs"
PT_RELAY=$(free_port)
PT_SUB=$(free_port)
PT_SUBS=$(free_port)

# The repo's config.toml with: data_dir, listener ports, certificate paths moved into the temp
# directory, and [delivery] pointed at the sink without TLS (keys set here override any
# smarthost/tls already in a [delivery] table).
awk -v data="$PT/data" -v cert="$PT/certs/server.crt" -v key="$PT/certs/server.key" \
    -v relay="$PT_RELAY" -v subm="$PT_SUB" -v subs="$PT_SUBS" -v sink="127.0.0.1:$SINK_PORT" '
    function delivery_keys() {
        print "smarthost = \"" sink "\""
        print "tls = \"none\""
        done_delivery = 1
    }
    function listener_addr() {
        return "addr = \"127.0.0.1:" (mode == "relay" ? relay : mode == "submissions" ? subs : subm) "\""
    }
    /^[[:space:]]*\[/ {
        if (held != "") { print held; held = "" }
        mode = ""
        section = $0; gsub(/[[:space:]]|#.*/, "", section)
        print
        if (section == "[delivery]") delivery_keys()
        next
    }
    section == "[server]" && /^[[:space:]]*data_dir[[:space:]]*=/ { print "data_dir = \"" data "\""; next }
    section == "[tls]" && /^[[:space:]]*cert[[:space:]]*=/ { print "cert = \"" cert "\""; next }
    section == "[tls]" && /^[[:space:]]*key[[:space:]]*=/ { print "key = \"" key "\""; next }
    section == "[delivery]" && /^[[:space:]]*(smarthost|tls)[[:space:]]*=/ { next }
    section == "[[listener]]" && /^[[:space:]]*addr[[:space:]]*=/ {
        if (mode != "") print listener_addr(); else held = $0
        next
    }
    section == "[[listener]]" && /^[[:space:]]*mode[[:space:]]*=/ {
        mode = $0; sub(/#.*/, "", mode); gsub(/.*=[[:space:]]*"|".*/, "", mode)
        if (held != "") { print listener_addr(); held = "" }
        print
        next
    }
    { print }
    END {
        if (held != "") print held
        if (!done_delivery) { print ""; print "[delivery]"; delivery_keys() }
    }
' "$CONFIG" > "$PT/config.toml"
grep -q "127.0.0.1:$PT_RELAY" "$PT/config.toml" || die "no relay listener in $CONFIG"
if [ -n "${DKIM:-}" ]; then
    # smtp-source's envelope sender is $FROM; sign for its domain (From: or envelope).
    "$BIN" dkim keygen --domain "${FROM#*@}" --selector bench --algorithm "$DKIM" --out "$PT/dkim.pem" > /dev/null ||
        die "dkim keygen failed"
    alg=$([ "$DKIM" = rsa ] && echo rsa-sha256 || echo ed25519)
    printf '\n[[dkim.key]]\ndomain = "%s"\nselector = "bench"\nalgorithm = "%s"\nprivate_key = "%s"\n' \
        "${FROM#*@}" "$alg" "$PT/dkim.pem" >> "$PT/config.toml"
    sed -i 's/^fallback_to_envelope = false/fallback_to_envelope = true/' "$PT/config.toml"
    log "postern signs with a $DKIM DKIM key"
fi
"$BIN" check-config --config "$PT/config.toml" > "$PT/check-config.out" 2>&1 ||
    { cat "$PT/check-config.out" >&2; die "postern check-config failed on $PT/config.toml"; }

start_sink postern
log "postern: 127.0.0.1:$PT_RELAY -> sink 127.0.0.1:$SINK_PORT, $N messages"
NO_COLOR=1 "$BIN" serve --config "$PT/config.toml" 2> "$PT/postern.log" > "$PT/postern.out" &
POSTERN_PID=$!
wait_listening "$PT_RELAY" postern "$POSTERN_PID"
busy_check postern
read -r CPU_U0 CPU_S0 <<< "$(cpu_ticks "$POSTERN_PID")"
thread_ticks "$POSTERN_PID" > "$PT/threads.start"
PERF_PID=
if [ -n "${SYSCALLS:-}" ]; then
    command -v perf > /dev/null || die "SYSCALLS=1 needs perf (apt-get install linux-perf)"
    EVENTS=raw_syscalls:sys_enter,context-switches
    for s in sendto recvfrom write futex epoll_wait epoll_ctl fdatasync fallocate pread64 pwrite64; do
        EVENTS="$EVENTS,syscalls:sys_enter_$s"
    done
    perf stat -e "$EVENTS" -p "$POSTERN_PID" -o "$PT/syscalls.txt" 2> /dev/null &
    PERF_PID=$!
fi
PROF_PID=
if [ -n "${PROFILE:-}" ]; then
    command -v perf > /dev/null || die "PROFILE needs perf (apt-get install linux-perf)"
    perf record -q -F 999 ${PROFILE_GRAPH:+--call-graph dwarf,8192} -p "$POSTERN_PID" -o "$PROFILE" 2> /dev/null &
    PROF_PID=$!
fi
run_load postern "$PT_RELAY"
[ -z "$PROF_PID" ] || { kill -INT "$PROF_PID" 2> /dev/null || true; wait "$PROF_PID" 2> /dev/null || true; }
read -r CPU_U1 CPU_S1 <<< "$(cpu_ticks "$POSTERN_PID")"
thread_ticks "$POSTERN_PID" > "$PT/threads.end"
PT_SYSCALLS=
if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID" 2> /dev/null || true
    wait "$PERF_PID" 2> /dev/null || true
    # "all" is every system call; the others are those that a relayed message makes most.
    PT_SYSCALLS=$(awk -v n="$N" '$2 ~ /sys_enter|context-switches/ {
        gsub(",", "", $1); k = $2; sub(/^raw_syscalls:sys_enter$/, "all", k); sub(/^syscalls:sys_enter_/, "", k)
        printf "%s %.2f, ", k, $1 / n }' "$PT/syscalls.txt" | sed 's/, $//')
fi
PT_SECS=$SECONDS_TAKEN
PT_INJECT=$INJECT_SECONDS
# The daemon's own CPU over the run, per delivered message (issue #14's figure).
PT_USER_US=$(calc "($CPU_U1 - $CPU_U0) * 1000000 / $CLK_TCK / $N")
PT_SYS_US=$(calc "($CPU_S1 - $CPU_S0) * 1000000 / $CLK_TCK / $N")
PT_CPU=$(printf 'cpu %.0f us/msg (user %.0f, system %.0f)' "$(calc "$PT_USER_US + $PT_SYS_US")" "$PT_USER_US" "$PT_SYS_US")
# Its peak resident memory over its life (VmHWM), read before it stops.
PT_HWM=$(awk '/^VmHWM:/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$POSTERN_PID/status")
PT_CPU="$PT_CPU, peak rss $PT_HWM"
# The same CPU by thread, biggest first (threads that ended during the run are not counted).
PT_THREADS=$(join -a 2 -e 0 -o 2.1,1.2,2.2 "$PT/threads.start" "$PT/threads.end" |
    awk -v n="$N" -v hz="$CLK_TCK" '{ us = ($3 - $2) * 1000000 / hz / n; if (us >= 1) printf "%s %.0f\n", $1, us }' |
    sort -k2,2nr | awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2 } END { print "" }')
sleep 1   # let the last 250s from the sink be recorded before stopping
stop_pid "$POSTERN_PID"
POSTERN_PID=
PT_SINK_TOTAL=$(sink_count)
stop_sink

if [ "${ONLY:-}" = postern ]; then   # A/B runs of Postern builds: skip Postfix
    printf 'postern %d messages %.2f s %.0f msg/s %s (%s)\n' "$N" "$PT_SECS" "$(calc "$N / $PT_SECS")" "$PT_CPU" "$BIN"
    echo "postern cpu by thread, us/msg: $PT_THREADS"
    [ -z "$PT_SYSCALLS" ] || echo "postern per message: $PT_SYSCALLS"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Postfix: a private instance (own config, queue and data directories) under $T/postfix.

PF=$T/postfix
PF_ETC=$PF/etc
PF_PORT=$(free_port)
mkdir -p "$PF_ETC" "$PF/spool"
install -d -o "$MAIL_OWNER" -m 700 "$PF/data"
cat > "$PF_ETC/main.cf" << EOF
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
maillog_file_prefixes = $PF
maillog_file = $PF/maillog
myhostname = postfix-bench.example.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:$SINK_PORT
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_process_limit = 100
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
EOF
# No chroot; only the services a relay needs (plus the log service for maillog_file).
cat > "$PF_ETC/master.cf" << EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
showq     unix  n       -       n       -       -       showq
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF

start_sink postfix
log "postfix: 127.0.0.1:$PF_PORT -> sink 127.0.0.1:$SINK_PORT, $N messages"
# postfix(1) prints its errors only to a terminal or the log file, so show the log on failure.
PF_RUNNING=1
timeout 60 postfix -c "$PF_ETC" start > "$PF/start.out" 2>&1 ||
    { cat "$PF/start.out" "$PF/maillog" >&2 2> /dev/null; die "postfix start failed"; }
PF_MASTER=$(tr -dc 0-9 < "$PF/spool/pid/master.pid" 2> /dev/null || true)
[ -n "$PF_MASTER" ] || { cat "$PF/maillog" >&2 2> /dev/null; die "postfix master did not start"; }
wait_listening "$PF_PORT" postfix "$PF_MASTER"
busy_check postfix
run_load postfix "$PF_PORT"
PF_SECS=$SECONDS_TAKEN
PF_INJECT=$INJECT_SECONDS
sleep 1
PF_QUEUED=$(find "$PF/spool/incoming" "$PF/spool/active" "$PF/spool/deferred" -type f | wc -l)
stop_postfix
PF_SINK_TOTAL=$(sink_count)
stop_sink

# ---------------------------------------------------------------------------------------------
# Report

rate() { calc "$N / $1"; }
PT_RATE=$(rate "$PT_SECS")
PF_RATE=$(rate "$PF_SECS")

echo
echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))," \
    "load average $LOAD_START at the start, temp dir $T on $(df -T "$T" | awk 'NR == 2 { print $2 }') ($(df "$T" | awk 'NR == 2 { print $1 }')), kernel $(uname -r)"
echo "load: smtp-source -s $SESSIONS -m $N -l $SIZE, relay -> smtp-sink on 127.0.0.1, no TLS"
echo "postern tree $(git -C "$ROOT" describe --always --dirty 2> /dev/null || echo "?") (binary built $(date -r "$BIN" +%FT%T)), postfix $(postconf -dh mail_version)"
echo
printf '%-7s %9s %8s %7s\n' relay messages seconds msg/s
printf '%-7s %9d %8.2f %7.0f\n' postern "$N" "$PT_SECS" "$PT_RATE"
printf '%-7s %9d %8.2f %7.0f\n' postfix "$N" "$PF_SECS" "$PF_RATE"
printf 'ratio postern/postfix: %.1fx\n' "$(calc "$PT_RATE / $PF_RATE")"
printf 'postern %s\n' "$PT_CPU"
echo "postern cpu by thread, us/msg: $PT_THREADS"
[ -z "$PT_SYSCALLS" ] || echo "postern per message: $PT_SYSCALLS"
echo
printf 'smtp-source finished (all accepted) after: postern %.2f s, postfix %.2f s\n' "$PT_INJECT" "$PF_INJECT"
[ -z "$BUSY_NOTE" ] || echo "warning: a compiler was running during the run of:$BUSY_NOTE (figures skewed)"
echo "sink totals at stop: postern $PT_SINK_TOTAL, postfix $PF_SINK_TOTAL (expected $N each)"
[ "$PF_QUEUED" = 0 ] || echo "warning: $PF_QUEUED messages still in the Postfix queue"
# The self-signed certificate warning is expected on a fresh data directory.
PT_LOG=$PT/postern.log
echo "postern log: $(grep -c ': delivered ' "$PT_LOG" || true) delivered," \
    "$(grep -c ': deferred ' "$PT_LOG" || true) deferred, $(grep -c ': bounced ' "$PT_LOG" || true) bounced"
PT_WARN=$(grep -E '\b(WARN|ERROR)\b' "$PT_LOG" | grep -v 'generated a self-signed certificate' || true)
if [ -n "$PT_WARN" ]; then
    echo "warning: $(printf '%s\n' "$PT_WARN" | wc -l) WARN/ERROR lines in the Postern log ($PT_LOG); first ones:"
    printf '%s\n' "$PT_WARN" | head -n 5 | sed 's/^/    /'
    KEEP=1
fi
if [ "$PT_SINK_TOTAL" != "$N" ] || [ "$PF_SINK_TOTAL" != "$N" ]; then
    echo "warning: a sink received more or fewer messages than were sent (duplicates or losses)"
fi
