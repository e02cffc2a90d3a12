"""A local OpenAI-compatible chat server on 127.0.0.1 for the openai backend's tests.

It speaks POST /v1/chat/completions (messages, seed, temperature, max_tokens, logprobs, top_logprobs) with a
deterministic "model": a generated text names the last message and the seed (cut to max_tokens words, then
finish_reason "length", else "stop"); a rating distribution is a
function of the messages (`rating_logprobs`), spread over "1".."5", " 4" and non-digit tokens.

Scripted faults are consumed one per request, in order: "429", "500", "sleep:<seconds>" (answers late, after
the client has timed out), "nojson" (a 200 whose body is not JSON), "nochoices", "nologprobs", "nodigits" (a
well-formed rating reply whose top logprobs hold no digit: a model answering "Rating" because it did not
continue the prefill), "quote_key" (a 403 whose message quotes the bearer token it was sent, as some servers
and proxies do).
It records every request (headers and body), and the largest number of requests in flight at once.
`reply=f` makes a generated text `f(messages)` instead (`f(messages, seed)` with `reply_sees_seed=True`). `strict=True` answers like OpenAI itself to a body
key its API does not have (e.g. vLLM's `repetition_penalty`): 400 "Unrecognized request argument supplied".
`hold_first=k` makes the first k requests wait until k are in flight (or 5 s pass), so a concurrency
bound shows up in `max_in_flight` whatever the machine's speed.

The Batch API: POST /v1/files (multipart, purpose "batch"), GET /v1/files/<id>/content, POST /v1/batches and
GET /v1/batches/<id>. A batch answers each line as /v1/chat/completions would; it is "in_progress" for
`batch_polls` retrieves (its request counts growing), then "completed" with an output file (and an error file
for failed lines). Scripted batch faults, one per created batch, in order (`batch_faults`): "expire" (the batch
ends "expired" with only the first half of its lines answered), "fail_line" (its first line fails with a 500
in the error file), "refuse" (status "failed", the whole input refused). It records uploads, created batches
and retrieves.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import deque
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RATING_TOKENS = ["1", "2", "3", "4", "5", " 4", "I", "\n", "The"]
# The request keys of OpenAI's chat completions API (strict mode refuses any other, as OpenAI does).
OPENAI_KEYS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "logprobs",
    "top_logprobs",
    "n",
    "stop",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "service_tier",
    "store",
    "metadata",
}


def rating_logprobs(messages: list[dict]) -> list[tuple[str, float]]:
    """The fake model's next-token distribution for these messages: (token, logprob), summing to 1."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    weights = [1 + digest[i] for i in range(len(RATING_TOKENS))]
    total = sum(weights)
    return sorted(
        ((token, math.log(w / total)) for token, w in zip(RATING_TOKENS, weights)), key=lambda p: -p[1]
    )


def expected_probs(messages: list[dict]) -> tuple[list[float], float]:
    """What a correct client makes of `rating_logprobs`: P(1..5) renormalised (" 4" counts as 4) and the mass."""
    sums = [0.0] * 5
    for token, logprob in rating_logprobs(messages):
        if token.strip() in "12345" and token.strip():
            sums[int(token.strip()) - 1] += math.exp(logprob)
    mass = sum(sums)
    return [s / mass for s in sums], mass


def generated_text(messages: list[dict], seed, temperature) -> str:
    return f"reply to {messages[-1]['content']!r} seed={seed} temperature={temperature}"


class FakeOpenAIServer:
    def __init__(
        self,
        faults=(),
        hold_first: int = 0,
        delay: float = 0.0,
        reply=None,
        strict: bool = False,
        reply_sees_seed: bool = False,
        batch_polls: int = 1,
        batch_faults=(),
    ):
        self.faults = deque(faults)
        self.batch_polls, self.batch_faults = batch_polls, deque(batch_faults)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}  # id -> the batch object, plus "_lines", "_fault", "_polls"
        self.uploads = self.batches_created = self.retrieves = 0
        self.reply, self.strict, self.reply_sees_seed = reply, strict, reply_sees_seed
        self.hold_first, self.delay = hold_first, delay
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = self.arrived = 0
        self._lock = threading.Lock()
        self._enough = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def add_faults(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # --- the handler ---------------------------------------------------------------------------------

    def _enter(self) -> tuple[str | None, bool]:
        with self._lock:
            self.in_flight += 1
            self.arrived += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            held = self.arrived <= self.hold_first
            if self.in_flight >= self.hold_first:
                self._enough.set()
            return (self.faults.popleft() if self.faults else None), held

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _reply(self, body: dict, fault: str | None, authorization: str = "") -> tuple[int, bytes]:
        messages = body.get("messages", [])
        unknown = sorted(set(body) - OPENAI_KEYS) if self.strict else []
        if unknown:
            return 400, json.dumps(
                {
                    "error": {
                        "message": f"Unrecognized request argument supplied: {unknown[0]}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                }
            ).encode()
        if fault == "429":
            return 429, json.dumps({"error": {"message": "rate limited", "type": "rate_limit"}}).encode()
        if fault == "500":
            return 500, json.dumps({"error": {"message": "internal error", "type": "server_error"}}).encode()
        if fault == "quote_key":
            message = f"Forbidden: key {authorization.removeprefix('Bearer ')} has no access to this model"
            return 403, json.dumps({"error": {"message": message, "type": "permission_error"}}).encode()
        if fault == "nojson":
            return 200, b"<html>not json"
        if fault == "nochoices":
            return 200, json.dumps(
                {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}
            ).encode()
        choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs") and fault != "nologprobs":
            top = rating_logprobs(messages)[: int(body.get("top_logprobs") or 1)]
            if fault == "nodigits":
                top = [("Rating", math.log(0.9)), (":", math.log(0.06)), ("**", math.log(0.04))]
            token, logprob = top[0]
            choice["message"] = {"role": "assistant", "content": token}
            choice["logprobs"] = {
                "content": [
                    {
                        "token": token,
                        "logprob": logprob,
                        "bytes": list(token.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top
                        ],
                    }
                ]
            }
        else:
            if self.reply and self.reply_sees_seed:
                text = self.reply(messages, body.get("seed"))
            else:
                text = (
                    self.reply(messages)
                    if self.reply
                    else generated_text(messages, body.get("seed"), body.get("temperature"))
                )
            # a word is a token here: a reply longer than max_tokens is cut and says so, as a real server does
            limit = body.get("max_tokens")
            if limit is not None and len(text.split(" ")) > int(limit):
                text, choice["finish_reason"] = " ".join(text.split(" ")[: int(limit)]), "length"
            choice["message"] = {"role": "assistant", "content": text}
        prompt_tokens = sum(len(m.get("content", "").split()) for m in messages)
        return 200, json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "m"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": 1,
                    "total_tokens": prompt_tokens + 1,
                },
            }
        ).encode()

    # --- the Batch API --------------------------------------------------------------------------------

    def _upload(self, content_type: str, data: bytes) -> tuple[int, bytes]:
        message = BytesParser(policy=email_policy).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + data
        )
        fields = {
            part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()
        }
        with self._lock:
            self.uploads += 1
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = fields.get("file") or b""
        return 200, json.dumps(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(self.files[file_id]),
                "created_at": 0,
                "filename": "requests.jsonl",
                "purpose": (fields.get("purpose") or b"").decode(),
                "status": "processed",
            }
        ).encode()

    def _create_batch(self, body: dict) -> tuple[int, bytes]:
        lines = [
            json.loads(line)
            for line in self.files[body["input_file_id"]].decode().splitlines()
            if line.strip()
        ]
        with self._lock:
            self.batches_created += 1
            batch_id = f"batch_{len(self.batches) + 1}"
            fault = self.batch_faults.popleft() if self.batch_faults else None
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "errors": None,
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": 0,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "_lines": lines,
                "_fault": fault,
                "_polls": 0,
            }
        return 200, self._batch_json(batch_id)

    def _batch_json(self, batch_id: str) -> bytes:
        return json.dumps({k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}).encode()

    def _retrieve_batch(self, batch_id: str) -> tuple[int, bytes]:
        with self._lock:
            self.retrieves += 1
            batch = self.batches.get(batch_id)
            if batch is None:
                return 404, b'{"error": {"message": "no such batch"}}'
            if batch["status"] in ("validating", "in_progress"):
                batch["_polls"] += 1
                lines, fault = batch["_lines"], batch["_fault"]
                if batch["_polls"] < self.batch_polls:
                    batch["status"] = "in_progress"
                    batch["request_counts"]["completed"] = (
                        len(lines) * batch["_polls"] // (self.batch_polls + 1)
                    )
                elif fault == "refuse":
                    batch["status"] = "failed"
                    batch["errors"] = {
                        "object": "list",
                        "data": [
                            {"code": "invalid_json_line", "line": 1, "message": "line 1 is not valid JSON"}
                        ],
                    }
                else:
                    self._finish(batch, lines, fault)
        return 200, self._batch_json(batch_id)

    def _finish(self, batch: dict, lines: list[dict], fault: str | None) -> None:
        answered = lines[: len(lines) // 2] if fault == "expire" else lines
        output, errors = [], []
        for n, line in enumerate(answered):
            if fault == "fail_line" and n == 0:
                errors.append(
                    {
                        "id": f"req_{n}",
                        "custom_id": line["custom_id"],
                        "response": {"status_code": 500, "request_id": "r", "body": {}},
                        "error": {"code": "server_error", "message": "internal error"},
                    }
                )
                continue
            status, payload = self._reply(line["body"], None)
            output.append(
                {
                    "id": f"req_{n}",
                    "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": "r", "body": json.loads(payload)},
                    "error": None,
                }
            )
        for rows, key in ((output, "output_file_id"), (errors, "error_file_id")):
            if rows:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = "".join(json.dumps(row) + "\n" for row in rows).encode()
                batch[key] = file_id
        batch["status"] = "expired" if fault == "expire" else "completed"
        batch["request_counts"].update(completed=len(output), failed=len(errors))

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                path = self.path.rstrip("/")
                if path.startswith("/v1/batches/"):
                    self._send(*server._retrieve_batch(path.rsplit("/", 1)[1]))
                elif path.startswith("/v1/files/") and path.endswith("/content"):
                    data = server.files.get(path.split("/")[3])
                    self._send(200, data, "application/octet-stream") if data is not None else self._send(
                        404, b'{"error": {"message": "no such file"}}'
                    )
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                path = self.path.rstrip("/")
                if path in ("/v1/files", "/v1/batches"):
                    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    if path == "/v1/files":
                        self._send(*server._upload(self.headers.get("Content-Type", ""), data))
                    else:
                        self._send(*server._create_batch(json.loads(data)))
                    return
                fault, held = server._enter()
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    body = json.loads(self.rfile.read(length) or b"{}")
                    with server._lock:
                        server.requests.append(
                            {
                                "path": self.path,
                                "headers": {k.lower(): v for k, v in self.headers.items()},
                                "body": body,
                                "fault": fault,
                            }
                        )
                    if held:
                        server._enough.wait(timeout=5)
                    if server.delay:
                        time.sleep(server.delay)
                    if fault and fault.startswith("sleep:"):
                        time.sleep(float(fault.split(":", 1)[1]))
                    if self.path.rstrip("/") != "/v1/chat/completions":
                        status, payload = 404, b'{"error": {"message": "not found"}}'
                    else:
                        status, payload = server._reply(body, fault, self.headers.get("Authorization", ""))
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before the answer
                finally:
                    server._leave()

        return Handler
