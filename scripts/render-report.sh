#!/usr/bin/env bash
# Renders a dartquant HTML report to PNG with headless Chromium, so a report can be looked at (or
# committed) as an image. Usage: scripts/render-report.sh REPORT.html OUT.png [WIDTH HEIGHT]
# Installs Debian's `chromium` package when it is missing (needs root); uses pngquant when present.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH HEIGHT]" >&2
  exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "$2")
width=${3:-1200}
height=${4:-2400}
[ -f "$html" ] || { echo "$0: $html: no such file" >&2; exit 1; }

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "$0: installing chromium" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
  browser=$(command -v chromium)
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# Every network-touching feature is off: the report is self-contained and must render offline.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" --screenshot="$out" \
  --window-size="$width,$height" "file://$html" 2>/dev/null
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
# A palette PNG is a third of the size and looks the same for flat charts (images under docs/).
if command -v pngquant >/dev/null; then
  pngquant --quality 70-95 --speed 1 --strip --force --output "$out" "$out" || true
fi
echo "wrote $out"
