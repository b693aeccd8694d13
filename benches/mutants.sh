#!/usr/bin/env bash
# Mutation testing of the modules that carry the README's promises: cargo-mutants changes the
# code (a comparison flipped, a function body replaced by a default value, a `!` dropped) and
# checks that some test fails. A mutant no test notices ("missed") is a promise no test keeps.
#
#   benches/mutants.sh [AREA...]      # default: every area below
#
#   bounce    DSN building                    src/bounce.rs
#   suppress  the suppression list            src/suppress.rs
#   spool     destruction of final messages   src/spool/*.rs (destroy, punch, which message is
#                                             final: Index::apply, all_final, finish_final)
#   bodies    body files of big messages      src/spool/bodyfile.rs, the sweep of orphans at
#                                             recovery, the removal after the punch's sync
#   purge     the ledger's retention purge    src/ledger/mod.rs (Ledger::purge)
#   proto     DATA decoding, smuggling        src/proto/data.rs
#   relay     who may relay                   src/config.rs (RelayConfig::allows), the RCPT
#                                             handler of src/server/session.rs
#   reuse     pooled outbound connections     src/delivery/ (Deliverer::pooled, transaction,
#                                             attempt; Connection::is_open)
#   places    places for content              src/server/session.rs (take_data_slot, and the
#                                             DATA and BDAT handlers that use it)
#   inbox     the spool writer's inbox        src/spool/inbox.rs (which requests wake the
#                                             writer, when a pass is due, closing)
#   lazy      bodies read at their turn       src/spool/mod.rs (Record::open, read_parts,
#                                             read_body), src/queue/mod.rs (load_body, Stored)
#   park      deliveries turned away by a     src/delivery/limits.rs (Limits::slot, the gate's
#             busy destination, woken later   wakes), max_waiting, src/queue/ (next_due, wake)
#
# Each area runs only the tests that exercise it (a unit-test module filter, or one integration
# test file), so that a mutant costs one incremental build and a short test run. Even so this
# takes hours on a small machine: it is not part of CI. Results go to mutants.out/<area>/
# (caught.txt, missed.txt, timeout.txt, unviable.txt; cargo-mutants' own layout), and a table
# of counts is printed at the end.
#
# Needs cargo-mutants (`cargo install cargo-mutants --locked`), and for the relay area the
# peers the integration tests use. Environment: TIMEOUT (seconds per mutant's test run, default
# 300), LIST=1 (only list the mutants of each area, build nothing).
#
# The mutants are made in a copy of the sources (target/mutants-tree), never in the checkout,
# and built into the checkout's target/ so that dependencies are not rebuilt: cargo-mutants' own
# copy of the tree would rebuild every dependency (build-script outputs record absolute paths).
# Do not run cargo in the checkout meanwhile: it would wait for target/'s lock.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIMEOUT=${TIMEOUT:-300}
cd "$ROOT"

die() { echo "mutants.sh: $*" >&2; exit 1; }
cargo mutants --version > /dev/null 2>&1 || die "cargo-mutants not found (cargo install cargo-mutants --locked)"

# area -> cargo-mutants selection, the test target built and run (--lib or --test=NAME), and
# a test name filter.
select_area() {
    FILTER=()
    case $1 in
        bounce) FILES=(--file src/bounce.rs) TARGET=(--lib) FILTER=(bounce::) ;;
        suppress) FILES=(--file src/suppress.rs) TARGET=(--lib) FILTER=(ledger:: suppress::) ;;
        # The unit tests, and the delivery tests that look at the segment files.
        spool) FILES=(--file 'src/spool/*.rs' --re 'punch|destroy|Index::remove|Index::apply|all_final|finish_final|write_zeros')
            TARGET=(--lib --test=delivery) FILTER=(spool:: body_destroyed segment retried) ;;
        bodies) FILES=(--file src/spool/bodyfile.rs --file src/spool/recovery.rs --file src/spool/writer.rs
            --re 'bodyfile|sweep_bodies|remove_bodies|sync_punches') TARGET=(--lib) FILTER=(spool::) ;;
        purge) FILES=(--file src/ledger/mod.rs --re 'Ledger::purge') TARGET=(--lib) FILTER=(ledger::) ;;
        proto) FILES=(--file src/proto/data.rs) TARGET=(--lib) FILTER=(proto::) ;;
        relay) FILES=(--file src/config.rs --file src/server/session.rs
            --re 'RelayConfig::allows|Session::rcpt( |$)') TARGET=(--test=smtp_server) ;;
        reuse) FILES=(--file src/delivery/mod.rs --file src/delivery/client.rs
            --re 'Deliverer::pooled|Deliverer::transaction|Deliverer::attempt|Connection::is_open')
            TARGET=(--lib --test=delivery) ;;
        places) FILES=(--file src/server/session.rs --re 'take_data_slot|Session::data|Session::bdat')
            TARGET=(--test=abuse --test=smtp_server) ;;
        inbox) FILES=(--file src/spool/inbox.rs) TARGET=(--lib) FILTER=(spool::) ;;
        lazy) FILES=(--file src/spool/mod.rs --file src/queue/mod.rs
            --re 'Record<.*>::open|Spool::read_parts|Spool::read_body|Queue::load_body|Content for Stored')
            TARGET=(--lib --test=queue) FILTER=(spool:: body_memory) ;;
        park) FILES=(--file src/delivery/limits.rs --file src/delivery/mod.rs --file src/queue/mod.rs
            --file src/queue/due.rs
            --re 'Gate::room|Drop for Slot|Drop for Waiting|Limits::slot|Limits::wake_all|max_waiting ->|in max_waiting|Queue::wake_parked|Due::wake|replace next_due|in next_due$'
            --exclude-re 'delete field')
            TARGET=(--lib --test=queue) FILTER=(delivery::limits turned_away stuck_destination tarpit) ;;
        *) die "unknown area '$1' (bounce suppress spool bodies purge proto relay reuse places inbox lazy park)" ;;
    esac
}

AREAS=("$@")
[ ${#AREAS[@]} -gt 0 ] || AREAS=(bounce suppress spool purge proto relay)
for area in "${AREAS[@]}"; do select_area "$area"; done   # fail early on a typo

TREE=$ROOT/target/mutants-tree
OUT=$ROOT/mutants.out
if [ -z "${LIST:-}" ]; then
    rm -rf "$TREE"
    mkdir -p "$TREE"
    tar -C "$ROOT" --exclude=./target --exclude=./mutants.out --exclude=./.git -cf - . | tar -C "$TREE" -xf -
    cd "$TREE"
    export CARGO_TARGET_DIR=$ROOT/target
fi

for area in "${AREAS[@]}"; do
    select_area "$area"
    if [ -n "${LIST:-}" ]; then
        echo "== $area"
        cargo mutants --list "${FILES[@]}"
        continue
    fi
    echo "== $area: $(cargo mutants --list "${FILES[@]}" | wc -l) mutants" >&2
    mkdir -p "$OUT/$area"
    filter=()
    [ ${#FILTER[@]} -eq 0 ] || filter=(--cargo-test-arg=-- "${FILTER[@]/#/--cargo-test-arg=}")
    # cargo-mutants exits non-zero when a mutant is missed; the table below reports it.
    cargo mutants --in-place --no-shuffle --timeout "$TIMEOUT" --output "$OUT/$area" \
        --cargo-arg=--ignore-rust-version "${TARGET[@]/#/--cargo-arg=}" "${filter[@]}" \
        "${FILES[@]}" || true
done

[ -n "${LIST:-}" ] && exit 0
cd "$ROOT"
count() { if [ -s "$1" ]; then grep -c . "$1"; else echo 0; fi; }
printf '\n%-9s %7s %7s %8s %9s\n' area caught missed timeout unviable
for area in "${AREAS[@]}"; do
    d=mutants.out/$area/mutants.out
    printf '%-9s %7s %7s %8s %9s\n' "$area" "$(count "$d/caught.txt")" "$(count "$d/missed.txt")" \
        "$(count "$d/timeout.txt")" "$(count "$d/unviable.txt")"
done
for area in "${AREAS[@]}"; do
    d=mutants.out/$area/mutants.out
    if [ -s "$d/missed.txt" ]; then
        echo "-- missed in $area:"
        cat "$d/missed.txt"
    fi
done
