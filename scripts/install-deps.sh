#!/usr/bin/env bash
# Installs the Debian 12 packages dartquant builds against. Idempotent; quiet when all are present.
set -euo pipefail
pkgs=(g++ cmake ninja-build pkg-config libopenblas-dev liblapacke-dev nlohmann-json3-dev
      libpcre2-dev libcli11-dev libgtest-dev libgmock-dev libbenchmark-dev
      clang-14 libclang-rt-14-dev libomp-14-dev)  # clang: scripts/fuzz.sh (libFuzzer is in libclang-rt)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
