#!/usr/bin/env bash
# Token ids, strings and character offsets of a text: ./tokenize.sh "Hello, world"
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
body="{\"text\": $(json_string "${1:-Hello, world}"), \"return_tokens\": true, \"return_offsets\": true}"
exec "$GRPCURL" "${FLAGS[@]}" -d "$body" "$TARGET" "$SERVICE/Tokenize"
