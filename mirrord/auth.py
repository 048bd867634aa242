"""OAuth2 bearer tokens for the upstream client (PROTOCOL.md, "Transport and auth").

`OAuthTokens` is a `TokenProvider`: it refreshes the access token (refresh_token grant, POST
token_url) shortly before it expires and when upstream refuses it with a 401. Upstream rotates
refresh tokens: each refresh hands out a new one and voids the old one, so losing the newest one
locks the laptop out until an operator puts a fresh one in the config. Hence:

- every rotation is written to ``<state_dir>/oauth-state.json`` (mode 0600) before the new
  access token is used: temp file in the same directory, fsync, rename over, fsync the directory;
- refreshes are serialised by an asyncio lock (concurrent callers share one refresh) and, across
  processes and config reloads, by a lock file; under it the state file is read again, so a
  refresh token another process just rotated is picked up instead of being replayed;
- the access token is saved too, so that `mirrord sync` started every few minutes reuses it
  instead of rotating the refresh token on every run;
- the config's refresh token is only the seed: the state file records its SHA-256 (never the
  token), and a config whose seed differs from that wins, which is how an admin recovers a
  locked-out laptop.

Expiry is judged by the wall clock (time.time): a laptop's monotonic clock stops while it is
suspended, and a token's lifetime does not. A clock that jumps is caught by the 401 path.
No message, log line or repr here carries a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import aiohttp

from mirrord import __version__
from mirrord.config import OAuthConfig, Secret, UpstreamConfig
from mirrord.durable import write_private_atomic
from mirrord.upstream import (
    AuthError,
    BadAnswer,
    ProtocolError,
    RateLimited,
    StaticToken,
    TokenProvider,
    UpstreamError,
    UpstreamServerError,
    UpstreamUnavailable,
    _retry_after,
    _safe_host,
)

__all__ = [
    "LOCK_FILE",
    "STATE_FILE",
    "OAuthStateError",
    "OAuthTokens",
    "RefreshTokenRejected",
    "token_provider",
]

log = logging.getLogger(__name__)

STATE_FILE = "oauth-state.json"
LOCK_FILE = "oauth-state.lock"
_STATE_VERSION = 1

# Refresh when 10% of the lifetime or 5 minutes remain, whichever is more; but never in the
# first half of the lifetime, so a short-lived token cannot cause a refresh per request.
_MARGIN_FRACTION = 0.1
_MIN_MARGIN = 300.0
_MAX_MARGIN_FRACTION = 0.5
# After a failed early refresh the current token still works: try again this much later at
# the soonest, rather than on every request while the link is down.
_EARLY_RETRY = 30.0
_LOCK_POLL = 0.05
_MAX_LIFETIME = 366 * 86400.0  # longer is nonsense: treated as unknown
_MAX_ANSWER = 64 * 1024  # a token answer is a few hundred bytes; more is not a token answer


class RefreshTokenRejected(AuthError):
    """The token endpoint refused the refresh token (invalid_grant): only an operator can fix
    this, by putting a fresh refresh token in the config."""


class OAuthStateError(UpstreamError):
    """The state file cannot be read, locked or written (permissions, a full disk)."""


@dataclass
class _Tokens:
    refresh: Secret
    access: Secret | None = None
    expires_at: float | None = None  # wall clock; None: unknown, only a 401 ends the token
    lifetime: float | None = None
    scope: str | None = None


class OAuthTokens:
    """Access tokens from a rotating refresh token; see the module docstring."""

    def __init__(
        self,
        config: OAuthConfig,
        state_dir: Path,
        *,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self.state_path = Path(state_dir) / STATE_FILE
        self._lock_path = Path(state_dir) / LOCK_FILE
        # The total deadline is asyncio.timeout() (see UpstreamClient): aiohttp's own total
        # timer cancels the task and can fire late.
        self._total = timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout, 10.0), sock_read=timeout
        )
        self._clock = clock
        self._on_secret = on_secret
        self._where = _safe_host(config.token_url)
        self._seed_hash = _sha256(config.refresh_token)
        self._lock = asyncio.Lock()
        self._tokens: _Tokens | None = None  # loaded on first use
        self._unsaved = False  # the newest refresh token is only in memory
        self._early_retry_at = 0.0
        self.refreshes = 0  # successful refreshes, for status pages
        self.last_error: str | None = None  # the last failed refresh, while it matters

    def __repr__(self) -> str:
        return (
            f"OAuthTokens(client_id={self._config.client_id!r}, token_url={self._where!r}, "
            f"state={str(self.state_path)!r})"
        )

    # ---- TokenProvider -----------------------------------------------------------------------

    async def token(self) -> Secret:
        tokens = self._current()
        if self._fresh(tokens) and not self._unsaved:
            assert tokens.access is not None
            return tokens.access
        async with self._lock:
            self._save_pending()
            tokens = self._current()
            if self._fresh(tokens) or (self._usable(tokens) and self._waiting_early_retry()):
                assert tokens.access is not None
                return tokens.access
            return await self._refresh_or_keep(tokens)

    async def rejected(self, token: Secret) -> bool:
        async with self._lock:
            tokens = self._current()
            if tokens.access is not None and tokens.access != token:
                return True  # already replaced, by a concurrent caller or an early refresh
            log.info("upstream refused the OAuth access token; refreshing it")
            tokens.access = None  # never hand out a refused token again, even if refresh fails
            new = await self._refresh(refused=token)
            # The same token again would be refused again: no second try, no refresh loop.
            return new.access != token

    # ---- deciding --------------------------------------------------------------------------

    def _current(self) -> _Tokens:
        if self._tokens is None:
            self._tokens = self._load()
        return self._tokens

    def _usable(self, tokens: _Tokens) -> bool:
        if tokens.access is None:
            return False
        return tokens.expires_at is None or self._clock() < tokens.expires_at

    def _fresh(self, tokens: _Tokens) -> bool:
        if not self._usable(tokens):
            return False
        if tokens.expires_at is None or tokens.lifetime is None:
            return True
        return self._clock() < tokens.expires_at - _margin(tokens.lifetime)

    def _waiting_early_retry(self) -> bool:
        return self._clock() < self._early_retry_at

    async def _refresh_or_keep(self, tokens: _Tokens) -> Secret:
        """Refresh; if that fails while the current token still works, keep using it."""
        try:
            new = await self._refresh()
        except OAuthStateError:
            raise
        except UpstreamError as e:
            if not self._usable(tokens):
                raise
            self._note_early_failure(tokens, e)
        else:
            tokens = new
        assert tokens.access is not None
        return tokens.access

    def _note_early_failure(self, tokens: _Tokens, error: UpstreamError) -> None:
        self.last_error = str(error)
        now = self._clock()
        left = (tokens.expires_at or now) - now
        # A refused grant stays refused: try again only once the token has expired.
        wait = left if isinstance(error, AuthError) else min(_EARLY_RETRY, left / 4)
        self._early_retry_at = now + max(wait, 0.0)
        log.warning(
            "early OAuth token refresh failed; the current token is valid for %.0fs more: %s",
            left,
            error,
        )

    # ---- refreshing ------------------------------------------------------------------------

    async def _refresh(self, refused: Secret | None = None) -> _Tokens:
        """One refresh grant, under the lock file; the rotated token is saved before use."""
        async with self._file_lock():
            tokens = self._adopt_saved(refused)
            if self._fresh(tokens) and tokens.access != refused:
                return tokens  # another process (or instance) refreshed meanwhile
            new = await self._grant(tokens.refresh)
            self._tokens, self._unsaved = new, True
            self.refreshes += 1
            self.last_error, self._early_retry_at = None, 0.0
            for value in (new.access, new.refresh):
                if value is not None and self._on_secret is not None:
                    self._on_secret(value.reveal())
            self._save()
        log.info("OAuth access token refreshed (valid for %ss)", _seconds(new.lifetime))
        return new

    def _adopt_saved(self, refused: Secret | None) -> _Tokens:
        """What the state file holds, if another process or instance rotated since we read."""
        tokens = self._current()
        if self._unsaved:
            return tokens  # ours is newer than anything on disk
        saved = self._load(quiet=True)
        if saved.refresh != tokens.refresh:
            if saved.access is not None and saved.access == refused:
                saved.access = None
            self._tokens = tokens = saved
        return tokens

    async def _grant(self, refresh: Secret) -> _Tokens:
        form = {
            "grant_type": "refresh_token",
            "client_id": self._config.client_id,
            "client_secret": self._config.client_secret.reveal(),
            "refresh_token": refresh.reveal(),
        }
        started = self._clock()
        headers = {"User-Agent": f"mirrord/{__version__}", "Accept": "application/json"}
        try:
            async with (
                asyncio.timeout(self._total),
                aiohttp.ClientSession(timeout=self._timeout, headers=headers) as session,
                session.post(self._config.token_url, data=form, allow_redirects=False) as resp,
            ):
                answer = _Answer(
                    resp.status,
                    resp.headers.get("Content-Type", "").lower(),
                    await resp.read(),
                    _retry_after(resp.headers.get("Retry-After")),
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._transport_error(e) from None
        return self._parse(answer, refresh, started)

    def _transport_error(self, error: BaseException) -> UpstreamError:
        where = self._where
        if isinstance(error, TimeoutError):
            total = self._total
            return UpstreamUnavailable(
                f"OAuth token endpoint {where} did not answer within {total:g}s"
            )
        if isinstance(error, aiohttp.ClientPayloadError):
            return BadAnswer(f"OAuth token endpoint {where} cut the answer off mid-way")
        if isinstance(error, aiohttp.ClientConnectorError):
            reason = error.os_error.strerror or type(error.os_error).__name__
            return UpstreamUnavailable(f"cannot reach OAuth token endpoint {where}: {reason}")
        return UpstreamUnavailable(
            f"OAuth token endpoint {where} request failed ({type(error).__name__})"
        )

    def _parse(self, answer: _Answer, refresh: Secret, started: float) -> _Tokens:
        where, status = self._where, answer.status
        if status == 429:
            message = f"OAuth token endpoint {where} is rate limiting (HTTP 429)"
            raise RateLimited(message, answer.retry_after)
        if status >= 500:
            raise UpstreamServerError(f"OAuth token endpoint {where} failed (HTTP {status})")
        if 300 <= status < 400:
            # Not followed: that would hand the client secret to whoever redirects.
            raise BadAnswer(
                f"OAuth token endpoint {where} redirected elsewhere (HTTP {status}): "
                "a captive portal or proxy in the way?"
            )
        if status == 404:
            raise AuthError(
                f"OAuth token endpoint {where} does not exist (HTTP 404): "
                "check [upstream.oauth] token_url",
                status,
            )
        body = answer.json_object(where)
        if status != 200:
            raise self._refusal(status, body.get("error"))
        return _tokens_from(body, refresh, started, where)

    def _refusal(self, status: int, code: object) -> AuthError:
        where = self._where
        code = code if isinstance(code, str) and code.isidentifier() and len(code) < 40 else None
        if code == "invalid_grant":
            return RefreshTokenRejected(
                f"OAuth token endpoint {where} refused the refresh token (invalid_grant: "
                "expired, revoked or already used): put a fresh refresh token in the config "
                "([upstream.oauth] refresh_token, refresh_token_file or refresh_token_env) "
                "and restart mirrord",
                status,
            )
        if code == "invalid_client" or status == 401:
            return AuthError(
                f"OAuth token endpoint {where} refused the client credentials "
                f"(HTTP {status}{f' {code}' if code else ''}): check [upstream.oauth] "
                "client_id and client_secret",
                status,
            )
        return AuthError(
            f"OAuth token endpoint {where} refused the refresh (HTTP {status}"
            f"{f' {code}' if code else ''})",
            status,
        )

    # ---- the state file ----------------------------------------------------------------------

    def _load(self, *, quiet: bool = False) -> _Tokens:
        """The saved tokens if they grew from the configured seed, else the seed itself."""
        saved = self._read_state()
        seed = _Tokens(refresh=self._config.refresh_token)
        if saved is None:
            return seed
        if (
            saved.get("version") != _STATE_VERSION
            or saved.get("seed_sha256") != self._seed_hash
            or saved.get("client_id") != self._config.client_id
            or saved.get("token_url") != self._config.token_url
        ):
            if not quiet:
                log.info("the configured OAuth refresh token is new: starting from it")
            return seed
        try:
            tokens = _tokens_from_state(saved)
        except (TypeError, ValueError):
            log.warning("%s is not a valid state file; starting from the config", self.state_path)
            return seed
        if self._on_secret is not None:
            for value in (tokens.refresh, tokens.access):
                if value is not None:
                    self._on_secret(value.reveal())
        return tokens

    def _read_state(self) -> dict[str, Any] | None:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OAuthStateError(
                f"cannot read the OAuth state file {self.state_path}: {_os_problem(e)}"
            ) from None
        try:
            saved = json.loads(data)
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            log.warning("%s is not a valid state file; starting from the config", self.state_path)
            return None
        return saved

    def _save(self) -> None:
        tokens = self._current()
        state = {
            "version": _STATE_VERSION,
            "client_id": self._config.client_id,
            "token_url": self._config.token_url,
            "seed_sha256": self._seed_hash,
            "refresh_token": tokens.refresh.reveal(),
            "access_token": None if tokens.access is None else tokens.access.reveal(),
            "expires_at": tokens.expires_at,
            "lifetime": tokens.lifetime,
            "scope": tokens.scope,
            "saved_at": self._clock(),
        }
        try:
            write_private_atomic(self.state_path, json.dumps(state, indent=1).encode() + b"\n")
        except OSError as e:
            raise OAuthStateError(
                f"cannot save the new OAuth refresh token in {self.state_path}: "
                f"{_os_problem(e)}; mirrord keeps it in memory only, and loses access for good "
                "if it stops before this is fixed"
            ) from None
        self._unsaved = False

    def _save_pending(self) -> None:
        if self._unsaved:
            self._save()

    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """Exclusive across processes (and instances: flock is per open file), polled so that
        the event loop never blocks on it."""
        try:
            self._lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OAuthStateError(
                f"cannot open the OAuth lock file {self._lock_path}: {_os_problem(e)}"
            ) from None
        try:
            await self._acquire(fd)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self._total + 10.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OAuthStateError(
                        f"another mirrord process holds {self._lock_path} for too long"
                    ) from None
                await asyncio.sleep(_LOCK_POLL)


@dataclass(frozen=True)
class _Answer:
    """A token endpoint answer, read in full."""

    status: int
    content_type: str
    raw: bytes
    retry_after: float | None

    def json_object(self, where: str) -> dict[str, Any]:
        if len(self.raw) > _MAX_ANSWER:
            raise BadAnswer(f"OAuth token endpoint {where} answered with a far too large body")
        if "html" in self.content_type or self.raw.lstrip()[:1] == b"<":
            raise BadAnswer(
                f"OAuth token endpoint {where} answered with an HTML page (HTTP {self.status}), "
                "not JSON: a captive portal or proxy in the way?"
            )
        try:
            body = json.loads(self.raw)
        except ValueError:
            raise BadAnswer(
                f"OAuth token endpoint {where} answered with invalid JSON (HTTP {self.status})"
            ) from None
        if not isinstance(body, dict):
            raise ProtocolError(f"OAuth token endpoint {where} answered with a non-object")
        return body


def _tokens_from(body: dict[str, Any], refresh: Secret, started: float, where: str) -> _Tokens:
    """A successful grant answer; a server that does not rotate keeps the old refresh token."""
    access = body.get("access_token")
    if not _is_token(access):
        raise ProtocolError(f"OAuth token endpoint {where} answered without a usable access_token")
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ProtocolError(f"OAuth token endpoint {where} answered with a non-Bearer token")
    new_refresh = body.get("refresh_token")
    if new_refresh is not None and not _is_token(new_refresh):
        raise ProtocolError(f"OAuth token endpoint {where} answered with a bad refresh_token")
    lifetime = _lifetime(body.get("expires_in"))
    scope = body.get("scope")
    return _Tokens(
        refresh=refresh if new_refresh is None else Secret(new_refresh),
        access=Secret(access),
        # Our clock at the request, not the server's created_at: the laptop's clock may be off,
        # and starting the count early only makes the refresh early.
        expires_at=None if lifetime is None else started + lifetime,
        lifetime=lifetime,
        scope=scope if isinstance(scope, str) else None,
    )


def _tokens_from_state(saved: dict[str, Any]) -> _Tokens:
    refresh, access = saved.get("refresh_token"), saved.get("access_token")
    if not _is_token(refresh) or (access is not None and not _is_token(access)):
        raise ValueError("bad token in state")
    expires_at, lifetime = saved.get("expires_at"), _lifetime(saved.get("lifetime"))
    if expires_at is not None and not math.isfinite(float(expires_at)):
        raise ValueError("bad expiry in state")
    return _Tokens(
        refresh=Secret(refresh),
        access=None if access is None else Secret(access),
        expires_at=None if expires_at is None or lifetime is None else float(expires_at),
        lifetime=lifetime,
        scope=saved.get("scope") if isinstance(saved.get("scope"), str) else None,
    )


def _is_token(value: object) -> TypeGuard[str]:
    # It goes into a header: anything else would break the request or smuggle a header in.
    return (
        isinstance(value, str)
        and 0 < len(value) <= 4096
        and value.isascii()
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


def _lifetime(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 < value < _MAX_LIFETIME:  # NaN and infinity too: they would defeat the margin
        return None  # unknown lifetime: no early refresh, a 401 ends the token
    return float(value)


def _margin(lifetime: float) -> float:
    wanted = max(lifetime * _MARGIN_FRACTION, _MIN_MARGIN)
    return min(wanted, lifetime * _MAX_MARGIN_FRACTION)


def _sha256(secret: Secret) -> str:
    return hashlib.sha256(secret.reveal().encode()).hexdigest()


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _os_problem(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied (the mirrord service user must own storage.state_dir)"
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    return (error.strerror or type(error).__name__).lower()


def token_provider(
    config: UpstreamConfig,
    state_dir: Path,
    *,
    on_secret: Callable[[str], None] | None = None,
) -> TokenProvider:
    """The provider the config asks for: OAuth2 (state in `state_dir`) or a static token.

    `on_secret` is called with every token value OAuth obtains or loads (e.g. to keep it out of
    logs); the config's own secrets are the caller's to register."""
    if config.oauth is not None:
        return OAuthTokens(config.oauth, state_dir, timeout=config.timeout, on_secret=on_secret)
    if config.token is None:
        raise ValueError("the upstream config has neither a token nor [upstream.oauth]")
    return StaticToken(config.token)
