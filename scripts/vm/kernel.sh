#!/usr/bin/env bash
# A Debian kernel for the test and benchmark VMs (scripts/vmtest,
# scripts/peers): the newest linux-image-6.1.0-*-amd64-unsigned (else any
# other generic amd64 one), fetched once with apt-get download and kept,
# without modules, in CACHE/kernels/<package>/ (vmlinuz, config, version).
#
# Sourced (scripts/vmtest): defines vm_kernel CACHE WORK [PACKAGE], which
# sets VM_KPKG and VM_VMLINUZ, or prints why not on stderr and returns 77
# (nothing cached and no way to download) or 1.
#
# Run: scripts/vm/kernel.sh CACHE [PACKAGE] prints the path of vmlinuz;
# exit status 77 with "skipped: why" when no kernel can be had.

# The newest cached kernel package, or nothing.
vm_cached_kernel() { # KERNELS
    local d best=""
    for d in "$1"/*/vmlinuz; do
        [ -f "$d" ] && best="$best$(basename "$(dirname "$d")")"$'\n'
    done
    [ -n "$best" ] && printf '%s' "$best" | sort -V | tail -n 1
    return 0
}

# apt-get download PACKAGE into WORK and keep its boot/ files in KERNELS.
vm_download_kernel() { # KERNELS WORK PACKAGE
    local kernels=$1 dl=$2/kernel-dl pkg=$3 deb
    rm -rf "$dl"
    mkdir -p "$dl" "$kernels"
    chmod 755 "$dl" # apt's sandbox user writes here
    echo "vm: apt-get download $pkg" >&2
    if ! (cd "$dl" && apt-get download "$pkg") >"$2/apt.log" 2>&1; then
        sed 's/^/  apt| /' "$2/apt.log" | grep -v 'unsandboxed as root' >&2 || true
        return 1
    fi
    deb=$(ls "$dl"/*.deb)
    # Only boot/ is needed: the kernel is used without modules.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dl" --wildcards './boot/vmlinuz-*' './boot/config-*' ||
        return 1
    mkdir -p "$kernels/$pkg.tmp"
    cp "$dl"/boot/vmlinuz-* "$kernels/$pkg.tmp/vmlinuz"
    cp "$dl"/boot/config-* "$kernels/$pkg.tmp/config"
    dpkg-deb -f "$deb" Package Version >"$kernels/$pkg.tmp/version"
    rm -rf "$kernels/$pkg" "$dl"
    mv "$kernels/$pkg.tmp" "$kernels/$pkg"
}

vm_kernel() { # CACHE WORK [PACKAGE]
    local kernels=$1/kernels work=$2 kpkg=${3:-} all candidates p
    VM_KPKG=""
    VM_VMLINUZ=""
    if [ -n "$kpkg" ]; then
        if [ ! -f "$kernels/$kpkg/vmlinuz" ]; then
            command -v apt-get >/dev/null 2>&1 || { echo "no kernel cached and no apt-get to download $kpkg" >&2; return 77; }
            vm_download_kernel "$kernels" "$work" "$kpkg" ||
                { echo "could not download $kpkg (apt-get update? network?)" >&2; return 77; }
        fi
    else
        kpkg=$(vm_cached_kernel "$kernels")
        if [ -z "$kpkg" ]; then
            if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
                echo "no Debian kernel cached in $kernels and no apt-get to download one" >&2
                return 77
            fi
            # Newest 6.1 first, then any other generic amd64 kernel, newest first.
            all=$(apt-cache search --names-only '^linux-image-.*-amd64-unsigned$' | cut -d' ' -f1 |
                grep -Ev -- '-(cloud|rt)-amd64-unsigned$' | sort -V -r || true)
            candidates="$(grep '^linux-image-6\.1\.0-' <<<"$all" || true)"$'\n'"$(grep -v '^linux-image-6\.1\.0-' <<<"$all" || true)"
            kpkg=""
            for p in $candidates; do
                if vm_download_kernel "$kernels" "$work" "$p"; then kpkg=$p; break; fi
            done
            if [ -z "$kpkg" ]; then
                echo "could not download any linux-image-*-amd64-unsigned package (apt-get update? network?)" >&2
                return 77
            fi
        fi
    fi
    VM_KPKG=$kpkg
    VM_VMLINUZ=$kernels/$kpkg/vmlinuz
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    [ $# -ge 1 ] || { echo "usage: $0 CACHE [PACKAGE]" >&2; exit 2; }
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/procmig-kernel.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    st=0
    vm_kernel "$1" "$tmp" "${2:-}" 2>"$tmp/err" || st=$?
    if [ "$st" -eq 0 ]; then
        echo "$VM_VMLINUZ"
        exit 0
    fi
    cat "$tmp/err" >&2
    [ "$st" -ne 77 ] || echo "skipped: $(tail -n 1 "$tmp/err")"
    exit "$st"
fi
