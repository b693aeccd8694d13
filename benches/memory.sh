#!/usr/bin/env bash
# Peak resident memory of the daemon (VmHWM from /proc/PID/status) in the two cases of issue #9,
# each on a freshly started daemon with an empty queue:
#
#   inbound:  30 clients each send one 16 MiB message at once (relay listener), relayed by MX
#             to smtp-sink;
#   fan-out:  one 5 MiB message to 100 recipients at 100 domains, each its own MX transaction.
#
#   benches/memory.sh                       # builds target/release/postern
#   POSTERN_BIN=/path/to/postern benches/memory.sh
#   EXTRA=$'[limits]\nmax_body_memory = 33554432' benches/memory.sh   # config tables added
#
# The domains d1.bench.test ... d100.bench.test resolve to 127.0.0.1 through a dnsmasq on a
# loopback port (Postern's [dns] nameservers), and delivery.port points MX delivery at the sink.
# Needs root (smtp-sink drops to nobody), the Debian `postfix` package (smtp-sink),
# `dnsmasq-base` and python3. Only loopback addresses are used. The target is each figure
# under 100 MiB.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${POSTERN_BIN:-$ROOT/target/release/postern}
die() { echo "memory.sh: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (smtp-sink drops to nobody)"
for t in smtp-sink dnsmasq python3 ss; do
    command -v "$t" > /dev/null || [ -x "/usr/sbin/$t" ] || die "$t not found (apt-get install postfix dnsmasq-base python3 iproute2)"
done
if [ -z "${POSTERN_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --ignore-rust-version --quiet) || die "build failed"
fi

T=$(mktemp -d /tmp/postern-memory-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    [ "$rc" = 0 ] && [ -z "${KEEP:-}" ] && rm -rf "$T" || echo "memory.sh: files kept in $T" >&2
    exit "$rc"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
    for _ in $(seq 300); do
        [ -n "$(ss -Htln "src 127.0.0.1 and sport = :$1")" ] && return 0
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$1"
}

SINK=$(free_port)
DNS=$(free_port)
/usr/sbin/smtp-sink -u nobody -c -a -m 512 "127.0.0.1:$SINK" 1024 > "$T/sink.out" 2>&1 &
PIDS+=($!)
MX=()
for i in $(seq 100); do MX+=("--mx-host=d$i.bench.test,mx.bench.test,10"); done
dnsmasq --no-daemon --port="$DNS" --listen-address=127.0.0.1 --bind-interfaces --no-resolv \
    --no-hosts --host-record=mx.bench.test,127.0.0.1 "${MX[@]}" > "$T/dnsmasq.log" 2>&1 &
PIDS+=($!)
wait_port "$SINK"

# start_daemon NAME: a fresh data directory and daemon; sets DAEMON and RELAY.
start_daemon() {
    RELAY=$(free_port)
    mkdir -p "$T/$1"
    cat > "$T/$1/config.toml" << EOF
[server]
hostname = "bench.postern.test"
data_dir = "$T/$1/data"
[[listener]]
addr = "127.0.0.1:$RELAY"
mode = "relay"
[tls]
cert = "$T/cert.pem"
key = "$T/key.pem"
[relay]
networks = ["127.0.0.0/8"]
[delivery]
port = $SINK
tls = "none"
[dns]
nameservers = ["127.0.0.1:$DNS"]
${EXTRA:-}
EOF
    "$BIN" serve --config "$T/$1/config.toml" > "$T/$1/log" 2>&1 &
    DAEMON=$!
    PIDS+=("$DAEMON")
    wait_port "$RELAY"
}

peak_mib() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
# Messages (transactions) the sink has received in all: the last "mesg=" of its -c counter.
delivered() { tail -c 300 "$T/sink.out" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -n 1 | cut -d= -f2; }

# wait_messages N: until the sink has counted N messages in all (or 120 s).
wait_messages() {
    for _ in $(seq 1200); do
        [ "$(delivered || echo 0)" -ge "$1" ] 2> /dev/null && return 0
        sleep 0.1
    done
    die "sink saw $(delivered) messages, expected $1"
}

# send.py MODE PORT: the load (30 x 16 MiB in parallel, or 5 MiB to 100 domains).
cat > "$T/send.py" << 'EOF'
import smtplib, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
def body(size, tag):
    line = b"x" * 76 + b"\r\n"
    head = b"From: bench@sender.bench.test\r\nTo: r@bench.test\r\nSubject: " + tag + b"\r\n\r\n"
    return head + line * (size // len(line))
def send(rcpts, size, tag, errors):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as s:
            s.sendmail("bench@sender.bench.test", rcpts, body(size, tag))
    except Exception as e:
        errors.append(repr(e))
errors = []
if mode == "inbound":
    threads = [threading.Thread(target=send, args=(["r%d@d%d.bench.test" % (i, i % 10 + 1)], 16 << 20, b"big %d" % i, errors)) for i in range(30)]
    for t in threads: t.start()
    for t in threads: t.join()
else:
    send(["r@d%d.bench.test" % i for i in range(1, 101)], 5 << 20, b"fan-out", errors)
if errors:
    sys.exit("send failed: %s" % errors[:3])
EOF

log "inbound: 30 clients x 16 MiB at once"
start_daemon inbound
idle=$(peak_mib "$DAEMON")
python3 "$T/send.py" inbound "$RELAY"
wait_messages 30
inbound=$(peak_mib "$DAEMON")
kill "$DAEMON"; wait "$DAEMON" 2> /dev/null || true
base=$(delivered)

log "fan-out: one 5 MiB message to 100 domains"
start_daemon fanout
python3 "$T/send.py" fanout "$RELAY"
wait_messages $((base + 100))
fanout=$(peak_mib "$DAEMON")
kill "$DAEMON"; wait "$DAEMON" 2> /dev/null || true

printf '%-44s %8s\n' "case" "peak RSS"
printf '%-44s %6s MiB\n' "idle daemon (before the inbound load)" "$idle"
printf '%-44s %6s MiB\n' "inbound: 30 x 16 MiB at once" "$inbound"
printf '%-44s %6s MiB\n' "fan-out: 5 MiB to 100 domains" "$fanout"
