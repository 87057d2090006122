#!/usr/bin/env bash
# Give a virtual environment its own tcmalloc, without root, where the system has none.
#
# `sdtrain train` runs with tcmalloc when it finds one (src/sdtrain/cli/allocator.py): the
# system's, or a copy in <venv>/lib/sdtrain-malloc/. With glibc's malloc the heap fragments over
# the first training steps; tcmalloc measured about 0.2-0.3 GiB less peak memory at the same
# speed (README, Speed). On Debian/Ubuntu this script downloads the distribution's own tcmalloc
# package (`apt-get download`: no root, nothing installed system-wide; libtcmalloc-minimal4t64 on
# Debian 13 / Ubuntu 24.04 and later, libtcmalloc-minimal4 before) and copies its library there.
# Elsewhere it only says what to install. It never fails the install.
# Usage: bash scripts/fetch_tcmalloc.sh VENV        (SDTRAIN_NO_TCMALLOC=1 skips it)
set -uo pipefail
venv=${1:?usage: fetch_tcmalloc.sh VENV}
dest="$venv/lib/sdtrain-malloc"
[ "${SDTRAIN_NO_TCMALLOC:-}" = "1" ] && exit 0
[ "$(uname -s)" = "Linux" ] || exit 0
case "$(cd "$venv" 2>/dev/null && pwd)" in
  *[[:space:]:]*)  # LD_PRELOAD cannot name a path with a space or colon: sdtrain skips such a copy
    echo "tcmalloc: not fetched: the environment's path has a space or colon (install the system package instead)"
    exit 0 ;;
esac
# the linker cache, read whole first (grep -q on a pipe can kill ldconfig early: a false "none")
listing=$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)
if printf '%s\n' "$listing" | grep -v 'x86-32' | grep 'libtcmalloc\(_minimal\)\?\.so\.4 ' >/dev/null; then
  exit 0  # the system has one: sdtrain uses it
fi
if [ -f "$dest/libtcmalloc_minimal.so.4" ]; then
  exit 0
fi
hint="tcmalloc not found; for less peak memory in training install it (Debian/Ubuntu: apt install libtcmalloc-minimal4 or libtcmalloc-minimal4t64; Fedora: dnf install gperftools-libs)"
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "$hint"
  exit 0
fi
work=$(mktemp -d) || { echo "$hint"; exit 0; }
trap 'rm -rf "$work"' EXIT
echo "tcmalloc: fetching the distribution's package (apt-get download, up to 2 minutes)..."
fetched=""
for package in libtcmalloc-minimal4t64 libtcmalloc-minimal4; do
  if (cd "$work" && timeout 120 apt-get download -q -o Acquire::Retries=0 "$package" >/dev/null 2>&1); then
    fetched=$package
    break
  fi
done
set -- "$work"/libtcmalloc-minimal4*.deb
if [ -z "$fetched" ] || [ $# -ne 1 ] || [ ! -f "$1" ]; then
  echo "$hint (apt-get download found no package; its lists may need \`apt-get update\` as root)"
  exit 0
fi
dpkg-deb -x "$1" "$work/x" || { echo "$hint"; exit 0; }
lib=$(find "$work/x" -name 'libtcmalloc_minimal.so.4' | head -n 1)
if [ -z "$lib" ]; then
  echo "$hint (the package held no libtcmalloc_minimal.so.4)"
  exit 0
fi
mkdir -p "$dest"
cp -L "$lib" "$dest/libtcmalloc_minimal.so.4.tmp" && mv "$dest/libtcmalloc_minimal.so.4.tmp" "$dest/libtcmalloc_minimal.so.4"
# preloaded, the library must be mapped into the venv's python (ld.so only warns when it is not)
probe="import sys; sys.exit(0 if 'libtcmalloc' in open('/proc/self/maps').read() else 1)"
if ! LD_PRELOAD="$(cd "$dest" && pwd)/libtcmalloc_minimal.so.4" "$venv/bin/python" -c "$probe" 2>"$work/err"; then
  rm -f "$dest/libtcmalloc_minimal.so.4"
  echo "$hint (the downloaded library does not load here: $(head -c 200 "$work/err"))"
  exit 0
fi
echo "tcmalloc: $dest/libtcmalloc_minimal.so.4 (from the $fetched package; sdtrain train uses it)"
