#!/usr/bin/env bash
# Runs commands exactly as README.md prints them, so the README and what works cannot drift.
#
#   bash scripts/readme.sh first-command    # the first line of the "The two commands" block
#   bash scripts/readme.sh lending-by-hand  # the "Lending by hand" block, in a temporary dir
#   bash scripts/readme.sh sharing          # the SR-IOV block (after a build, devlend on PATH)
#   bash scripts/readme.sh cluster          # the etcd cluster block (three hosts, etcd on :2379)
#   bash scripts/readme.sh vm-hotplug       # "Lending by hand", then the running-VM block
#   bash scripts/readme.sh references       # every repository file README.md names exists
#   bash scripts/readme.sh print NAME       # print what would run
#
# A block runs with `/tmp/` replaced by a fresh temporary directory (so runs never meet each
# other's state), under `set -e`; then every process it started in the background (nodes,
# etcd, QEMU) is stopped and the directory removed. A line whose comment starts with
# `# error:` must fail, saying what follows; a line `#   TEXT` under a command is what it
# prints (checked; a trailing `...` is left out). `. .cache/vm.env` reads the cache that
# scripts/vm-setup.sh filled (`$DEVLEND_CACHE` when set, as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

# The body of the first ```sh block after the heading line $1 (exact match).
block_after() {
    awk -v heading="$1" '
        $0 == heading { found = 1; next }
        found && !inside && /^```sh$/ { inside = 1; next }
        inside && /^```$/ { exit }
        inside { print }
    ' README.md
}

first_command() {
    # First line of the block, without its trailing comment.
    block_after "## The two commands" | head -n 1 | sed 's/[[:space:]]*#.*$//'
}

lending_by_hand() {
    block_after "## Lending by hand"
}

# The script that runs blocks $2... as `$1`: /tmp/ moved to a fresh directory, `# error:`
# lines turned into checks that they fail with that message, `#   TEXT` lines into checks
# that the command above printed TEXT.
block_script() {
    local tmp=$1 heading body cache_env
    shift
    echo 'set -euo pipefail'
    # Stop everything the blocks started (their background jobs), whatever happened.
    echo 'trap '"'"'for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done; wait || true'"'"' EXIT'
    echo "set -x"
    for heading in "$@"; do
        body=$(block_after "$heading")
        [ -n "$body" ] || { echo "README.md: no sh block after '$heading'" >&2; return 1; }
        body=${body//\/tmp\//$tmp/}
        cache_env='. "${DEVLEND_CACHE:-.cache}/vm.env"'
        body=${body//. .cache\/vm.env/$cache_env}
        printf '%s\n' "$body" | awk '
            function flush() { if (have) print pending; have = 0 }
            # "#   TEXT" under a command: what it prints; checked (a trailing "..." cut off).
            /^#   / {
                text = substr($0, 5)
                sub(/[[:space:]]*[.][.][.]$/, "", text)
                if (!have || text ~ /["$`\\]/) { print "README: cannot check the output line: " $0 > "/dev/stderr"; exit 1 }
                cmd = pending
                sub(/[[:space:]]+#.*$/, "", cmd)
                have = 0
                printf "out=$(%s 2>&1) || { echo \"$out\"; exit 1; }\necho \"$out\"\n", cmd
                printf "case \"$out\" in *\"%s\"*) ;; *) echo \"README: expected %s from %s\" >&2; exit 1 ;; esac\n", text, text, cmd
                next
            }
            match($0, /[[:space:]]+#[[:space:]]*error:[[:space:]]*/) {
                flush()
                cmd = substr($0, 1, RSTART - 1)
                msg = substr($0, RSTART + RLENGTH)
                if (msg ~ /["$`\\]/) { print "README: cannot check an error message with quotes: " msg > "/dev/stderr"; exit 1 }
                printf "if out=$(%s 2>&1); then echo \"README: expected an error from: %s\" >&2; exit 1; fi\n", cmd, cmd
                printf "case \"$out\" in *\"%s\"*) echo \"$out\" ;; *) echo \"README: expected %s from %s, got: $out\" >&2; exit 1 ;; esac\n", msg, msg, cmd
                next
            }
            { flush(); pending = $0; have = 1 }
            END { flush() }'
    done
}

# Runs blocks $2... (in one script, in order) and reports as $1.
run_blocks() {
    local name=$1 tmp rc=0
    shift
    tmp=$(mktemp -d /tmp/devlend-readme.XXXXXX)
    if ! block_script "$tmp" "$@" >"$tmp/block.sh"; then
        rm -rf "$tmp"
        exit 1
    fi
    bash "$tmp/block.sh" >"$tmp/out" 2>&1 || rc=$?
    # QEMU's console carries terminal escapes: shown, not obeyed.
    cat -v "$tmp/out"
    rm -rf "$tmp"
    if [ "$rc" -ne 0 ]; then
        echo "README.md's '$name' block failed (exit $rc)" >&2
        exit "$rc"
    fi
    echo "README.md's '$name' block ran"
}

# What the sharing block takes from earlier in the README: a release build on PATH.
build_prelude() {
    cargo build --release --quiet
    PATH=$PWD/target/release:$PATH
    export PATH
}

SHARING="## Sharing one device among several hosts (SR-IOV virtual functions)"
CLUSTER="## A cluster of hosts (etcd)"
VM_HOTPLUG="### Into a running VM, and back, without stopping it (the default way)"

case "${1:-}" in
first-command)
    cmd=$(first_command)
    [ -n "$cmd" ] || { echo "README.md: no first command found" >&2; exit 1; }
    echo "+ $cmd"
    bash -c "$cmd"
    ;;
lending-by-hand) run_blocks "Lending by hand" "## Lending by hand" ;;
sharing)
    build_prelude
    run_blocks "sharing (SR-IOV)" "$SHARING"
    ;;
cluster) run_blocks "cluster (etcd)" "$CLUSTER" ;;
vm-hotplug) run_blocks "Lending by hand + running VM" "## Lending by hand" "$VM_HOTPLUG" ;;
references)
    # Paths in backquotes or in the architecture block that look like repository files.
    missing=0
    for p in $(grep -oE '(docs|crates|scripts|\.ci)/[A-Za-z0-9_./-]*[A-Za-z0-9_]' README.md | sort -u); do
        case "$p" in *NAME*) continue ;; esac   # a placeholder (crates/NAME/fuzz)
        if [ ! -e "$p" ]; then
            echo "README.md names $p, which is not in the repository" >&2
            missing=1
        fi
    done
    for p in $(grep -oE '[A-Za-z0-9_./-]*\.md' README.md | sort -u); do
        case "$p" in */*) ;; *) continue ;; esac
        if [ ! -e "$p" ]; then
            echo "README.md names $p, which is not in the repository" >&2
            missing=1
        fi
    done
    [ "$missing" -eq 0 ] && echo "every file README.md names is in the repository"
    exit "$missing"
    ;;
print)
    case "${2:-}" in
    first-command) first_command ;;
    lending-by-hand) block_script /tmp "## Lending by hand" ;;
    sharing) block_script /tmp "$SHARING" ;;
    cluster) block_script /tmp "$CLUSTER" ;;
    vm-hotplug) block_script /tmp "## Lending by hand" "$VM_HOTPLUG" ;;
    *) echo "usage: $0 print first-command|lending-by-hand|sharing|cluster|vm-hotplug" >&2; exit 2 ;;
    esac
    ;;
*)
    echo "usage: $0 first-command|lending-by-hand|sharing|cluster|vm-hotplug|references|print NAME" >&2
    exit 2
    ;;
esac
