#!/usr/bin/env bash
# The served model and the server's limits: ./model_info.sh
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$GRPCURL" "${FLAGS[@]}" -d '{}' "$TARGET" "$SERVICE/GetModelInfo"
