"""The OpenAI-compatible HTTP/SSE front and its chat page: a second translator onto service/generation.py."""
