#!/usr/bin/env bash
# Build the CPU container image here, with rootful podman, where no container registry is reachable.
#
#   scripts/image.sh setup         install podman & co. (apt, root only) and write a containers.conf; prints its path
#   scripts/image.sh base          build the stand-in for the Dockerfile's Python base image (cached by recipe)
#   scripts/image.sh build [TAG]   setup + base + `podman build` of the default target (TAG: tokenstream:dev)
#
# Why each workaround exists:
# - crun refuses this VM's hybrid cgroups and the VM cannot raise rlimits: containers.conf selects runc and keeps
#   default_ulimits within the hard limits.
# - python:3.11-slim-bookworm cannot be pulled: a Debian bookworm minbase with Debian's python3.11 is imported
#   under that exact name, labelled as a stand-in. Its Python is /usr/bin/python, not /usr/local/bin/python.
# - pip inside RUN steps needs this machine's CA bundle (see pip_build_args): bind-mounted read-only for the build
#   only, so none of it lands in the runtime image.
# Environment: PODMAN_STATE (default ~/.cache/tokenstream/podman), PY (a python with pip, to read pip's `cert`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
STATE="${PODMAN_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenstream/podman}"
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
# The name must be the Dockerfile's PYTHON_IMAGE default, fully qualified as podman stores it.
BASE_NAME="docker.io/library/python:3.11-slim-bookworm"
BASE_SUITE=bookworm
BASE_PACKAGES="python3.11,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase,tzdata"
MIRROR=http://deb.debian.org
# As debian:bookworm-slim (which python:*-slim builds on) does: no docs, man pages or translations.
SLIM_EXCLUDES=('/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' '/usr/share/lintian/*')
TOOLS=(podman runc mmdebstrap uidmap slirp4netns fuse-overlayfs containernetworking-plugins catatonit)

log() { echo "image.sh: $*" >&2; }

setup() {
    local missing=()
    for pkg in "${TOOLS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || { log "needs root to install ${missing[*]}"; exit 77; }
        command -v apt-get >/dev/null || { log "needs apt-get to install ${missing[*]}"; exit 77; }
        log "installing ${missing[*]}"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    mkdir -p "$STATE"
    if [[ -z "${CONTAINERS_CONF:-}" ]]; then
        export CONTAINERS_CONF="$STATE/containers.conf"
        local nofile
        nofile="$(ulimit -Hn)"
        cat >"$CONTAINERS_CONF.tmp" <<EOF
# Written by scripts/image.sh: runc (crun refuses hybrid cgroups here), ulimits within this VM's hard limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
        mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
    fi
}

base() {
    # The recipe is the image's identity: a changed package list or suite rebuilds it.
    local recipe have tar old
    exec 9>"$STATE/base.lock"
    flock 9  # one stand-in build at a time; a second caller waits, then finds it current
    recipe="$(printf '%s|' "$BASE_SUITE" "$BASE_PACKAGES" "$MIRROR" "${SLIM_EXCLUDES[@]}" | sha256sum | cut -c1-16)"
    have="$(podman image inspect --format '{{index .Config.Labels "org.tokenstream.standin.recipe"}}' \
            "$BASE_NAME" 2>/dev/null || true)"
    if [[ "$have" == "$recipe" ]]; then
        log "stand-in base $BASE_NAME is current (recipe $recipe)"
        return
    fi
    if [[ -n "$(podman image ls -q "$BASE_NAME" 2>/dev/null)" && -z "$have" ]]; then
        log "$BASE_NAME exists and is not a stand-in: using it as it is"
        return
    fi
    old="$(podman image ls -q "$BASE_NAME" 2>/dev/null || true)"
    log "building stand-in base $BASE_NAME (mmdebstrap $BASE_SUITE minbase + $BASE_PACKAGES)"
    tar="$STATE/standin-$recipe.tar"
    local -a dpkgopts=()
    for pattern in "${SLIM_EXCLUDES[@]}"; do dpkgopts+=(--dpkgopt="path-exclude=$pattern"); done
    dpkgopts+=(--dpkgopt="path-include=/usr/share/doc/*/copyright")
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" "${dpkgopts[@]}" "$BASE_SUITE" "$tar" \
        "deb $MIRROR/debian $BASE_SUITE main" \
        "deb $MIRROR/debian $BASE_SUITE-updates main" \
        "deb $MIRROR/debian-security $BASE_SUITE-security main" >&2
    # PATH as the official image has it: a base without ENV PATH would leave `ENV PATH=/opt/venv/bin:$PATH` bare.
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --change "LABEL org.tokenstream.standin.recipe=$recipe" \
        --change "LABEL org.tokenstream.standin=\"STAND-IN for $BASE_NAME: Debian $BASE_SUITE minbase with Debian's python3.11 at /usr/bin, built by scripts/image.sh; not the official image\"" \
        --message "stand-in for $BASE_NAME (scripts/image.sh)" \
        "$tar" "$BASE_NAME" >&2
    rm -f "$tar"
    # The previous stand-in, now untagged; kept if an image still builds on it.
    [[ -n "$old" ]] && podman rmi "$old" >/dev/null 2>&1 || true
}

# This machine reaches PyPI through a TLS proxy whose CA only the host's bundle has. The build gets that bundle
# read-only over the base image's own (a path the base has: a mount onto a missing path leaves an empty mount point
# in every stage with a RUN step, the runtime stage included), and PIP_CERT naming it as a builder-stage ARG, so
# nothing lands in the runtime image. The local mirrors `pip config list` names are not needed: all is on PyPI.
BASE_CA=/etc/ssl/certs/ca-certificates.crt
pip_build_args() {
    local cert="${PIP_CERT:-}"
    [[ -n "$cert" ]] || cert="$("$PY" -m pip config get global.cert 2>/dev/null || true)"
    [[ -n "$cert" ]] || cert="${SSL_CERT_FILE:-}"
    [[ -n "$cert" && -f "$cert" ]] || return 0
    printf -- '-v\n%s:%s:ro\n--build-arg\nPIP_CERT=%s\n' "$cert" "$BASE_CA" "$BASE_CA"
}

build() {
    local tag="${1:-tokenstream:dev}" start end old
    local -a extra
    old="$(podman image ls -q "$tag" 2>/dev/null || true)"
    mapfile -t extra < <(pip_build_args)
    start="$(date +%s%N)"
    # docker format keeps HEALTHCHECK (OCI image configs have no field for it); --pull=never: nothing to pull from.
    podman build --format docker --pull=never --network host "${extra[@]}" --target cpu -t "$tag" . >&2
    end="$(date +%s%N)"
    # The image this build replaced, now untagged (kept while a container uses it).
    [[ -n "$old" && "$old" != "$(podman image ls -q "$tag")" ]] && podman rmi "$old" >/dev/null 2>&1 || true
    log "built $tag in $(((end - start) / 1000000000)).$((((end - start) / 100000000) % 10)) s"
}

cmd="${1:-build}"
shift || true
case "$cmd" in
    setup) setup; echo "$CONTAINERS_CONF" ;;
    base) setup; base ;;
    build) setup; base; build "$@" ;;
    *) echo "usage: $0 setup|base|build [TAG]" >&2; exit 2 ;;
esac
