#!/usr/bin/env bash
# Build the Kubernetes control-plane and kubelet binaries from Debian's (bookworm) source package,
# offline, with Debian's Go. Cached under $NETCTL_CACHE/k8s/<source version>/ so later runs skip it.
set -euo pipefail
CACHE="${NETCTL_CACHE:-$HOME/.cache/netctl}"
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
SRC_LIST=/etc/apt/sources.list.d/netctl-deb-src.sources
if [[ ! -f $SRC_LIST ]]; then
  # Mirror the existing Debian 'deb' entry as 'deb-src' (same URI, suites and key).
  awk 'BEGIN{RS="";ORS="\n\n"} /Types: deb/ && /deb.debian.org\/debian\n/ {sub(/Types: deb/,"Types: deb-src"); print; exit}' \
    /etc/apt/sources.list.d/debian.sources > "$SRC_LIST"
  grep -q deb-src "$SRC_LIST" || { echo "netctl: could not derive a deb-src entry" >&2; exit 1; }
  apt-get update -qq
fi
VERSION=$(apt-cache showsrc kubernetes | awk '/^Version:/{print $2; exit}')
HERE="$(cd "$(dirname "$0")" && pwd)"
# Our patches to the vendored sources; the cache key changes with them. Without
# reflect2-go1.18-mapiter the Go 1.19 build of 1.20's apiserver segfaults encoding any map through
# json-iterator (custom resources, for one): reflect.mapiterinit changed signature in Go 1.18.
PATCHES=("$HERE"/patches/*.patch)
PATCH_ID=$(cat "${PATCHES[@]}" | sha256sum | cut -c1-8)
OUT="$CACHE/k8s/$VERSION-$PATCH_ID"
have_all() { for b in "${BINS[@]}"; do [[ -x $OUT/$b ]] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi
WORK="$CACHE/k8s-src"
mkdir -p "$WORK" "$OUT"
cd "$WORK"
if ! ls -d kubernetes-*/ >/dev/null 2>&1; then
  echo "netctl: fetching Debian source kubernetes $VERSION" >&2
  apt-get source -qq kubernetes >&2
fi
TREE=$(ls -d "$WORK"/kubernetes-*/ | head -1)
cd "$TREE"
for p in "${PATCHES[@]}"; do
  if patch -p1 -R --dry-run -s -f < "$p" >/dev/null 2>&1; then continue; fi  # already applied
  echo "netctl: applying $(basename "$p")" >&2
  patch -p1 --forward -s < "$p" >&2
done
for b in "${BINS[@]}"; do
  [[ -x $OUT/$b ]] && continue
  echo "netctl: building $b (several minutes on 2 cores)" >&2
  make WHAT="cmd/$b" >&2
  cp "_output/bin/$b" "$OUT/$b.tmp" && mv "$OUT/$b.tmp" "$OUT/$b"
done
echo "$OUT"
