#!/usr/bin/env bash
# Runs every test of devlend: formatting, lints, unit + integration tests (two-process fabric
# and lending tests, kill -9 tests, network-namespace tcp tests, QEMU guests driving the NVMe
# model through vfio-user). Installs what the tests need (QEMU 11 from trixie-backports, a
# Debian cloud kernel, busybox) through scripts/vm-setup.sh, idempotently and cached.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== setup: VM components (cached in ${DEVLEND_CACHE:-$PWD/.cache})"
bash scripts/vm-setup.sh

echo "== setup: system packages (etcd, pciutils, prometheus's promtool, tmux)"
bash scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo doc (warnings are errors: a doc link that does not resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

echo "== cargo test"
cargo test --workspace 2>&1

# The README's commands as it prints them (extracted from README.md, so they cannot drift).
echo "== README: the files it names"
bash scripts/readme.sh references
echo "== README: the first command"
bash scripts/readme.sh first-command
echo "== README: the 'Lending by hand' block"
bash scripts/readme.sh lending-by-hand
echo "== README: the SR-IOV sharing block"
bash scripts/readme.sh sharing
echo "== README: the etcd cluster block"
bash scripts/readme.sh cluster
echo "== README: 'Lending by hand', then the running-VM block (QEMU, hot-plug and back)"
bash scripts/readme.sh vm-hotplug
