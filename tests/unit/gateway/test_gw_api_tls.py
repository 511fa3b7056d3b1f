"""The API over HTTPS: tokens never cross the network in clear when a certificate is set."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from gw_testkit import make_env

from gateway.api import Api, ApiTlsError, tls_context
from gateway.config import ApiToken
from siteca.pki import create_ca, issue_server_cert, write_cert, write_private_key

TOKEN = "operator-token-0123456789"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A site CA's server certificate for localhost (the CA file doubles as the trust)."""
    ca = create_ca("test-site")
    key, cert = issue_server_cert(ca, ["localhost"])
    cert_file, key_file, ca_file = folder / "api.crt", folder / "api.key", folder / "ca.crt"
    write_cert(cert_file, cert)
    write_private_key(key_file, key)
    write_cert(ca_file, ca.cert)
    return cert_file, key_file


async def test_the_api_speaks_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    env = await make_env()
    api = Api(
        env.store, env.registry, env.downlink, env.metrics, [ApiToken(name="ops", token=TOKEN)]
    )
    server = asyncio.create_task(api.serve("127.0.0.1", 0, tls_context(cert_file, key_file)))
    try:
        async with asyncio.timeout(10):
            while api.port is None:
                await asyncio.sleep(0.01)
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        async with aiohttp.ClientSession() as http:
            url = f"https://localhost:{api.port}/devices"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(url, headers=headers, ssl=trust) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://localhost:{api.port}/devices", headers=headers):
                    pass
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


def test_an_unusable_certificate_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ApiTlsError, match=r"api\.cert_file .*missing\.crt.*Fix: point both"):
        tls_context(tmp_path / "missing.crt", tmp_path / "missing.key")
    cert_file, _ = self_signed(tmp_path)
    with pytest.raises(ApiTlsError, match="cannot load them"):
        tls_context(cert_file, cert_file)  # a certificate where the key should be
