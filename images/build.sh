#!/usr/bin/env bash
# Builds the project image from the repository:  images/build.sh [cpu|gpu] [--force]
#   cpu (default): images/Dockerfile -> leadre:cpu; gpu: images/Dockerfile.gpu -> leadre:gpu
# Skips the build when the image's leadre.sources label matches the current sources (--force builds anyway).
# env: BASE_IMAGE (default: the Dockerfile's; for cpu, leadre-base:bookworm, made by build_base.sh when absent),
#      TAG, TORCH_WHEELS (a folder holding a CPU torch wheel, default /opt/wheels when it has one; otherwise
#      pip takes torch from PyTorch's CPU index), CA_BUNDLE (default: pip's or the system's), DOCKER.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=cpu
FORCE=0
for arg in "$@"; do
    case $arg in
        cpu | gpu) VARIANT=$arg ;;
        --force) FORCE=1 ;;
        *) echo "usage: images/build.sh [cpu|gpu] [--force]" >&2; exit 2 ;;
    esac
done
DOCKERFILE=images/Dockerfile
[ "$VARIANT" = cpu ] || DOCKERFILE=images/Dockerfile.gpu
TAG=${TAG:-leadre:$VARIANT}

# Secrets and RUN --mount need BuildKit: a client with the buildx plugin, or one older than 23 (such as Debian
# bookworm's docker.io), whose plain `docker build` drives the engine's built-in BuildKit.
pick_docker() {
    local client major
    for client in ${DOCKER:-docker} /usr/bin/docker; do
        command -v "$client" >/dev/null || continue
        if "$client" buildx version >/dev/null 2>&1; then echo "$client"; return; fi
        major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
        if [[ $major =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then echo "$client"; return; fi
    done
    echo "build.sh: no docker client with BuildKit (install the buildx plugin, or use Debian's docker.io client)" >&2
    return 1
}
DOCKER=$(pick_docker)
"$DOCKER" info >/dev/null 2>&1 || { echo "build.sh: the Docker engine does not answer ($DOCKER info)" >&2; exit 1; }

if [ "$VARIANT" = cpu ] && [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=leadre-base:bookworm
    "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || DOCKER=$DOCKER images/build_base.sh "$BASE_IMAGE"
fi

# The image's sources: what .dockerignore lets into the build context, as git sees it (tracked or new files).
SOURCES=(pyproject.toml README.md leadre components pipelines feature_repo serving images/requirements.py
         images/pip.sh "$DOCKERFILE" .dockerignore)
sources_digest() {
    { echo "$VARIANT ${BASE_IMAGE:-default}"
      git ls-files -co --exclude-standard -- "${SOURCES[@]}" | grep -v -e '__pycache__/' -e '\.pyc$' | sort \
          | while read -r f; do [ ! -f "$f" ] || sha256sum "$f"; done
    } | sha256sum | cut -c1-16
}
DIGEST=$(sources_digest)
if [ "$FORCE" = 0 ] && [ "$("$DOCKER" image inspect --format '{{index .Config.Labels "leadre.sources"}}' "$TAG" \
        2>/dev/null)" = "$DIGEST" ]; then
    echo "$TAG is up to date (sources $DIGEST)"
    exit 0
fi

SECRETS_DIR=$(mktemp -d)
SERVER_PID=
cleanup() { [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true; rm -rf "$SECRETS_DIR"; }
trap cleanup EXIT

# The build's pip configuration. For the CPU image, torch must be a CPU build: a local wheel folder is served
# on loopback for the build only (it reaches it through --network host); otherwise PyTorch's CPU index.
PIP_CONF=$SECRETS_DIR/pip.conf
echo "[global]" >"$PIP_CONF"
[ -z "${PIP_INDEX_URL:-}" ] || echo "index-url = $PIP_INDEX_URL" >>"$PIP_CONF"
[ -z "${PIP_DEFAULT_TIMEOUT:-}" ] || echo "timeout = $PIP_DEFAULT_TIMEOUT" >>"$PIP_CONF"
if [ "$VARIANT" = cpu ]; then
    WHEELS=${TORCH_WHEELS:-/opt/wheels}
    if compgen -G "$WHEELS/torch-*+cpu-*.whl" >/dev/null; then
        PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$PORT" >/dev/null 2>&1 &
        SERVER_PID=$!
        for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
        printf 'find-links = http://127.0.0.1:%s/\ntrusted-host = 127.0.0.1\n' "$PORT" >>"$PIP_CONF"
        echo "torch from $WHEELS (served on 127.0.0.1:$PORT for this build)"
    else
        echo "extra-index-url = https://download.pytorch.org/whl/cpu" >>"$PIP_CONF"
    fi
else
    # tensorrt's libraries (tensorrt-cu13-libs) are PyPI placeholders that fetch the real wheel from NVIDIA's index.
    echo "extra-index-url = https://pypi.nvidia.com" >>"$PIP_CONF"
fi
SECRET_ARGS=(--secret "id=pipconf,src=$PIP_CONF")
CA=${CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
[ ! -f "$CA" ] || SECRET_ARGS+=(--secret "id=cacert,src=$CA")

BUILD_ARGS=()
[ -z "${BASE_IMAGE:-}" ] || BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
OLD_ID=$("$DOCKER" image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
start=$(date +%s)
DOCKER_BUILDKIT=1 "$DOCKER" build --progress plain --network host -f "$DOCKERFILE" "${BUILD_ARGS[@]}" \
    "${SECRET_ARGS[@]}" --label "leadre.sources=$DIGEST" \
    --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" -t "$TAG" .
size=$("$DOCKER" image inspect --format '{{.Size}}' "$TAG")
# The image this one replaces, now untagged (its layers that the new one shares stay).
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$("$DOCKER" image inspect --format '{{.Id}}' "$TAG")" ]; then
    "$DOCKER" rmi "$OLD_ID" >/dev/null 2>&1 || true
fi
echo "$TAG: $(( size / 1000000 )) MB, built in $(( $(date +%s) - start )) s (sources $DIGEST)"
