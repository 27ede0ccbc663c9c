#!/usr/bin/env bash
# Provisions what the VFIO guest test needs beyond scripts/vm-setup.sh: the guest kernel's VFIO
# modules (irqbypass, vfio, vfio_iommu_type1, vfio-pci-core, vfio-pci), xz-decompressed from the
# kernel package vm-setup.sh unpacked, as a newc cpio archive (lib/vfio/*.ko) to append to the
# initramfs: CACHE/vfio-modules.cpio. Also checks that the kernel was built with them.
# Prints VFIO_MODULES=PATH.
#
# Idempotent and cached: skipped when the archive exists. Run scripts/vm-setup.sh first.
# Usage: scripts/vfio-guest.sh [CACHE_DIR]   (default: ${DEVLEND_CACHE:-<repo>/.cache})
# Exit status: 0 ready; 2 not root (and nothing cached); 3 a host tool cannot be installed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${1:-${DEVLEND_CACHE:-$REPO/.cache}}
CACHE=$(cd "$CACHE" && pwd)
OUT=$CACHE/vfio-modules.cpio
log() { echo "vfio-guest: $*" >&2; }

if [[ ! -f $OUT ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root the first time"
        exit 2
    fi
    exec 9>>"$CACHE/.lock"
    flock 9
fi
if [[ ! -f $OUT ]]; then
    for tool in xz cpio; do
        if ! command -v $tool >/dev/null 2>&1; then
            log "installing $tool"
            apt-get update -qq >&2 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$([[ $tool == xz ]] && echo xz-utils || echo cpio)" >&2 || exit 3
        fi
    done
    MODDIR=$(ls -d "$CACHE"/kernel-deb/usr/lib/modules/*/kernel 2>/dev/null | head -1)
    if [[ -z $MODDIR ]]; then
        log "no kernel modules under $CACHE/kernel-deb: run scripts/vm-setup.sh first"
        exit 1
    fi
    for opt in CONFIG_VFIO=m CONFIG_VFIO_PCI=m CONFIG_VFIO_IOMMU_TYPE1=m CONFIG_INTEL_IOMMU=y CONFIG_IRQ_REMAP=y; do
        grep -qx "$opt" "$CACHE/kernel.config" || { log "the guest kernel lacks $opt"; exit 1; }
    done
    ROOT=$CACHE/vfio-modules-root
    rm -rf "$ROOT"
    mkdir -p "$ROOT/lib/vfio"
    # Dependency order (insmod has no resolver): the order the guest loads them in.
    for m in virt/lib/irqbypass drivers/vfio/vfio drivers/vfio/vfio_iommu_type1 \
        drivers/vfio/pci/vfio-pci-core drivers/vfio/pci/vfio-pci; do
        xz -dc "$MODDIR/$m.ko.xz" >"$ROOT/lib/vfio/$(basename "$m").ko"
    done
    printf '%s\n' irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci >"$ROOT/lib/vfio/order"
    (cd "$ROOT" && find . | cpio -o -H newc --quiet) >"$OUT.tmp"
    mv -f "$OUT.tmp" "$OUT"
    rm -rf "$ROOT"
fi
echo "VFIO_MODULES=$OUT"
