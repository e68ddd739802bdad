"""TLS and mutual TLS from the SDK and the CLI, against the fake server with throwaway certificates."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tokenstream_fakes import FakeServer

from tokenstream_client import Client, RetryPolicy, TLSConfig, TokenstreamError
from tokenstream_client.cli import main

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is needed to make test certificates")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([str(OPENSSL), *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def issue(name: str, ca: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tokenstream-test-ca", cwd=d)
    issue("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth", d)
    issue("client", "ca", "extendedKeyUsage=clientAuth", d)
    return d


@pytest.fixture(scope="module")
def mtls_server(certs: Path) -> Iterator[FakeServer]:
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True,
    )
    server = FakeServer(credentials)
    yield server
    server.close()


def test_mutual_tls(mtls_server: FakeServer, certs: Path) -> None:
    tls = TLSConfig.from_files(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    with Client(mtls_server.target, tls=tls, timeout=10) as client:
        assert client.generate_text("x").text == "t0 t1 t2 "


def test_server_name_override(mtls_server: FakeServer, certs: Path) -> None:
    tls = TLSConfig.from_files(certs / "ca.pem", certs / "client.pem", certs / "client.key", server_name="localhost")
    with Client(f"localhost:{mtls_server.port}", tls=tls, timeout=10) as client:
        assert client.tokenize("x").ids == (1, 2)


def test_without_a_client_certificate_the_handshake_fails(mtls_server: FakeServer, certs: Path) -> None:
    tls = TLSConfig.from_files(certs / "ca.pem")
    with Client(mtls_server.target, tls=tls, timeout=10, retry=RetryPolicy.disabled()) as client, \
            pytest.raises(TokenstreamError) as info:
        client.generate_text("x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_cli_with_tls_options(mtls_server: FakeServer, certs: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(["generate", "x", "--target", mtls_server.target, "--tls-ca", str(certs / "ca.pem"),
                 "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key"), "--timeout", "10"],
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert out.getvalue() == "t0 t1 t2 "
