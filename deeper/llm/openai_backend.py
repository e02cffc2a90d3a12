"""The `openai` backend: any OpenAI-compatible chat server (OpenAI, a vLLM server, llama.cpp's server).

- The key comes only from the environment variable named by `api_key_env`; it is never logged, never put in
  a fingerprint, cache key or file. A server on a loopback address may run without one ("EMPTY").
- Requests run on a bounded thread pool (`concurrency`). The client's own retries are off; this module
  retries 429, 5xx, timeouts, connection errors and malformed replies with exponential backoff and jitter
  (honouring Retry-After), counts the retries, and after the last one raises a one-line DeeperError
  (transport errors) or, for a rating whose replies stayed malformed, counts a failure and returns the
  stated fallback (uniform probabilities, digit_mass 0, failed=True).
- generate: one request per sample with `seed = sampling.seed + k` (servers without `n` work too);
  repetition_penalty != 1 goes in extra_body (vLLM and llama.cpp read it). OpenAI itself has no such parameter
  and answers 400 "Unrecognized request argument" to it: set `send_repetition_penalty: false` there (the
  penalty is then not applied, and the fingerprint says so).
- rating_probs: one request per item, max_tokens=1, logprobs with top_logprobs=20. With
  `prefill: assistant` the prefill is sent as a last assistant message; the server must continue it rather than
  open a new turn (llama-cpp-python's server does so only when started by scripts/llamacpp_server.py; a vLLM server
  needs `rating_extra_body: {continue_final_message: true, add_generation_prompt: false}`, sent with ratings
  only: with generation requests, whose last message is the user's, it would continue the user's turn);
  with `prefill: none` the item's chat is sent as is and the first answer token is read.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from tqdm import tqdm

from deeper.errors import ConfigError, DeeperError
from deeper.llm.base import Chat, Counters, Generation, RatingGroup, RatingResult, Sampling, uniform_result
from deeper.llm.scoring import result_from_top_logprobs

PREFILL_MODES = ("assistant", "none")
TOP_LOGPROBS = 20
BATCH_CHUNK = 10_000_000  # the response cache's chunk in batch mode: every miss of a stage in one go


class MalformedReply(Exception):
    """The server answered 200 but not with what was asked for (no JSON, no choices, no logprobs)."""


class _GaveUp(Exception):
    def __init__(self, reason: str, malformed: bool):
        super().__init__(reason)
        self.reason, self.malformed = reason, malformed


def is_loopback(base_url: str | None) -> bool:
    host = urlsplit(base_url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(base_url: str | None) -> str:
    """The base URL without any user:password part (it goes into fingerprints and messages)."""
    if not base_url:
        return "https://api.openai.com/v1"
    parts = urlsplit(base_url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter: half of min(cap, base * 2^attempt) fixed, half random."""
    if retry_after is not None:
        return min(cap, max(0.0, retry_after))
    ceiling = min(cap, base * (2**attempt))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def rating_messages(chat: Chat, prefill: str, mode: str) -> list[dict]:
    if mode == "assistant" and prefill:
        return [*chat, {"role": "assistant", "content": prefill}]
    return list(chat)


def top_logprob_pairs(response) -> list[tuple[str, float]]:
    """The (token, logprob) pairs of the first answer token, or MalformedReply."""
    try:
        content = response.choices[0].logprobs.content
        first = content[0]
        pairs = [(t.token, t.logprob) for t in first.top_logprobs or []]
    except (AttributeError, IndexError, TypeError) as e:
        raise MalformedReply(f"no logprobs in the reply ({type(e).__name__})") from None
    if not pairs:
        pairs = [(first.token, first.logprob)]
    return pairs


def message_text(response) -> Generation:
    """The answer's text; finish_reason "length" (the server stopped at max_tokens) marks it stopped_at_limit."""
    try:
        choice = response.choices[0]
        message = choice.message
    except (AttributeError, IndexError, TypeError) as e:
        raise MalformedReply(f"no choices in the reply ({type(e).__name__})") from None
    return Generation(
        message.content or "", stopped_at_limit=getattr(choice, "finish_reason", None) == "length"
    )


class OpenAILLM:
    backend = "openai"

    def __init__(
        self,
        name: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60,
        max_retries: int = 5,
        prefill: str = "assistant",
        batch_size: int | None = None,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        extra_body: dict | None = None,
        send_repetition_penalty: bool = True,
        rating_extra_body: dict | None = None,
        adapter: str | None = None,
        batch: bool = False,
        batch_poll_s: float = 30.0,
        batch_wait_s: float = 86_400.0,
        batch_max_rounds: int = 3,
        batch_max_requests: int = 50_000,
        where: str = "model",
    ):
        import openai

        self.check_settings({"batch": batch}, where)
        if prefill not in PREFILL_MODES:
            raise ConfigError(f"{where}.prefill", f"{prefill!r} is not one of {', '.join(PREFILL_MODES)}")
        if int(concurrency) < 1:
            raise ConfigError(f"{where}.concurrency", "must be at least 1")
        if not isinstance(send_repetition_penalty, bool):
            raise ConfigError(
                f"{where}.send_repetition_penalty", f"must be true or false, got {send_repetition_penalty!r}"
            )
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if not is_loopback(base_url):
                raise ConfigError(
                    f"{where}.api_key_env",
                    f"environment variable {api_key_env} is not set (a key is needed for {public_url(base_url)})",
                )
            key = "EMPTY"  # local servers without auth accept any key
        self._key = key
        # A served LoRA (vLLM's --lora-modules name=path) is requested by its name.
        self.name, self.model = name, adapter or name
        self.base_url = public_url(base_url)
        self.prefill_mode, self.extra_body = prefill, dict(extra_body or {})
        self.rating_extra_body = {**self.extra_body, **(rating_extra_body or {})}
        self.send_repetition_penalty = send_repetition_penalty
        self.concurrency, self.max_retries = int(concurrency), int(max_retries)
        # chunk size of the response cache (each chunk committed on return): several requests per worker; with
        # the Batch API one chunk is one batch
        self.batch = batch
        # (all of a stage's misses: the batches are split and stored by id in deeper.llm.openai_batch)
        self.batch_size = int(batch_size or (BATCH_CHUNK if batch else 4 * self.concurrency))
        self.batch_poll_s, self.batch_wait_s = float(batch_poll_s), float(batch_wait_s)
        self.batch_max_rounds, self.batch_max_requests = int(batch_max_rounds), int(batch_max_requests)
        self.retry_base_delay, self.retry_max_delay = float(retry_base_delay), float(retry_max_delay)
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=float(timeout), max_retries=0)
        # the openai module, whose exception classes the live and the batch path (openai_batch) both catch
        self.api_errors = openai
        settings: dict[str, object] = {"prefill": prefill, "extra_body": self.extra_body}
        if not send_repetition_penalty:  # only then: the fingerprints of existing blocks stay as they were
            settings["send_repetition_penalty"] = False
        if rating_extra_body:
            settings["rating_extra_body"] = rating_extra_body
        settings_json = json.dumps(settings, sort_keys=True)
        self.fingerprint = f"openai:{self.base_url}|{self.model}|{settings_json}"
        self.counters = Counters()
        self.show_progress = True

    @staticmethod
    def check_settings(settings: dict, where: str) -> None:
        if not isinstance(settings.get("batch", False), bool):
            raise ConfigError(f"{where}.batch", f"must be true or false, got {settings['batch']!r}")

    @staticmethod
    def prefill_problem(settings: dict) -> str | None:
        """Why ratings cannot be read in logprob mode with these params (None: they can): with `prefill: none`
        the first answer token is read, which a chat model starts with "Rating", "I", "**", ..., so the digit
        mass would be 0 and every rating a failure."""
        if settings.get("prefill", "assistant") == "none":
            return "prefill none sends no prefill, so the first answer token is not the rating digit"
        return None

    # --- one request with retries ----------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """`text` on one line with the API key masked: every message either path prints goes through it."""
        text = " ".join(str(text).split())  # one line
        return text.replace(self._key, "***") if self._key and self._key != "EMPTY" else text

    def _request(self, parse, **kwargs):
        errors = self.api_errors
        reason, malformed = "no attempt", False
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self.client.chat.completions.create(model=self.model, **kwargs)
                value = parse(response)
                usage = getattr(response, "usage", None)
                self.counters.add(
                    calls=1,
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                )
                return value
            except MalformedReply as e:
                reason, malformed = str(e), True
            except errors.APITimeoutError:
                reason, malformed = "timed out", False
            except errors.APIConnectionError as e:
                reason, malformed = f"connection error: {e}", False
            except errors.APIStatusError as e:
                status = e.status_code
                if status == 401:
                    raise DeeperError(
                        f"openai backend: {self.base_url} refused the key (401); check the key in the environment"
                    ) from None
                if status != 429 and status < 500 and status != 408:
                    raise DeeperError(
                        f"openai backend: {self.base_url} model {self.model}: {status}: {self.redact(e.message)}"
                    ) from None
                reason, malformed = f"HTTP {status}", False
                retry_after = _retry_after(e)
            except errors.APIResponseValidationError as e:
                reason, malformed = f"malformed reply: {e.message}", True
            except (json.JSONDecodeError, ValueError) as e:  # a 200 whose body is not JSON
                reason, malformed = f"malformed reply: {type(e).__name__}", True
            if attempt < self.max_retries:
                self.counters.add(retries=1)
                time.sleep(backoff_delay(attempt, self.retry_base_delay, self.retry_max_delay, retry_after))
        raise _GaveUp(self.redact(reason), malformed)

    def _run_all(self, jobs, desc: str) -> list:
        """Run `jobs` (zero-argument callables) on the bounded pool; results in order."""
        results = [None] * len(jobs)
        with (
            ThreadPoolExecutor(max_workers=self.concurrency) as pool,
            tqdm(
                total=len(jobs),
                desc=desc,
                unit="req",
                leave=False,
                disable=not self.show_progress or len(jobs) < 2,
            ) as bar,
        ):
            futures = {pool.submit(job): i for i, job in enumerate(jobs)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return results

    def _gave_up(self, e: _GaveUp) -> DeeperError:
        return DeeperError(
            f"openai backend: {self.base_url} model {self.model}: gave up after {self.max_retries + 1} tries: {e.reason}"
        )

    # --- the interface ---------------------------------------------------------------------------------

    def generate(self, chats: list[Chat], n: int, sampling: Sampling) -> list[list[Generation]]:
        extra = dict(self.extra_body)
        if sampling.repetition_penalty != 1.0 and self.send_repetition_penalty:
            extra["repetition_penalty"] = sampling.repetition_penalty

        def job(chat, k):
            def call():
                try:
                    return self._request(
                        message_text,
                        messages=chat,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        seed=sampling.seed + k,
                        extra_body=extra or None,
                    )
                except _GaveUp as e:
                    raise self._gave_up(e) from None

            return call

        if self.batch:
            bodies = [
                {
                    "messages": chat,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": sampling.max_new_tokens,
                    "seed": sampling.seed + k,
                    **extra,
                }
                for chat in chats
                for k in range(n)
            ]
            flat = self._batches().run(bodies, message_text, "generate")
            missing = [i for i, value in enumerate(flat) if value is None]
            if missing:
                raise DeeperError(
                    f"openai backend: {self.base_url} model {self.model}: {len(missing)} of "
                    f"{len(flat)} batch requests still failed after {self.batch_max_rounds} batches"
                )
        else:
            flat = self._run_all([job(chat, k) for chat in chats for k in range(n)], "generate")
        return [flat[i * n : (i + 1) * n] for i in range(len(chats))]

    def _batches(self):
        from deeper.llm.openai_batch import BatchRunner

        return BatchRunner(
            self, lambda attempt: backoff_delay(attempt, self.retry_base_delay, self.retry_max_delay)
        )

    def rating_probs(self, groups: list[RatingGroup]) -> list[RatingResult]:
        def job(chat, prefill):
            def call():
                try:
                    return self._request(
                        top_logprob_pairs,
                        messages=rating_messages(chat, prefill, self.prefill_mode),
                        max_tokens=1,
                        temperature=0.0,
                        seed=0,
                        logprobs=True,
                        top_logprobs=TOP_LOGPROBS,
                        extra_body=self.rating_extra_body or None,
                    )
                except _GaveUp as e:
                    if not e.malformed:
                        raise self._gave_up(e) from None
                    self.counters.add(failures=1)
                    return None  # the fallback, filled in below

            return call

        if self.batch:  # a line still failed after the batches gets the fallback, as a malformed live reply
            bodies = [
                {
                    "messages": rating_messages(chat, g.prefill, self.prefill_mode),
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "seed": 0,
                    "logprobs": True,
                    "top_logprobs": TOP_LOGPROBS,
                    **self.rating_extra_body,
                }
                for g in groups
                for chat in g.chats
            ]
            flat = self._batches().run(bodies, top_logprob_pairs, "rate")
            self.counters.add(failures=sum(value is None for value in flat))
        else:
            flat = self._run_all([job(chat, g.prefill) for g in groups for chat in g.chats], "rate")
        results, start = [], 0
        for group in groups:
            rows = flat[start : start + len(group.chats)]
            start += len(group.chats)
            result = result_from_top_logprobs([r or [] for r in rows])
            # no reply after the retries, or a reply without a rating (scoring's MIN_DIGIT_MASS)
            no_reply = np.array([r is None for r in rows], dtype=bool)
            failed = no_reply | result.failed
            result.probs[failed] = uniform_result(len(rows)).probs[failed]
            assert result.digit_mass is not None  # result_from_top_logprobs sets it
            result.digit_mass[no_reply] = 0.0
            result.failed = failed
            results.append(result)
        return results


def _retry_after(error) -> float | None:
    try:
        value = error.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
