#!/usr/bin/env bash
# Give a virtual environment its own tcmalloc, without root, where the system has none.
#
# `sdtrain train` runs with tcmalloc when it finds one (src/sdtrain/cli/allocator.py): the
# system's, or a copy in <venv>/lib/sdtrain-malloc/. With glibc's malloc the heap fragments over
# the first training steps; tcmalloc measured 0.18-0.22 GiB less peak memory at the same speed
# (README, Speed). On Debian/Ubuntu this script downloads the distribution's own
# libtcmalloc-minimal4 package (`apt-get download`: no root, nothing installed system-wide) and
# copies its library there. Elsewhere it only says what to install. It never fails the install.
# Usage: bash scripts/fetch_tcmalloc.sh VENV        (SDTRAIN_NO_TCMALLOC=1 skips it)
set -uo pipefail
venv=${1:?usage: fetch_tcmalloc.sh VENV}
dest="$venv/lib/sdtrain-malloc"
[ "${SDTRAIN_NO_TCMALLOC:-}" = "1" ] && exit 0
[ "$(uname -s)" = "Linux" ] || exit 0
if { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libtcmalloc\(_minimal\)\?\.so\.4 '; then
  exit 0  # the system has one: sdtrain uses it
fi
if [ -f "$dest/libtcmalloc_minimal.so.4" ]; then
  exit 0
fi
hint="tcmalloc not found; for less peak memory in training install it (Debian/Ubuntu: apt install libtcmalloc-minimal4; Fedora: dnf install gperftools-libs)"
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "$hint"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download runs as _apt where it can: it must be able to write here
if ! (cd "$work" && timeout 120 apt-get download -q -o Acquire::Retries=0 libtcmalloc-minimal4 >/dev/null 2>&1); then
  echo "$hint (apt-get download libtcmalloc-minimal4 failed)"
  exit 0
fi
dpkg-deb -x "$work"/libtcmalloc-minimal4_*.deb "$work/x" || { echo "$hint"; exit 0; }
lib=$(find "$work/x" -name 'libtcmalloc_minimal.so.4' | head -n 1)
if [ -z "$lib" ]; then
  echo "$hint (the package held no libtcmalloc_minimal.so.4)"
  exit 0
fi
mkdir -p "$dest"
cp -L "$lib" "$dest/libtcmalloc_minimal.so.4.tmp" && mv "$dest/libtcmalloc_minimal.so.4.tmp" "$dest/libtcmalloc_minimal.so.4"
if ! LD_PRELOAD="$dest/libtcmalloc_minimal.so.4" "$venv/bin/python" -c "pass" 2>"$work/err" || [ -s "$work/err" ]; then
  rm -f "$dest/libtcmalloc_minimal.so.4"
  echo "$hint (the downloaded library does not load here: $(head -c 200 "$work/err"))"
  exit 0
fi
echo "tcmalloc: $dest/libtcmalloc_minimal.so.4 (from Debian's libtcmalloc-minimal4; sdtrain train uses it)"
