#!/usr/bin/env bash
# Describe a service, method or message from server reflection: ./describe.sh [SYMBOL]
#   ./describe.sh                                   # the GenerationService and its methods
#   ./describe.sh tokenstream.v1.GenerateRequest    # a message, with its fields
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$GRPCURL" "${FLAGS[@]}" "$TARGET" describe "${1:-$SERVICE}"
