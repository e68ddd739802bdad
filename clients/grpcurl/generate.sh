#!/usr/bin/env bash
# Stream a completion: one JSON object per GenerateResponse; the last carries finish_reason, usage and timings.
#   ./generate.sh "Once upon a time" [MAX_NEW_TOKENS]
#   ./generate.sh - < body.json      # any GenerateRequest as JSON, e.g.
#     {"prompt": "Hi", "sampling": {"temperature": 0.8, "seed": 7}, "stopping": {"max_new_tokens": 64, "stop_sequences": ["\n\n"]}}
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [[ "${1:-}" == "-" ]]; then
  exec "$GRPCURL" "${FLAGS[@]}" -d @ "$TARGET" "$SERVICE/Generate"
fi
prompt="${1:-Once upon a time}"
max_new_tokens="${2:-32}"
body="{\"prompt\": $(json_string "$prompt"), \"stopping\": {\"max_new_tokens\": ${max_new_tokens}}}"
exec "$GRPCURL" "${FLAGS[@]}" -d "$body" "$TARGET" "$SERVICE/Generate"
