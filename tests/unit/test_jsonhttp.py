"""The command-line tools' one JSON-over-HTTP client, against a loopback server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ansimi.broker import free_port
from ansimi.jsonhttp import Unreachable, request_json


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(201, json.dumps({"echo": sent, "auth": self.headers["Authorization"]}))

    def do_GET(self) -> None:
        if self.path == "/refused":
            self._answer(403, json.dumps({"error": "not yours", "reason": "district"}))
        else:  # a proxy's page, not the gateway's JSON
            self._answer(502, "<html>Bad Gateway</html>", "text/html")

    def _answer(self, status: int, text: str, kind: str = "application/json") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_json_body_goes_and_comes_back(base_url: str) -> None:
    answer = request_json(
        "POST", f"{base_url}/x", {"a": 1}, headers={"Authorization": "Bearer t"}, timeout_s=5
    )
    assert answer.status == 201
    assert answer.body == {"echo": {"a": 1}, "auth": "Bearer t"}


def test_an_error_status_is_an_answer_and_a_page_that_is_not_json_says_what_it_was(
    base_url: str,
) -> None:
    refused = request_json("GET", f"{base_url}/refused", timeout_s=5)
    assert (refused.status, refused.body["reason"]) == (403, "district")
    page = request_json("GET", f"{base_url}/page", timeout_s=5)
    assert page.status == 502 and "Bad Gateway" in page.body["error"]


def test_nobody_listening_is_unreachable_not_untrusted() -> None:
    with pytest.raises(Unreachable) as caught:
        request_json("GET", f"http://127.0.0.1:{free_port()}/healthz", timeout_s=5)
    assert not caught.value.untrusted and "refused" in caught.value.reason.lower()
    assert "nothing listens on that port" in caught.value.fix


def test_https_to_a_plain_http_server_says_the_port_does_not_speak_https(base_url: str) -> None:
    # issue 19: a wrong gateway URL gets the fix for its own mistake
    with pytest.raises(Unreachable) as caught:
        request_json("GET", base_url.replace("http://", "https://") + "/healthz", timeout_s=5)
    assert "does not speak HTTPS" in caught.value.fix


def test_a_host_name_that_does_not_resolve_says_so() -> None:
    # .invalid never resolves (RFC 6761)
    with pytest.raises(Unreachable) as caught:
        request_json("GET", "https://gateway.invalid:8480/healthz", timeout_s=5)
    assert "does not resolve" in caught.value.fix
