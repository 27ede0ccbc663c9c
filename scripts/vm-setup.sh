#!/usr/bin/env bash
# Provisions what the VM tests and `devlend bench vm` need, into a cache directory:
#   - QEMU 11 (trixie-backports), unpacked with debootstrap into CACHE/trixie and run with its own
#     loader (no chroot at run time): CACHE/bin/qemu-system-x86_64 is a wrapper that does that;
#   - a Debian cloud kernel (nvme and ext2/ext4 built in): CACHE/vmlinuz;
#   - a busybox-static initramfs whose /init runs /test.sh, to be appended by the caller as a
#     second (newc) cpio archive: CACHE/initramfs.cpio, uncompressed so appending is a concatenation.
# Writes CACHE/vm.env (KEY=VALUE lines) and prints it.
#
# Idempotent: each step is skipped when its output exists; a second run is offline-safe.
# Usage: scripts/vm-setup.sh [CACHE_DIR]     (default: ${DEVLEND_CACHE:-<repo>/.cache})
# Not root and nothing cached: runs itself again with sudo when there is sudo.
# Exit status: 0 ready; 2 not root (nothing cached, no sudo); 3 a host tool cannot be installed;
# anything else: a real failure (mirror unreachable, debootstrap failed, ...).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${1:-${DEVLEND_CACHE:-$REPO/.cache}}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
TRIXIE=$CACHE/trixie
ENV_FILE=$CACHE/vm.env
log() { echo "vm-setup: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    if [[ -f $ENV_FILE ]]; then
        cat "$ENV_FILE"
        exit 0
    fi
    if command -v sudo >/dev/null 2>&1; then
        log "the first run needs root (debootstrap, apt-get): running it with sudo"
        exec sudo bash "$REPO/scripts/vm-setup.sh" "$CACHE"
    fi
    log "must run as root the first time (debootstrap, apt-get), and there is no sudo here"
    exit 2
fi

# One provisioning at a time per cache (tests run this concurrently).
exec 9>>"$CACHE/.lock"
flock 9

# The Debian mirror this machine uses (deb822 sources; there may be no sources.list).
mirror() {
    local m=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources || true)
    fi
    if [[ -z $m && -f /etc/apt/sources.list ]]; then
        m=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=$(mirror)

APT_UPDATED=0
need_pkg() { # need_pkg COMMAND PACKAGE
    if ! command -v "$1" >/dev/null 2>&1; then
        if [[ $APT_UPDATED -eq 0 ]]; then
            log "apt-get update"
            apt-get update -qq >&2 || log "apt-get update failed"
            APT_UPDATED=1
        fi
        log "installing $2"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2; then
            log "cannot install $2"
            exit 3
        fi
    fi
}

# --- QEMU 11 from trixie-backports --------------------------------------------------------
QEMU_BIN=$TRIXIE/usr/bin/qemu-system-x86_64
if [[ ! -x $QEMU_BIN || ! -f $TRIXIE/.devlend-qemu-ok ]]; then
    need_pkg debootstrap debootstrap
    if [[ ! -f $TRIXIE/.devlend-debootstrap-ok ]]; then
        rm -rf "$TRIXIE"
        log "debootstrap trixie into $TRIXIE (mirror $MIRROR)"
        debootstrap --variant=minbase trixie "$TRIXIE" "$MIRROR" >&2
        touch "$TRIXIE/.devlend-debootstrap-ok"
    fi
    cat >"$TRIXIE/etc/apt/sources.list.d/backports.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # chroot apt needs /proc and /dev bits only loosely; keep it minimal and undo the mounts.
    cp -f /etc/resolv.conf "$TRIXIE/etc/resolv.conf" 2>/dev/null || true
    log "installing qemu-system-x86 from trixie-backports in the chroot"
    chroot "$TRIXIE" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive chroot "$TRIXIE" apt-get install -y -qq --no-install-recommends \
        -t trixie-backports qemu-system-x86 >&2
    touch "$TRIXIE/.devlend-qemu-ok"
fi

mkdir -p "$CACHE/bin"
QEMU=$CACHE/bin/qemu-system-x86_64
cat >"$QEMU.tmp" <<EOF
#!/bin/sh
# Runs the trixie-backports QEMU unpacked in $TRIXIE with its own loader and libraries.
T=$TRIXIE
exec "\$T/lib64/ld-linux-x86-64.so.2" --library-path "\$T/usr/lib/x86_64-linux-gnu:\$T/lib/x86_64-linux-gnu" \\
    "\$T/usr/bin/qemu-system-x86_64" -L "\$T/usr/share/qemu" -L "\$T/usr/share/seabios" "\$@"
EOF
chmod +x "$QEMU.tmp"
mv -f "$QEMU.tmp" "$QEMU"

# --- kernel --------------------------------------------------------------------------------
KERNEL=$CACHE/vmlinuz
if [[ ! -f $KERNEL ]]; then
    log "fetching the Debian cloud kernel (in the trixie chroot)"
    rm -rf "$CACHE/kernel-deb"
    mkdir -p "$TRIXIE/tmp/kernel-deb"
    KPKG=$(chroot "$TRIXIE" apt-cache depends linux-image-cloud-amd64 |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
    if [[ -z $KPKG ]]; then
        log "could not resolve linux-image-cloud-amd64"
        exit 1
    fi
    (cd "$TRIXIE/tmp/kernel-deb" && chroot "$TRIXIE" sh -c "cd /tmp/kernel-deb && apt-get download -qq -o APT::Sandbox::User=root $KPKG") >&2
    mkdir -p "$CACHE/kernel-deb"
    dpkg -x "$TRIXIE"/tmp/kernel-deb/*.deb "$CACHE/kernel-deb"
    rm -rf "$TRIXIE/tmp/kernel-deb"
    cp "$CACHE"/kernel-deb/boot/vmlinuz-* "$KERNEL.tmp"
    cp "$CACHE"/kernel-deb/boot/config-* "$CACHE/kernel.config" 2>/dev/null || true
    mv -f "$KERNEL.tmp" "$KERNEL"
fi

# --- busybox initramfs ---------------------------------------------------------------------
INITRAMFS=$CACHE/initramfs.cpio
INIT_SRC=$CACHE/init.new
cat >"$INIT_SRC" <<'EOF'
#!/bin/sh
# devlend guest: mount the basics, run /test.sh (appended as a second cpio archive by the test
# harness) and print its exit status, or give an interactive shell when there is none; then
# power off.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "DEVLEND-GUEST-UP $(cut -d' ' -f1 /proc/uptime)"
if [ -x /test.sh ]; then
    /test.sh
    echo "DEVLEND-TEST-EXIT $?"
else
    echo "no /test.sh: interactive shell (exit to power off)"
    setsid cttyhack sh
fi
sync
poweroff -f
EOF
# Rebuilt when missing or when /init changed.
if [[ ! -f $INITRAMFS ]] || ! cmp -s "$INIT_SRC" "$CACHE/init.built"; then
    if ! dpkg -s busybox-static >/dev/null 2>&1; then
        if [[ $APT_UPDATED -eq 0 ]]; then
            apt-get update -qq >&2 || log "apt-get update failed"
            APT_UPDATED=1
        fi
        log "installing busybox-static"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2; then
            log "cannot install busybox-static"
            exit 3
        fi
    fi
    need_pkg cpio cpio
    ROOT=$CACHE/initramfs-root
    rm -rf "$ROOT"
    mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,mnt,etc}
    cp /bin/busybox "$ROOT/bin/busybox"
    for applet in $("$ROOT/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$ROOT/bin/$applet"
    done
    cp "$INIT_SRC" "$ROOT/init"
    chmod +x "$ROOT/init"
    (cd "$ROOT" && find . | cpio -o -H newc --quiet) >"$INITRAMFS.tmp"
    mv -f "$INITRAMFS.tmp" "$INITRAMFS"
    cp "$INIT_SRC" "$CACHE/init.built"
fi
rm -f "$INIT_SRC"

cat >"$ENV_FILE" <<EOF
DEVLEND_QEMU=$QEMU
DEVLEND_KERNEL=$KERNEL
DEVLEND_INITRAMFS=$INITRAMFS
EOF
cat "$ENV_FILE"
