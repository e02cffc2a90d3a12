"""OpenAI's Batch API for the openai backend (`batch: true` in its params block): half the price, answers within
24 hours instead of seconds.

The response cache hands the backend all of a stage's misses at once; they go out as batches of at most
`batch_max_requests` requests (OpenAI's limit: 50,000), all submitted before any is waited on:
1. the requests are written as JSONL (`custom_id` = the request's position in the chunk, `body` = exactly what
   the live call would send), uploaded (`purpose: batch`) and the batch created;
2. the batch's id is stored at once in `<response cache>/batches/<sha256 of the JSONL and the server>.json`
   (written whole, deeper.outputs; never the key). A stage killed while it waits (or stopped by
   `batch_wait_s`) and run again with the same requests finds that file and polls the same batch: nothing is
   uploaded or paid twice;
3. it is polled every `batch_poll_s` seconds with a progress bar of the batch's own request counts; a batch still
   running after `batch_wait_s` stops the stage with one line saying so, and a later `dvc repro` picks up its
   results;
4. the output file is downloaded and each line mapped back by `custom_id`; the answers go to the response cache
   as live answers would (same keys: the batch flag is not part of the model's fingerprint);
5. lines that failed (an error line, a reply that does not parse) or never ran (an expired batch) are sent
   again as a new, smaller batch, up to `batch_max_rounds` batches in all; what still fails after that is a
   one-line error for generations, and the stated fallback (a counted failure) for ratings.
A batch that OpenAI refuses as a whole (status failed: a malformed input file) is one line with its first error.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from deeper.errors import DeeperError
from deeper.outputs import write_text

ENDPOINT = "/v1/chat/completions"
DONE = ("completed", "expired", "cancelled")  # statuses whose output (possibly partial) can be collected


def batch_dir() -> Path:
    """Where the ids of submitted batches are kept: beside the response cache (it answers the same calls)."""
    from deeper.llm.cache import default_cache_dir

    return default_cache_dir() / "batches"


class BatchPending(DeeperError):
    """A batch is still running after batch_wait_s: the stage stops; a re-run picks it up."""


class BatchRunner:
    """The batches of one OpenAILLM (`llm`); `backoff(attempt)` is its delay before retrying a Files or Batches
    API call."""

    def __init__(self, llm, backoff):
        self.llm, self.backoff = llm, backoff
        self.client = llm.client

    def _fail(self, message: str) -> DeeperError:
        return DeeperError(
            f"openai backend: {self.llm.base_url} model {self.llm.model}: {self.llm.redact(message)}"
        )

    def _call(self, fn, *args, **kwargs):
        """One Files or Batches API call with the backend's own retries for 429, 5xx and transport errors."""
        errors = self.llm.api_errors
        for attempt in range(self.llm.max_retries + 1):
            try:
                return fn(*args, **kwargs)
            except (errors.APITimeoutError, errors.APIConnectionError) as e:
                reason = f"{type(e).__name__}: {e}"
            except errors.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500 and e.status_code != 408:
                    raise self._fail(f"batch API: {e.status_code}: {e.message}") from None
                reason = f"HTTP {e.status_code}"
            if attempt < self.llm.max_retries:
                self.llm.counters.add(retries=1)
                time.sleep(self.backoff(attempt))
        raise self._fail(f"batch API: gave up after {self.llm.max_retries + 1} tries: {reason}")

    def run(self, bodies: list[dict], parse, desc: str) -> list:
        """`parse(reply)` of each request body's answer, in order; None where a request still failed after
        batch_max_rounds rounds of batches."""
        results: list = [None] * len(bodies)
        todo = list(range(len(bodies)))
        for _round in range(self.llm.batch_max_rounds):
            lines = [
                {
                    "custom_id": str(i),
                    "method": "POST",
                    "url": ENDPOINT,
                    "body": {"model": self.llm.model, **bodies[i]},
                }
                for i in todo
            ]
            size = self.llm.batch_max_requests
            # every batch of the round is submitted before any is waited on: they run at OpenAI side by side
            submitted = [self._submit(lines[k : k + size]) for k in range(0, len(lines), size)]
            finished = self._wait(submitted, len(lines), desc)
            answers, errors = {}, {}
            for (state_path, _batch, group), batch in zip(submitted, finished):
                found, failed = self._collect(state_path, batch, group)
                answers.update(found)
                errors.update(failed)
            for i in todo:
                body = answers.get(str(i))
                if body is None:
                    continue
                try:
                    results[i] = parse(_completion(body))
                except Exception as e:  # noqa: BLE001 - a reply that does not parse is sent again, like a failed line
                    errors.setdefault(str(i), f"malformed reply: {e}")
                    continue
                usage = body.get("usage") or {}
                self.llm.counters.add(
                    calls=1,
                    prompt_tokens=usage.get("prompt_tokens", 0) or 0,
                    completion_tokens=usage.get("completion_tokens", 0) or 0,
                )
            todo = [i for i in todo if results[i] is None]
            if not todo:
                break
            first = next((errors[str(i)] for i in todo if str(i) in errors), "no answer in the output file")
            self.llm.counters.add(retries=len(todo))
            print(
                f"batch: {len(todo)} requests failed or did not run ({self.llm.redact(first)}); sending them "
                f"again",
                file=sys.stderr,
                flush=True,
            )
        return results

    # --- one batch -------------------------------------------------------------------------------------

    def _submit(self, lines: list[dict]):
        """(state path, batch, lines): the stored batch of exactly these lines, or a new one (uploaded, created,
        and its id stored at once)."""
        jsonl = "".join(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n" for line in lines)
        digest = hashlib.sha256(f"{self.llm.base_url}\n{jsonl}".encode()).hexdigest()
        state_path = batch_dir() / f"{digest}.json"
        if state_path.is_file():
            try:
                stored = json.loads(state_path.read_text(encoding="utf-8"))
                batch = self._call(self.client.batches.retrieve, stored["batch_id"])
                print(
                    f"batch: resuming {batch.id} ({len(lines)} requests, {batch.status})",
                    file=sys.stderr,
                    flush=True,
                )
                if batch.status not in ("failed", "cancelling"):  # refused or being cancelled: submit anew
                    return state_path, batch, lines
            except (ValueError, KeyError) as e:  # a damaged state file: the batch is submitted again
                print(
                    f"warning: {state_path}: unreadable ({e}); submitting the batch again",
                    file=sys.stderr,
                    flush=True,
                )
        uploaded = self._call(
            self.client.files.create,
            file=("requests.jsonl", jsonl.encode(), "application/jsonl"),
            purpose="batch",
        )
        batch = self._call(
            self.client.batches.create, input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        write_text(
            state_path,
            json.dumps(
                {
                    "batch_id": batch.id,
                    "input_file_id": uploaded.id,
                    "requests": len(lines),
                    "base_url": self.llm.base_url,
                    "model": self.llm.model,
                },
                indent=1,
            )
            + "\n",
        )
        return state_path, batch, lines

    def _collect(self, state_path, batch, lines) -> tuple[dict[str, dict], dict[str, str]]:
        """A finished batch's answers {custom_id: chat completion body} and errors {custom_id: reason}."""
        if batch.status == "failed":
            state_path.unlink(missing_ok=True)
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            first = errors[0].message if errors else "no reason given"
            raise self._fail(f"batch {batch.id} was refused: {first}")
        answers, errors = {}, {}
        for file_id, is_output in ((batch.output_file_id, True), (batch.error_file_id, False)):
            if not file_id:
                continue
            text = self._call(self.client.files.content, file_id).text
            for row in (json.loads(line) for line in text.splitlines() if line.strip()):
                custom_id = str(row.get("custom_id"))
                response = row.get("response") or {}
                if is_output and response.get("status_code") == 200 and not row.get("error"):
                    answers[custom_id] = response.get("body") or {}
                else:
                    error = row.get("error") or {}
                    errors[custom_id] = error.get("message") or f"status {response.get('status_code')}"
        if batch.status != "completed":  # expired or cancelled: the lines without an answer never ran
            for line in lines:
                if line["custom_id"] not in answers:
                    errors.setdefault(line["custom_id"], f"batch {batch.status}")
        state_path.unlink(missing_ok=True)  # collected: a re-run asks the response cache, not this batch
        return answers, errors

    def _wait(self, submitted: list, total: int, desc: str) -> list:
        """Poll every submitted batch until each is done (or refused); BatchPending after batch_wait_s."""
        batches = [batch for _path, batch, _lines in submitted]
        deadline = time.monotonic() + self.llm.batch_wait_s
        ids = ", ".join(b.id for b in batches)
        with tqdm(
            total=total,
            desc=f"{desc} batch {ids}",
            unit="req",
            leave=False,
            disable=not self.llm.show_progress,
        ) as bar:
            while True:
                running = [b for b in batches if b.status not in DONE and b.status != "failed"]
                done = sum(_finished_count(b, len(lines)) for b, (_p, _b, lines) in zip(batches, submitted))
                bar.update(max(0, done - bar.n))
                if not running:
                    return batches
                if time.monotonic() >= deadline:
                    status = ", ".join(sorted({b.status for b in running}))
                    what = (
                        f"batch {running[0].id}"
                        if len(running) == 1
                        else f"{len(running)} batches ({', '.join(b.id for b in running)})"
                    )
                    raise BatchPending(
                        f"openai backend: {what} of {total} requests is {status} ({done} done) after "
                        f"batch_wait_s={self.llm.batch_wait_s:g} s; run the stage again later (`dvc repro`): it "
                        f"picks the batch up, nothing is sent or paid twice"
                    )
                time.sleep(self.llm.batch_poll_s)
                batches = [
                    b
                    if b.status in DONE or b.status == "failed"
                    else self._call(self.client.batches.retrieve, b.id)
                    for b in batches
                ]


def _finished_count(batch, lines: int) -> int:
    if batch.status in DONE:
        return lines
    counts = getattr(batch, "request_counts", None)
    return (counts.completed + counts.failed) if counts else 0


def _completion(body: dict):
    """A chat completion body (a batch output line's) as the client's own response object."""
    from openai.types.chat import ChatCompletion

    return ChatCompletion.model_validate(body)
