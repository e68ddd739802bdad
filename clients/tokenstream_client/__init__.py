"""tokenstream_client: Python SDK and CLI for tokenstream.v1.GenerationService.

    from tokenstream_client import Client

    with Client("127.0.0.1:50051") as client:
        for delta in client.generate("Hello", max_new_tokens=32):
            print(delta.text, end="", flush=True)
        result = client.generate_text("Hello", max_new_tokens=32)
        print(result.finish_reason, result.usage)

AsyncClient is the same over grpc.aio.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tokenstream_client.aio import AsyncClient, AsyncGenerateStream
from tokenstream_client.channel import KEEPALIVE_OPTIONS, ROUND_ROBIN_SERVICE_CONFIG, TLSConfig
from tokenstream_client.client import Client, GenerateStream
from tokenstream_client.errors import FieldViolation, TokenstreamError
from tokenstream_client.messages import (
    Delta,
    FinishReason,
    GenerationResult,
    ModelInfo,
    Timings,
    Token,
    TokenizeResult,
    TopToken,
    Usage,
)
from tokenstream_client.request import GenerateParams, build_generate_request
from tokenstream_client.retry import RetryPolicy

__all__ = [
    "KEEPALIVE_OPTIONS",
    "ROUND_ROBIN_SERVICE_CONFIG",
    "AsyncClient",
    "AsyncGenerateStream",
    "Client",
    "Delta",
    "FieldViolation",
    "FinishReason",
    "GenerateParams",
    "GenerateStream",
    "GenerationResult",
    "ModelInfo",
    "RetryPolicy",
    "TLSConfig",
    "Timings",
    "Token",
    "TokenizeResult",
    "TokenstreamError",
    "TopToken",
    "Usage",
    "__version__",
    "build_generate_request",
]
