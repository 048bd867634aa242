"""Schemathesis hooks and checks for tests/test_http_fuzz.py (loaded by the `st` command through
SCHEMATHESIS_HOOKS=tests.fuzz_hooks)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import schemathesis

from mirrord.views.data import MAX_WAIT
from mirrord.views.limits import MAX_LINE

LONG_POLL_CAP = 0.2  # seconds: a valid `wait` is shortened, so a case cannot hold a run 300 s


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """A schema-valid `wait` would really wait (nothing changes meanwhile): cap it. Values the
    server refuses are sent unchanged, parsed here as the server parses them."""
    query = case.query if isinstance(case.query, dict) else None
    if not query or "wait" not in query:
        return
    try:
        seconds = float(query["wait"])
    except (TypeError, ValueError):
        return
    if LONG_POLL_CAP < seconds <= MAX_WAIT:
        query["wait"] = LONG_POLL_CAP


@schemathesis.check
def mirrord_error_format(ctx: Any, response: Any, case: Any) -> bool | None:
    """Errors are exactly {"error": {"code", "message"}} as JSON; no traceback, ever."""
    text = response.text
    if "Traceback" in text or 'File "' in text:
        raise AssertionError(f"a traceback in the answer: {text[:300]}")
    if response.status_code < 400:
        return None
    content_type = _content_type(response)
    if not content_type.startswith("application/json"):
        raise AssertionError(f"a {response.status_code} answered as {content_type!r}: {text[:200]}")
    body = response.json()
    if not (isinstance(body, dict) and set(body) == {"error"}):
        raise AssertionError(f"error body is not {{'error': ...}}: {text[:200]}")
    error = body["error"]
    if not (isinstance(error, dict) and set(error) == {"code", "message"}):
        raise AssertionError(f"error is not {{'code', 'message'}}: {text[:200]}")
    if not all(isinstance(v, str) and v for v in error.values()):
        raise AssertionError(f"empty error code or message: {text[:200]}")
    return True


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but one documented exception: a request whose request line or a
    header line is longer than aiohttp accepts (MAX_LINE) never reaches the API; aiohttp
    answers it with a plain-text 400 (tests/test_http_hostile.py checks those: a 400, one
    warning line, the server unharmed)."""
    request = response.request
    url = urlsplit(request.url)
    target = url.path + ("?" + url.query if url.query else "")
    too_long = len(request.method) + len(target) + len(" HTTP/1.1") > MAX_LINE or any(
        len(str(value)) > MAX_LINE for value in request.headers.values()
    )
    plain_400 = response.status_code == 400 and not _content_type(response).startswith(
        "application/json"
    )
    return not (too_long and plain_400)


def _content_type(response: Any) -> str:
    value = response.headers.get("content-type", [""])
    return str(value[0] if isinstance(value, list) else value)
