"""A real OpenAI-compatible chat endpoint on 127.0.0.1 for tests: a `reply(payload) -> (status, text)`
function decides each answer; every request is kept (`requests`, `auth`) so tests can count them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[dict[str, Any]], tuple[int, str]]


def chat_body(text: str) -> str:
    """The JSON body of a chat completion whose one choice says `text`."""
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


class ChatServer:
    """`POST .../chat/completions` answered by `reply`; `url` is the base URL (…/v1)."""

    def __init__(self, reply: Reply):
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                outer.auth.append(self.headers.get("Authorization"))
                code, text = reply(payload)
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
