"""JSON over HTTP for rewards served elsewhere: timeouts per network operation, bounded retries with exponential
backoff for the failures that can pass (connection refused or reset, timeouts, 429/502/503/504), and one error
type naming the service and what to check. No proxies from the environment; the credential is sent as a bearer
token and never appears in an error, a repr or a log. Written on the standard library so the reward clients need
no HTTP package (the server side uses FastAPI and uvicorn)."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable

__all__ = ["JsonClient", "ServiceError"]

RETRY_STATUS = (429, 502, 503, 504)


class ServiceError(RuntimeError):
    """The service could not be reached, refused the request, or answered something unusable."""


class _Retryable(Exception):
    """A failure worth another attempt; carries the message for the final error."""


class JsonClient:
    """Requests to ``base_url`` that return a JSON object.

    ``service`` names the other side in messages ("reward server at http://..."); ``error`` is the exception
    raised (a :class:`ServiceError` subclass); ``unreachable_hint`` ends the message after the last retry, and
    ``auth_hint(token_sent)`` and ``too_large_hint`` explain HTTP 401/403 and 413.
    """

    def __init__(self, base_url: str, *, token: str | None, timeout: float, retries: int, backoff: float,
                 service: str, error: type[ServiceError] = ServiceError, unreachable_hint: str = "",
                 auth_hint: Callable[[bool], str] = lambda sent: "", too_large_hint: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.token, self.timeout, self.retries, self.backoff = token, float(timeout), retries, float(backoff)
        self.service, self.error = service, error
        self.unreachable_hint, self.auth_hint, self.too_large_hint = unreachable_hint, auth_hint, too_large_hint
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """``body`` as JSON (or None for a GET) to ``base_url + path``; the answer as a dict."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._attempt(method, path, data)
            except _Retryable as failure:
                last = str(failure)
        hint = f". {self.unreachable_hint}" if self.unreachable_hint else ""
        raise self.error(f"{self.service} failed {self.retries + 1} attempt(s): {last}{hint}")

    def _attempt(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as failure:
            self._raise_for_status(failure)
        except urllib.error.URLError as failure:
            reason = failure.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within timeout={self.timeout:g}s") from None
            raise _Retryable(f"cannot connect ({reason})") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within timeout={self.timeout:g}s") from None
        except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead) as failure:
            raise _Retryable(f"connection dropped ({type(failure).__name__}: {failure})") from None
        except http.client.HTTPException as failure:
            raise self.error(f"{self.service} answered garbage, not HTTP ({type(failure).__name__}: {failure}); "
                             "is the url right?") from None
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self.error(f"{self.service} answered garbage, not JSON: {raw[:200]!r}; is the url right?") from None
        if not isinstance(answer, dict):
            raise self.error(f"{self.service} answered garbage: {str(answer)[:200]!r}")
        return answer

    def _raise_for_status(self, failure: urllib.error.HTTPError) -> None:
        try:
            payload = json.loads(failure.read())
            message = payload.get("error", "") if isinstance(payload, dict) else ""
            if isinstance(message, dict):  # OpenAI-style {"error": {"message": ...}}
                message = message.get("message", "")
        except Exception:  # noqa: BLE001 - an error page that is not JSON
            message = ""
        detail = f" ({message})" if message else ""
        if failure.code in RETRY_STATUS:
            raise _Retryable(f"HTTP {failure.code}{detail}") from None
        if failure.code in (401, 403):
            hint = self.auth_hint(bool(self.token))
            raise self.error(f"{self.service} refused the request (HTTP {failure.code}){detail}"
                             f"{': ' + hint if hint else ''}") from None
        if failure.code == 413 and self.too_large_hint:
            raise self.error(f"{self.service} refused the request as too large (HTTP 413){detail}; "
                             f"{self.too_large_hint}") from None
        raise self.error(f"{self.service} answered HTTP {failure.code}{detail}") from None
