"""Loopback stand-ins for what mkat talks to: the Telegram Bot API, a webhook receiver, an SMTP server.

FakeTelegram speaks the Bot API's wire format: POST /bot<TOKEN>/<method> with JSON or form
parameters, {"ok": true, "result": ...} or {"ok": false, "error_code", "description",
"parameters": {"retry_after"}} envelopes, getUpdates long polling that honours `offset`, and
HTML parse mode checked the way Telegram checks it. Tests act as the user with say() and tap().
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

# The tags Telegram's HTML parse mode accepts.
TELEGRAM_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "span",
                 "tg-spoiler", "tg-emoji", "blockquote"}  # fmt: skip


class EntityChecker(HTMLParser):
    """Refuses what Telegram refuses: unknown tags, unbalanced tags, bare & < >."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.open: list[str] = []
        self.text: list[str] = []
        self.problem: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in TELEGRAM_TAGS:
            self.problem = self.problem or f'Unsupported start tag "{tag}"'
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.problem = self.problem or f'Unexpected end tag "{tag}"'

    def handle_data(self, data: str) -> None:
        if any(ch in data for ch in "<>&"):
            self.problem = self.problem or "Unescaped <, > or &"
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in ("lt", "gt", "amp", "quot"):
            self.problem = self.problem or f'Unsupported entity "&{name};"'
        self.text.append({"lt": "<", "gt": ">", "amp": "&", "quot": '"'}.get(name, ""))

    def handle_charref(self, name: str) -> None:
        self.text.append(chr(int(name[1:], 16) if name.startswith("x") else int(name)))


def plain_text(html_text: str) -> str:
    """The text a user sees, or ValueError as Telegram's "can't parse entities"."""
    checker = EntityChecker()
    checker.feed(html_text)
    checker.close()
    if checker.problem or checker.open:
        raise ValueError(checker.problem or f'Tag "{checker.open[-1]}" is not closed')
    return "".join(checker.text)


class TelegramError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None):
        self.code, self.description, self.retry_after = code, description, retry_after


class FakeTelegram:
    def __init__(self, token: str = "123456:TEST-token"):
        self.token = token
        self.cond = threading.Condition()
        self.calls: list[tuple[str, dict[str, Any], float]] = []  # (method, params, when)
        self.updates: list[dict[str, Any]] = []
        self.failures: dict[str, list[TelegramError]] = {}
        self.missing_chats: set[str] = set()  # "chat not found", every time
        self.messages: dict[tuple[str, int], dict[str, Any]] = {}  # (chat, message_id) -> message
        self.next_update_id = 1000
        self.next_message_id = 1
        self.stopped = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else keep-alive answers come ~40 ms late

            def do_POST(self) -> None:
                self.answer()

            def do_GET(self) -> None:
                self.answer()

            def answer(self) -> None:
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = fake.handle(path, query, self.headers.get("Content-Type", ""), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # mkat stopped mid-poll
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> FakeTelegram:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            if self.stopped:
                return
            self.stopped = True
            self.cond.notify_all()  # release long polls
        self.server.shutdown()
        self.server.server_close()

    # -- the wire ---------------------------------------------------------------------

    def handle(self, path: str, query: str, content_type: str, body: bytes) -> tuple[int, dict]:
        prefix = f"/bot{self.token}/"
        if not path.startswith(prefix):
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        method = path[len(prefix) :]
        params = self.parse_params(query, content_type, body)
        with self.cond:
            self.calls.append((method, params, time.monotonic()))
            self.cond.notify_all()
        try:
            return 200, {"ok": True, "result": self.call(method, params)}
        except TelegramError as error:
            payload: dict[str, Any] = {
                "ok": False,
                "error_code": error.code,
                "description": error.description,
            }
            if error.retry_after is not None:
                payload["parameters"] = {"retry_after": error.retry_after}
            return error.code, payload

    @staticmethod
    def parse_params(query: str, content_type: str, body: bytes) -> dict[str, Any]:
        if "application/json" in content_type and body:
            return json.loads(body)
        params: dict[str, Any] = dict(parse_qsl(query))
        params.update(parse_qsl(body.decode()))
        for key in ("reply_markup", "allowed_updates"):  # form values carry JSON
            if isinstance(params.get(key), str):
                params[key] = json.loads(params[key])
        return params

    def call(self, method: str, params: dict[str, Any]) -> Any:
        with self.cond:
            planned = self.failures.get(method)
            if planned:
                raise planned.pop(0)
        handler = getattr(self, "api_" + method, None)
        if handler is None:
            raise TelegramError(404, "Not Found")
        return handler(params)

    def api_getMe(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"id": 123456, "is_bot": True, "first_name": "mkat", "username": "mkat_test_bot"}

    def api_sendMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = str(params["chat_id"])
        if chat in self.missing_chats:
            raise TelegramError(400, "Bad Request: chat not found")
        text = self.checked_text(params)
        with self.cond:
            message_id = self.next_message_id
            self.next_message_id += 1
            message = {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": {"id": int(chat) if chat.lstrip("-").isdigit() else chat, "type": "private"},
                "text": text,
                "html": params["text"],
            }
            if params.get("reply_markup"):
                message["reply_markup"] = params["reply_markup"]
            self.messages[(chat, message_id)] = message
        return {k: v for k, v in message.items() if k != "html"}

    def api_editMessageText(self, params: dict[str, Any]) -> dict[str, Any]:
        key = (str(params["chat_id"]), int(params["message_id"]))
        text = self.checked_text(params)
        with self.cond:
            message = self.messages.get(key)
            if message is None:
                raise TelegramError(400, "Bad Request: message to edit not found")
            markup = params.get("reply_markup") or {"inline_keyboard": []}
            if (
                message["html"] == params["text"]
                and message.get("reply_markup", {"inline_keyboard": []}) == markup
            ):
                raise TelegramError(
                    400,
                    "Bad Request: message is not modified: specified new message content and reply markup "
                    "are exactly the same as a current content and reply markup of the message",
                )
            message.update(text=text, html=params["text"], reply_markup=markup)
        return {k: v for k, v in message.items() if k != "html"}

    def api_answerCallbackQuery(self, params: dict[str, Any]) -> bool:
        return True

    def api_getUpdates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        deadline = time.monotonic() + float(params.get("timeout") or 0)
        with self.cond:
            while True:
                self.updates = [u for u in self.updates if u["update_id"] >= offset]  # confirmed ones go
                if self.updates or self.stopped or time.monotonic() >= deadline:
                    return self.updates[: int(params.get("limit") or 100)]
                self.cond.wait(deadline - time.monotonic())

    def checked_text(self, params: dict[str, Any]) -> str:
        text = params["text"]
        if len(text) > 4096:
            raise TelegramError(400, "Bad Request: message is too long")
        if params.get("parse_mode") != "HTML":
            return text
        try:
            return plain_text(text)
        except ValueError as exc:
            raise TelegramError(400, f"Bad Request: can't parse entities: {exc}") from None

    # -- what tests do ------------------------------------------------------------------

    def fail_next(
        self, method: str, code: int, description: str, retry_after: int | None = None, times: int = 1
    ):
        """The next `times` calls of `method` fail this way."""
        with self.cond:
            self.failures.setdefault(method, []).extend(
                TelegramError(code, description, retry_after) for _ in range(times)
            )

    def push_update(self, update: dict[str, Any]) -> int:
        with self.cond:
            update_id = self.next_update_id
            self.next_update_id += 1
            self.updates.append({"update_id": update_id, **update})
            self.cond.notify_all()
        return update_id

    def say(self, chat_id: int | str, text: str, user: dict | None = None) -> int:
        """A user writes to the bot."""
        user = user or {"id": 7, "is_bot": False, "first_name": "Ada", "username": "ada"}
        message = {
            "message_id": 90_000 + self.next_update_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private"},
            "from": user,
            "text": text,
        }
        return self.push_update({"message": message})

    def tap(self, chat_id: int | str, message_id: int, data: str, user: dict | None = None) -> str:
        """A user taps an inline button under one of the bot's messages; the callback query id."""
        user = user or {"id": 7, "is_bot": False, "first_name": "Ada", "username": "ada"}
        message = self.messages.get((str(chat_id), message_id)) or {
            "message_id": message_id,
            "chat": {"id": chat_id, "type": "private"},
        }
        query_id = f"cb{self.next_update_id}"
        self.push_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "message": message,
                    "chat_instance": "1",
                    "data": data,
                }
            }
        )
        return query_id

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        with self.cond:
            return [params for name, params, _ in self.calls if name == method]

    def wait_for(self, method: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until `method` was called at least `count` times; those calls."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                calls = [params for name, params, _ in self.calls if name == method]
                if len(calls) >= count:
                    return calls
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{method} called {len(calls)} times, wanted {count}")
                self.cond.wait(remaining)

    def confirmed_offset(self) -> int:
        """The offset of the latest getUpdates call."""
        with self.cond:
            offsets = [int(p.get("offset") or 0) for name, p, _ in self.calls if name == "getUpdates"]
        return offsets[-1] if offsets else 0


def wait_for_items(cond: threading.Condition, items: list, count: int, timeout: float, what: str) -> list:
    """Wait until `items` (guarded by `cond`) holds at least `count`; a copy of them."""
    deadline = time.monotonic() + timeout
    with cond:
        while len(items) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(items)} {what}, wanted {count}")
            cond.wait(remaining)
        return list(items)


class WebhookReceiver:
    """Records every POST; answers with the statuses queued in `replies`, else 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.replies: list[tuple[int, dict[str, str]]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.cond:
                    status, headers = receiver.replies.pop(0) if receiver.replies else (200, {})
                    receiver.received.append(json.loads(body))
                    receiver.cond.notify_all()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        return wait_for_items(self.cond, self.received, count, timeout, "webhook posts")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """An SMTP server on loopback (aiosmtpd) that keeps every message it accepts."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller  # a test extra; the bench does not need it

        self.messages: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.endswith("@refused.example"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.cond:
            self.messages.append(
                {"from": envelope.mail_from, "to": envelope.rcpt_tos, "data": envelope.content}
            )
            self.cond.notify_all()
        return "250 Message accepted"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        return wait_for_items(self.cond, self.messages, count, timeout, "e-mails")

    def stop(self) -> None:
        self.controller.stop()
