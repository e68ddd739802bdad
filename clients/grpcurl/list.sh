#!/usr/bin/env bash
# List the services the server exposes (server reflection), or the methods of one: ./list.sh [SERVICE]
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$GRPCURL" "${FLAGS[@]}" "$TARGET" list "$@"
