#!/usr/bin/env bash
# Runs commands exactly as README.md prints them, so the README and what works cannot drift.
#
#   bash scripts/readme.sh first-command    # the first line of the "The two commands" block
#   bash scripts/readme.sh lending-by-hand  # the "Lending by hand" block, in a temporary dir
#   bash scripts/readme.sh references       # every repository file README.md names exists
#   bash scripts/readme.sh print NAME       # print what would run
#
# `lending-by-hand` replaces `/tmp/` in the block with a fresh temporary directory (so runs never
# meet each other's state), runs it with `set -e`, then stops the nodes it started and removes
# the directory.
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

case "${1:-}" in
first-command)
    cmd=$(first_command)
    [ -n "$cmd" ] || { echo "README.md: no first command found" >&2; exit 1; }
    echo "+ $cmd"
    bash -c "$cmd"
    ;;
lending-by-hand)
    body=$(lending_by_hand)
    [ -n "$body" ] || { echo "README.md: no 'Lending by hand' block found" >&2; exit 1; }
    tmp=$(mktemp -d /tmp/devlend-readme.XXXXXX)
    script="$tmp/lending-by-hand.sh"
    {
        echo 'set -euo pipefail'
        # Stop every node the block started (its background jobs), whatever happened.
        echo 'trap '"'"'for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done; wait || true'"'"' EXIT'
        echo "set -x"
        printf '%s\n' "${body//\/tmp\//$tmp/}"
    } >"$script"
    rc=0
    bash "$script" || rc=$?
    rm -rf "$tmp"
    if [ "$rc" -ne 0 ]; then
        echo "README.md's 'Lending by hand' block failed (exit $rc)" >&2
        exit "$rc"
    fi
    echo "README.md's 'Lending by hand' block ran"
    ;;
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
    lending-by-hand) lending_by_hand ;;
    *) echo "usage: $0 print first-command|lending-by-hand" >&2; exit 2 ;;
    esac
    ;;
*)
    echo "usage: $0 first-command|lending-by-hand|print NAME" >&2
    exit 2
    ;;
esac
