#!/usr/bin/env bash
# `make image`: build the Veil enclave image from Debian's packages and the lock files, with podman.
#
#   deploy/image/build.sh [--check] [--tag NAME]
#
# Inputs, and nothing else (the build itself runs with --network=none):
#   * SOURCE_DATE_EPOCH   default: the commit time of HEAD. Every timestamp in both base images,
#                         every layer and the image config is this value.
#   * the Debian archive  DEBIAN_SUITE (bookworm: its python3 is 3.11, the lock's Python) from
#                         DEBIAN_MIRROR (default deb.debian.org). A moving mirror is the one input
#                         that changes over time: pin it with a snapshot URL, e.g.
#                         DEBIAN_MIRROR=http://snapshot.debian.org/archive/debian/20261201T000000Z
#                         build/image/*.packages lists the exact package versions that went in.
#   * the lock files      requirements/enclave.txt, requirements/model.txt, deploy/image/torch-cpu.txt:
#                         every wheel is fetched by pip with --require-hashes and installed again
#                         with --require-hashes inside the build.
#   * the source tree     `git archive HEAD` (committed files only; uncommitted edits are not built).
#   * the tools           podman/buildah and mmdebstrap versions (written to build/image/inputs.json).
#
# --check builds the image a second time from scratch (no layer cache, fresh base images) and
# compares the image ids (config digests) and manifest digests of the two builds.
# Output: build/image/image.json (tag, image id, manifest digest, inputs).
set -euo pipefail
cd "$(dirname "$0")/../.."

CHECK=0
TAG="${IMAGE_TAG:-localhost/veil:$(git describe --always --dirty)}"
while [ $# -gt 0 ]; do
  case "$1" in
    --check) CHECK=1 ;;
    --tag) TAG="$2"; shift ;;
    *) echo "usage: $0 [--check] [--tag NAME]" >&2; exit 2 ;;
  esac
  shift
done

for tool in podman buildah mmdebstrap git; do
  command -v "$tool" >/dev/null || { echo "make image: $tool is not installed (apt-get install podman buildah mmdebstrap)" >&2; exit 3; }
done

COMMIT=$(git rev-parse HEAD)  # read once: the archive and image.json name the same commit
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct "$COMMIT")}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-.venv/bin/python}"
OUT=build/image
CTX="$OUT/context"
rm -rf "$CTX" && mkdir -p "$CTX/requirements" "$CTX/wheels" "$CTX/src"

# Packages of each base. The builder has the compiler for Veil's CPU kernels; the runtime has
# Python only (python3-minimal's libraries, no pip, no compiler).
BUILDER_PACKAGES=python3,python3-venv,python3-dev,g++,ca-certificates
RUNTIME_PACKAGES=python3

base_image() {  # NAME PACKAGES -> prints name@sha256:digest
  local name="$1" packages="$2" tar="$OUT/$1.tar"
  # mmdebstrap honours SOURCE_DATE_EPOCH: the same archive state gives the same tarball.
  mmdebstrap --quiet --variant=minbase --include="$packages" --format=tar \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package}=\${Version}\n" > "$1/.packages"' \
    --customize-hook="copy-out /.packages $OUT/" --customize-hook='rm "$1/.packages"' \
    "$SUITE" "$tar" "$MIRROR" >&2
  mv "$OUT/.packages" "$OUT/$name.packages"
  # A base image is the tarball as one layer, committed with every timestamp pinned.
  local ctr
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$tar" / >/dev/null
  buildah config --created-by "mmdebstrap $SUITE: $packages" --env PATH=/usr/bin:/bin "$ctr"
  buildah commit --quiet --timestamp "$SOURCE_DATE_EPOCH" --rm "$ctr" "localhost/veil-base-$name:$SUITE" >/dev/null
  local digest
  digest=$(podman image inspect --format '{{.Digest}}' "localhost/veil-base-$name:$SUITE")
  echo "localhost/veil-base-$name@$digest"
}

echo "== wheels (hash-checked against the lock files)" >&2
cp requirements/enclave.txt requirements/model.txt "$CTX/requirements/"
cp deploy/image/torch-cpu.txt "$CTX/requirements/torch.txt"
for lock in enclave.txt model.txt torch.txt; do
  # This venv's Python is the lock's target (CPython 3.11, x86_64 Linux): pip picks its wheels.
  "$PY" -m pip download --quiet --require-hashes --no-deps --only-binary :all: \
    -d "$CTX/wheels" -r "$CTX/requirements/$lock" 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
done
"$PY" - "$CTX" <<'EOF'
import hashlib, pathlib, re, sys
ctx = pathlib.Path(sys.argv[1])
wanted = {}
for lock in (ctx / "requirements").glob("*.txt"):
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        name = re.match(r"([A-Za-z0-9_.\-]+)==", block)
        if name:
            wanted[name.group(1).lower().replace("_", "-").replace(".", "-")] = set(re.findall(r"sha256:([0-9a-f]{64})", block))
have = {}
for wheel in (ctx / "wheels").glob("*.whl"):
    key = wheel.name.split("-")[0].lower().replace("_", "-").replace(".", "-")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest not in wanted.get(key, ()):
        sys.exit(f"make image: {wheel.name} has sha256 {digest}, not a hash its lock file names")
    have[key] = wheel.name
missing = sorted(set(wanted) - set(have))
if missing:
    sys.exit(f"make image: no wheel fetched for {', '.join(missing)}")
print(f"{len(have)} wheels, each matching its lock file's hash", file=sys.stderr)
EOF

echo "== source (git archive of $COMMIT)" >&2
git diff --quiet HEAD -- . ':!build' || echo "note: uncommitted changes are NOT in the image (it builds HEAD)" >&2
git archive --format=tar "$COMMIT" | tar -x -C "$CTX/src"

build_once() {  # -> sets IMAGE_ID DIGEST
  echo "== base images (mmdebstrap $SUITE, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)" >&2
  BUILDER_BASE=$(base_image builder "$BUILDER_PACKAGES")
  RUNTIME_BASE=$(base_image runtime "$RUNTIME_PACKAGES")
  for ref in "$BUILDER_BASE" "$RUNTIME_BASE"; do
    case "$ref" in *@sha256:????????????????????????????????????????????????????????????????) ;;
      *) echo "make image: base image $ref is not pinned by digest" >&2; exit 1 ;; esac
  done
  # OCI isolation with no network where a container runtime works; where it cannot (crun refuses
  # cgroups v1/v2 hybrid hosts, as in some CI sandboxes) chroot isolation, which buildah allows
  # only with the host network: the build still installs with PIP_NO_INDEX from the context only.
  local isolation=(--isolation=oci --network=none)
  if ! podman run --rm --network=none --pull=never "$RUNTIME_BASE" /bin/true 2>/dev/null; then
    echo "note: containers cannot run here; building with --isolation=chroot --network=host" >&2
    isolation=(--isolation=chroot --network=host)
  fi
  echo "== image (podman build ${isolation[*]} --no-cache)" >&2
  podman build --quiet --no-cache "${isolation[@]}" --pull=never --timestamp "$SOURCE_DATE_EPOCH" \
    --build-arg "BUILDER_BASE=$BUILDER_BASE" --build-arg "RUNTIME_BASE=$RUNTIME_BASE" \
    --build-arg "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH" \
    -f deploy/image/Containerfile -t "$TAG" "$OUT" >&2
  IMAGE_ID=$(podman image inspect --format '{{.Id}}' "$TAG")
  DIGEST=$(podman image inspect --format '{{.Digest}}' "$TAG")
}

build_once
FIRST_ID=$IMAGE_ID FIRST_DIGEST=$DIGEST
if [ "$CHECK" = 1 ]; then
  echo "== second build, to compare" >&2
  podman rmi --force "$TAG" "localhost/veil-base-builder:$SUITE" "localhost/veil-base-runtime:$SUITE" >/dev/null
  build_once
  echo "first build:  id sha256:$FIRST_ID digest $FIRST_DIGEST" >&2
  echo "second build: id sha256:$IMAGE_ID digest $DIGEST" >&2
fi

"$PY" - "$OUT" <<EOF
import json, sys
doc = {
    "tag": "$TAG",
    "image_id": "sha256:$IMAGE_ID",
    "digest": "$DIGEST",
    "reproduced": None if $CHECK == 0 else ("$FIRST_ID" == "$IMAGE_ID" and "$FIRST_DIGEST" == "$DIGEST"),
    "inputs": {
        "source_commit": "$COMMIT",
        "source_date_epoch": int("$SOURCE_DATE_EPOCH"),
        "debian": {"suite": "$SUITE", "mirror": "$MIRROR"},
        "builder_base": "$BUILDER_BASE",
        "runtime_base": "$RUNTIME_BASE",
        "tools": {"podman": "$(podman --version)", "buildah": "$(buildah --version)", "mmdebstrap": "$(mmdebstrap --version)"},
    },
}
open(sys.argv[1] + "/image.json", "w").write(json.dumps(doc, indent=2) + "\n")
print(json.dumps(doc, indent=2))
EOF
if [ "$CHECK" = 1 ] && [ "$FIRST_ID" != "$IMAGE_ID" ]; then
  echo "make image: the two builds differ (see above)" >&2
  exit 1
fi
