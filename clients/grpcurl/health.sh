#!/usr/bin/env bash
# grpc.health.v1 check: ./health.sh [SERVICE]  (empty: the server as a whole). Prints {"status": "SERVING"} when ready;
# NOT_SERVING while the model loads or the server drains.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$GRPCURL" "${FLAGS[@]}" -d "{\"service\": $(json_string "${1:-}")}" "$TARGET" grpc.health.v1.Health/Check
