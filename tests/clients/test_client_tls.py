"""TLS, mutual TLS and the server-name override from the SDK and the CLI, against real servers on the real engine.

The servers' certificate names tokenstream.test only, never the address the tests dial (127.0.0.1, localhost):
a call gets through only where the server-name override is applied.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.certs import certificates, names_in
from tests.support.servers import ServerThread, base_config, started
from tokenstream_client import Client, FinishReason, GenerationResult, RetryPolicy, TLSConfig, TokenstreamError
from tokenstream_client.cli import main

SERVER_NAME = "tokenstream.test"
PROMPT = "Once upon a time"
TOKENS = 6
NAME_MISMATCH = "Hostname Verification Check failed"  # gRPC's words when the certificate does not name the target


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = certificates(tmp_path_factory.mktemp("certs"), server_names=(SERVER_NAME,))
    assert names_in(files["server.crt"]) == {SERVER_NAME}  # neither localhost nor 127.0.0.1
    return files


@pytest.fixture(scope="module")
def tls_server(model_dir: Path, certs: dict[str, Path]) -> Iterator[ServerThread]:
    srv = started(base_config(model_dir, tls_cert=str(certs["server.crt"]), tls_key=str(certs["server.key"])))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def mtls_server(model_dir: Path, certs: dict[str, Path]) -> Iterator[ServerThread]:
    srv = started(base_config(model_dir, tls_cert=str(certs["server.crt"]), tls_key=str(certs["server.key"]),
                              tls_client_ca=str(certs["ca.crt"])))
    yield srv
    srv.close()


def tls(certs: dict[str, Path], *, client_cert: bool = True, server_name: str | None = SERVER_NAME) -> TLSConfig:
    cert, key = (certs["client.crt"], certs["client.key"]) if client_cert else (None, None)
    return TLSConfig.from_files(certs["ca.crt"], cert, key, server_name=server_name)


def generate(target: str, tls: TLSConfig | None) -> GenerationResult | TokenstreamError:
    """The greedy answer to PROMPT, or the error; a refused handshake is not retried."""
    with Client(target, tls=tls, timeout=30, retry=RetryPolicy.disabled()) as client:
        try:
            return client.generate_text(PROMPT, max_new_tokens=TOKENS)
        except TokenstreamError as error:
            return error


def assert_answered(outcome: GenerationResult | TokenstreamError, loaded_model: Any) -> None:
    assert isinstance(outcome, GenerationResult), outcome
    assert outcome.finish_reason is FinishReason.MAX_TOKENS and len(outcome.token_ids) == TOKENS
    assert outcome.text == loaded_model.tokenizer.decode(list(outcome.token_ids))


def assert_refused(outcome: GenerationResult | TokenstreamError, *, name_mismatch: bool) -> None:
    assert isinstance(outcome, TokenstreamError), outcome
    assert outcome.code == grpc.StatusCode.UNAVAILABLE and outcome.attempts == 1
    assert (NAME_MISMATCH in outcome.message) is name_mismatch, outcome.message


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_tls_with_the_servers_ca(tls_server: ServerThread, certs: dict[str, Path], loaded_model: Any) -> None:
    assert_answered(generate(tls_server.target, tls(certs, client_cert=False)), loaded_model)
    assert_refused(generate(tls_server.target, None), name_mismatch=False)  # plaintext to a TLS port


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_server_name_override_is_what_lets_the_call_through(
    tls_server: ServerThread, certs: dict[str, Path], loaded_model: Any, host: str
) -> None:
    target = f"{host}:{tls_server.port}"
    assert_refused(generate(target, tls(certs, client_cert=False, server_name=None)), name_mismatch=True)
    assert_answered(generate(target, tls(certs, client_cert=False)), loaded_model)


def test_mutual_tls(mtls_server: ServerThread, certs: dict[str, Path], loaded_model: Any) -> None:
    assert_answered(generate(mtls_server.target, tls(certs)), loaded_model)
    # The same, less the client certificate: the server refuses the handshake (the name was accepted).
    assert_refused(generate(mtls_server.target, tls(certs, client_cert=False)), name_mismatch=False)
    assert_refused(generate(mtls_server.target, tls(certs, server_name=None)), name_mismatch=True)


def test_cli_with_tls_options(mtls_server: ServerThread, certs: dict[str, Path]) -> None:
    sdk = generate(mtls_server.target, tls(certs))
    assert isinstance(sdk, GenerationResult)
    base = ["generate", PROMPT, "--target", mtls_server.target, "--max-new-tokens", str(TOKENS), "--max-attempts",
            "1", "--timeout", "30", "--tls-ca", str(certs["ca.crt"])]
    client_cert = ["--tls-cert", str(certs["client.crt"]), "--tls-key", str(certs["client.key"])]
    override = ["--tls-server-name", SERVER_NAME]
    assert cli(*base, *client_cert, *override) == (0, sdk.text, "")  # greedy: the SDK's answer
    code, out, err = cli(*base, *client_cert)
    assert (code, out) == (1, "") and err.startswith("error: UNAVAILABLE: ") and NAME_MISMATCH in err
    code, out, err = cli(*base, *override)
    assert (code, out) == (1, "") and err.startswith("error: UNAVAILABLE: ") and NAME_MISMATCH not in err
