#!/usr/bin/env bash
# Installs the system libraries Legato needs when they are missing: libopus for opuslib, and for
# `make test` Chromium (a real browser WebRTC stack checks the sandbox's `webrtc` side), and for
# `make bench` ffmpeg (the peer, discord.py's FFmpegPCMAudio, runs it) and gcc (the C floor).
set -euo pipefail
want=(libopus0)
case "${1:-}" in
    test) want+=(chromium) ;;
    bench) want+=(ffmpeg gcc libopus-dev) ;;
esac
missing=()
for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "Installing system packages: ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "Legato needs these system packages: ${missing[*]}" >&2
    echo "Install them with: sudo apt-get install ${missing[*]}  (or your system's equivalent)" >&2
    exit 1
fi
