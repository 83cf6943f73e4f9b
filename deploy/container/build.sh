#!/usr/bin/env bash
# Builds berth's container image without pulling any base image:
#   1. cargo builds a statically linked berth (glibc, +crt-static, profile `container`);
#   2. a build context is staged under target/container/context;
#   3. podman (or buildah, or docker: $BERTH_BUILDER) builds deploy/container/Containerfile.
#
# Usage: bash deploy/container/build.sh            (tags berth:<version> and berth:latest)
# Environment: BERTH_IMAGE (tag to build, default berth:<version>), BERTH_BUILDER
# (podman | buildah | docker, default podman), CARGO (default cargo).
set -euo pipefail
cd "$(dirname "$0")/../.."

target=x86_64-unknown-linux-gnu
case "$(uname -m)" in
  x86_64) ;;
  aarch64) target=aarch64-unknown-linux-gnu ;;
  *) echo "build.sh: unsupported architecture $(uname -m)" >&2; exit 1 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
image=${BERTH_IMAGE:-berth:$version}
builder=${BERTH_BUILDER:-podman}
target_dir=target/container

# A static binary: no glibc NSS needed at run time (berth resolves names itself) and the web PKI
# roots are compiled in. Its own target dir keeps these flags from invalidating the debug build.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  "${CARGO:-cargo}" build --locked --profile container --target "$target" \
  --target-dir "$target_dir" --bin berth
binary=$target_dir/$target/container/berth
if ldd "$binary" 2>/dev/null | grep -q '=>'; then
  echo "build.sh: $binary is dynamically linked" >&2
  exit 1
fi

ctx=$target_dir/context
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/berth" "$ctx/cache"
install -m 0755 "$binary" "$ctx/rootfs/usr/local/bin/berth"
install -m 0644 deploy/container/berth.toml "$ctx/rootfs/etc/berth/berth.toml"
printf 'root:x:0:0:root:/:/sbin/nologin\nberth:x:65532:65532:berth:/var/cache/berth:/sbin/nologin\n' \
  > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nberth:x:65532:\n' > "$ctx/rootfs/etc/group"
chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group"
chmod 0750 "$ctx/cache"

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=${BERTH_SOURCE_URL:-$(git config --get remote.origin.url 2>/dev/null || echo unknown)}
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision"
  --build-arg "SOURCE=$source_url" --build-arg "CREATED=$created")
case "$builder" in
  buildah) buildah bud -f deploy/container/Containerfile "${args[@]}" -t "$image" "$ctx" ;;
  *) "$builder" build -f deploy/container/Containerfile "${args[@]}" -t "$image" "$ctx" ;;
esac
echo "built $image"
