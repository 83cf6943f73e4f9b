# Shared by run.sh and instructions.sh (sourced): loopback ports, pushing blobs to the origin,
# the small OCI image the hot manifest scenarios ask for. The caller defines `die MESSAGE` and
# sets ORIGIN (the registry's base URL) and REPO before pushing.

USED_PORTS=" "
# Ports come from below the kernel's ephemeral range, so that no outgoing connection (of ours or
# anyone's) can be holding the port as its local end when a server binds it.
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
if ((EPHEMERAL_LOW > 12000)); then PORT_LO=10000 PORT_N=$((EPHEMERAL_LOW - 10000)); else PORT_LO=20000 PORT_N=40000; fi
# free_port VAR: a free loopback TCP port (not handed out before in this run) into VAR
free_port() {
  local p
  for _ in $(seq 500); do
    p=$((PORT_LO + (RANDOM * 32768 + RANDOM) % PORT_N))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if command -v ss >/dev/null 2>&1 && [[ -n $(ss -Htan "( sport = :$p )" 2>/dev/null) ]]; then
      continue
    fi
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS+="$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port found"
}

# push_file FILE -> digest (hex): monolithic upload, streamed with -T
push_file() {
  local file=$1 dg loc
  dg=$(sha256sum "$file" | cut -d' ' -f1)
  loc=$(curl -fsS -D - -o /dev/null -X POST "$ORIGIN/v2/$REPO/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
  [[ -n $loc ]] || die "no upload Location from the registry"
  [[ $loc == http* ]] || loc=$ORIGIN$loc
  if [[ $loc == *\?* ]]; then loc+="&digest=sha256:$dg"; else loc+="?digest=sha256:$dg"; fi
  curl -fsS -o /dev/null -H 'Expect:' -H 'Content-Type: application/octet-stream' -T "$file" \
    "$loc" || die "blob upload of $file failed"
  echo "$dg"
}

# seed_image DIR: pushes a 4 KiB random layer, its config and an OCI image manifest tagged v1
# to ORIGIN/REPO (files kept in DIR); sets LAYER_DG, CONFIG_DG and MANIFEST_DG (hex)
seed_image() {
  local d=$1
  head -c 4096 /dev/urandom >"$d/layer"
  LAYER_DG=$(push_file "$d/layer")
  printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"config":{}}' \
    "$LAYER_DG" >"$d/config.json"
  CONFIG_DG=$(push_file "$d/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":4096}]}' \
    "$CONFIG_DG" "$(stat -c %s "$d/config.json")" "$LAYER_DG" >"$d/manifest.json"
  MANIFEST_DG=$(sha256sum "$d/manifest.json" | cut -d' ' -f1)
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary @"$d/manifest.json" "$ORIGIN/v2/$REPO/manifests/v1" ||
    die "manifest push failed"
}
