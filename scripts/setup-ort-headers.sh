#!/usr/bin/env bash
# ONNX Runtime's C API header (onnxruntime_c_api.h) for compiling the README's C snippet
# (python/tests/test_readme_c.py). No package of the registries this project installs from ships it
# for Debian 12 or in the onnxruntime wheel; Debian 13's libonnxruntime-dev (ONNX Runtime 1.21, in
# the range this project supports) does. Its .deb is downloaded with apt through a private apt
# configuration (the machine's sources and package state are left as they are) and unpacked,
# not installed, into .ort-headers/. Idempotent: prints the include folder, and only that when
# it is already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.ort-headers"
want="libonnxruntime-dev 1.21.0+dfsg-1 (Debian 13)"
if [ -f "$out/.pins" ] && [ "$(cat "$out/.pins")" = "$want" ] && [ -f "$out/include/onnxruntime_c_api.h" ]; then
  echo "$out/include"
  exit 0
fi
echo "setting up $out: $want" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/etc/sources.list.d" "$work/etc/preferences.d" "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/etc/sources.list.d/debian13.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apt=(
  -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
  -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root
)
apt-get "${apt[@]}" -qq update >&2
# the pinned version; a later Debian 13 update of it if the archive has moved on (said on stderr)
cd "$work"
if ! apt-get "${apt[@]}" -qq download "libonnxruntime-dev=1.21.0+dfsg-1" >&2 2>/dev/null; then
  echo "libonnxruntime-dev 1.21.0+dfsg-1 is no longer in Debian 13; taking its current version" >&2
  apt-get "${apt[@]}" -qq download libonnxruntime-dev >&2
fi
dpkg-deb -x libonnxruntime-dev_*.deb unpacked
rm -rf "$out"
mkdir -p "$out"
cp -r unpacked/usr/include/onnxruntime "$out/include"
dpkg-deb -f libonnxruntime-dev_*.deb Package Version > "$out/package"
echo "$want" > "$out/.pins"
echo "$out/include"
