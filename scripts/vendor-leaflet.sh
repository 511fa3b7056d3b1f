#!/usr/bin/env bash
# Build step for the console's map: fetches Leaflet from npm and copies its built files,
# with its licence, into console/static/vendor/ (committed, so the page works offline and
# a console host needs no npm). Also ships Seoul's district outlines, the map's fallback
# layer where no tile server is reachable, with their attribution. Run it to upgrade.
set -euo pipefail
LEAFLET_VERSION="${LEAFLET_VERSION:-1.9.4}"
root="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$root/console/static/vendor"
data="${SEOUL_DATA:-$root/../shared/data}"
[ -f "$data/seoul-districts.geojson" ] || data=/work/shared/data
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
(cd "$build" && npm install --silent --no-audit --no-fund "leaflet@$LEAFLET_VERSION" >/dev/null)
dist="$build/node_modules/leaflet/dist"
rm -rf "$vendor/leaflet"
mkdir -p "$vendor/leaflet/images" "$vendor/seoul"
cp "$dist/leaflet.js" "$dist/leaflet.css" "$vendor/leaflet/"
cp "$dist"/images/*.png "$vendor/leaflet/images/"
cp "$build/node_modules/leaflet/LICENSE" "$vendor/leaflet/LICENSE"
echo "leaflet $LEAFLET_VERSION from npm (BSD-2-Clause, see LICENSE)" > "$vendor/leaflet/VERSION"
cp "$data/seoul-districts.geojson" "$vendor/seoul/districts.geojson"
cp "$data/README.md" "$vendor/seoul/ATTRIBUTION.md"
echo "vendored leaflet $LEAFLET_VERSION and Seoul's district outlines into $vendor"
