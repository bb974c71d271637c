#!/usr/bin/env bash
# promtool (Prometheus's rule checker), for the tests that validate deploy/prometheus: taken out of
# Debian's `prometheus` package into DEST (default .venv/bin) without installing the server.
# Optional: those tests skip, saying why, without it.
set -eu
dest="${1:-.venv/bin}"
if [ -x "$dest/promtool" ] || command -v promtool >/dev/null 2>&1; then exit 0; fi
command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: install promtool yourself" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -qq prometheus 2>/dev/null) || { apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus); }
dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
install -m 0755 "$tmp/usr/bin/promtool" "$dest/promtool"
