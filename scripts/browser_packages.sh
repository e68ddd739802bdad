#!/usr/bin/env bash
# Debian's Chromium, its driver and the CJK and emoji fonts for tests/test_browser.py, installed once with apt.
# Needs root and apt-get; elsewhere it says so and exits 0 (the browser test then skips, or fails where required).
# Usage: scripts/browser_packages.sh [--check]   (--check: exit 1 when something is missing, install nothing)
set -euo pipefail
PACKAGES=(chromium chromium-driver fonts-noto-cjk fonts-noto-color-emoji)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then echo "browser packages: installed (${PACKAGES[*]})" >&2; exit 0; fi
if [ "${1:-}" = "--check" ]; then echo "missing: ${missing[*]}"; exit 1; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser packages: ${missing[*]} missing; installing them needs root and apt-get" >&2
    exit 0
fi
echo "browser packages: installing ${missing[*]} with apt-get (a minute or two, once)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }
