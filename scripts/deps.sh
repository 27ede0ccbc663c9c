#!/usr/bin/env bash
# Installs the system packages the tests need beyond the Rust toolchain, idempotently:
# etcd (Debian's etcd-server, 3.4) for the cluster registry's tests; pciutils (`lspci`, which
# `devlend lspci`'s decoder is compared with), prometheus (`promtool check metrics` on the
# metrics page) and tmux (`devlend top` in a real terminal). Does nothing when they are there
# already; needs root (or sudo) otherwise.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v lspci >/dev/null 2>&1 || need+=(pciutils)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ ${#need[@]} -eq 0 ]; then
    echo "deps: etcd $(etcd --version 2>/dev/null | head -1 | awk '{print $3}'), lspci, promtool, tmux present"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "deps: need root to install ${need[*]}" >&2; exit 1; }
    sudo="sudo"
fi
echo "deps: installing ${need[*]}"
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
# The packages' services are not wanted: every test starts its own etcd on its own ports, and
# only promtool is used from prometheus.
if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v etcd >/dev/null && command -v lspci >/dev/null && command -v promtool >/dev/null \
    && command -v tmux >/dev/null
