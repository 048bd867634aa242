"""mirrord.auth (OAuth2 tokens) against the fake upstream over real sockets, the [upstream.oauth]
config, and `mirrord sync` with OAuth end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mirrord import auth
from mirrord.auth import (
    STATE_FILE,
    OAuthStateError,
    OAuthTokens,
    RefreshTokenRejected,
    token_provider,
)
from mirrord.config import Config, ConfigError, OAuthConfig, Secret, load_config, loads_config
from mirrord.durable import write_private_atomic
from mirrord.fake_upstream import FakeData, FakeOAuth, FakeUpstream
from mirrord.upstream import (
    SYNC_IMAGES,
    AuthError,
    BadAnswer,
    ProtocolError,
    RateLimited,
    RetryPolicy,
    StaticToken,
    UpstreamClient,
    UpstreamServerError,
    UpstreamUnavailable,
)
from tests.conftest import wait_for

CLIENT_ID = "mirrord-test-client"
# Distinctive and long, so that any leak is unambiguous when grepped for.
CLIENT_SECRET = "client-secret-Q7w9Zx31-never-shown"
SEED = "seed-refresh-token-Hq2Lp0-never-shown"
CFG = Path("/etc/mirrord/mirrord.toml")


class Clock:
    """A wall clock the test moves by hand (the client's only; the fake keeps real time)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def oauth_fake() -> AsyncIterator[FakeUpstream]:
    data = FakeData(seed=3)
    data.add_survey(n_images=20)
    oauth = FakeOAuth(CLIENT_ID, CLIENT_SECRET, SEED, expires_in=3600)
    async with FakeUpstream(data, token="static-unused-token-xyz", oauth=oauth) as server:
        yield server


def the_oauth(fake: FakeUpstream) -> FakeOAuth:
    assert fake.oauth is not None
    return fake.oauth


def oauth_config(
    fake: FakeUpstream, seed: str = SEED, secret: str = CLIENT_SECRET, url: str | None = None
) -> OAuthConfig:
    return OAuthConfig(
        client_id=CLIENT_ID,
        client_secret=Secret(secret),
        refresh_token=Secret(seed),
        token_url=url or f"{fake.base}/oauth/token",
    )


def tokens_for(fake: FakeUpstream, state_dir: Path, **options: Any) -> OAuthTokens:
    config = options.pop("config", None) or oauth_config(fake)
    return OAuthTokens(config, state_dir, timeout=5.0, **options)


def client(fake: FakeUpstream, tokens: OAuthTokens) -> UpstreamClient:
    retry = RetryPolicy(max_attempts=3, base=0.01, cap=0.05)
    return UpstreamClient(fake.url, tokens, timeout=5.0, retry=retry)


async def sync_once(fake: FakeUpstream, tokens: OAuthTokens) -> None:
    survey = fake.data.survey_ids()[0]
    async with client(fake, tokens) as upstream:
        answer = await upstream.sync_page(SYNC_IMAGES, survey, [])
    assert answer.upserted


def saved(state_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
    return result


def all_secrets(fake: FakeUpstream) -> list[str]:
    oauth = the_oauth(fake)
    return [CLIENT_SECRET, SEED, oauth.refresh_token, *oauth.issued]


def assert_no_secret(text: str, fake: FakeUpstream) -> None:
    for secret in all_secrets(fake):
        assert secret not in text


# --------------------------------------------------------------------------- first use, state


async def test_first_token_comes_from_the_seed_and_the_rotation_is_saved(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    tokens = tokens_for(oauth_fake, tmp_path / "state")
    access = await tokens.token()
    oauth = the_oauth(oauth_fake)
    assert oauth.refreshes == 1 and access.reveal() == oauth.issued[-1]
    state = saved(tmp_path / "state")
    assert state["refresh_token"] == oauth.refresh_token != SEED
    assert state["seed_sha256"] == hashlib.sha256(SEED.encode()).hexdigest()
    mode = stat.S_IMODE((tmp_path / "state" / STATE_FILE).stat().st_mode)
    assert mode == 0o600
    text = (tmp_path / "state" / STATE_FILE).read_text()
    assert SEED not in text and CLIENT_SECRET not in text
    # No temp file left behind; the neighbours (the lock file) hold no secret.
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == sorted([auth.LOCK_FILE, STATE_FILE])
    assert_no_secret((tmp_path / "state" / auth.LOCK_FILE).read_text(), oauth_fake)
    await sync_once(oauth_fake, tokens)
    assert oauth.refreshes == 1


async def test_restart_reuses_the_saved_tokens(oauth_fake: FakeUpstream, tmp_path: Path) -> None:
    oauth = the_oauth(oauth_fake)
    first = await tokens_for(oauth_fake, tmp_path).token()
    # A new process: the saved access token is still good, so no refresh at all...
    again = tokens_for(oauth_fake, tmp_path)
    assert await again.token() == first and oauth.refreshes == 1
    # ...and once it is refused, the ROTATED refresh token is used (the seed is void by now).
    oauth.revoke_access_tokens()
    await sync_once(oauth_fake, again)
    assert oauth.refreshes == 2
    assert saved(tmp_path)["refresh_token"] == oauth.refresh_token
    oauth.revoke_access_tokens()
    await sync_once(oauth_fake, tokens_for(oauth_fake, tmp_path))
    assert oauth.refreshes == 3
    assert [r.error for r in oauth.requests] == [None, None, None]


async def test_restart_after_expiry_refreshes_with_the_rotated_token(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    clock = Clock()
    await tokens_for(oauth_fake, tmp_path, clock=clock).token()
    clock.now += 7200  # the laptop slept past the access token's lifetime
    later = tokens_for(oauth_fake, tmp_path, clock=clock)
    await later.token()
    assert the_oauth(oauth_fake).refreshes == 2
    assert all(r.status == 200 for r in the_oauth(oauth_fake).requests)


async def test_a_new_seed_in_the_config_wins(oauth_fake: FakeUpstream, tmp_path: Path) -> None:
    oauth = the_oauth(oauth_fake)
    await tokens_for(oauth_fake, tmp_path).token()
    # The admin issues a fresh refresh token for a locked-out laptop and puts it in the config.
    oauth.refresh_token = "admin-issued-refresh-token-Zt81"
    fresh = tokens_for(
        oauth_fake, tmp_path, config=oauth_config(oauth_fake, seed=oauth.refresh_token)
    )
    await fresh.token()
    assert oauth.refreshes == 2 and oauth.requests[-1].status == 200
    state = saved(tmp_path)
    assert state["seed_sha256"] == hashlib.sha256(b"admin-issued-refresh-token-Zt81").hexdigest()
    assert state["refresh_token"] == oauth.refresh_token


async def test_a_bad_new_seed_leaves_the_saved_state_alone(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    await tokens_for(oauth_fake, tmp_path).token()
    before = (tmp_path / STATE_FILE).read_bytes()
    typo = tokens_for(oauth_fake, tmp_path, config=oauth_config(oauth_fake, seed="typo-seed-123"))
    with pytest.raises(RefreshTokenRejected):
        await typo.token()
    assert (tmp_path / STATE_FILE).read_bytes() == before
    # Putting the original seed back finds the saved (rotated) state again.
    the_oauth(oauth_fake).revoke_access_tokens()
    await sync_once(oauth_fake, tokens_for(oauth_fake, tmp_path))


async def test_a_corrupt_state_file_falls_back_to_the_seed(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    await tokens_for(oauth_fake, tmp_path).token()
    assert saved(tmp_path)["refresh_token"] == the_oauth(oauth_fake).refresh_token


# --------------------------------------------------------------------------- when to refresh


async def test_refreshes_before_expiry_not_before_the_margin(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    clock, oauth = Clock(), the_oauth(oauth_fake)
    tokens = tokens_for(oauth_fake, tmp_path, clock=clock)
    first = await tokens.token()
    # 3600 s lifetime: the margin is max(10%, 5 min) = 360 s.
    clock.now += 3600 - 361
    assert await tokens.token() == first and oauth.refreshes == 1
    clock.now += 2
    second = await tokens.token()
    assert second != first and oauth.refreshes == 2
    assert oauth.accepts(first.reveal())  # refreshed while the old one was still good


async def test_short_lifetimes_cause_no_refresh_storm(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    clock, oauth = Clock(), the_oauth(oauth_fake)
    oauth.expires_in = 2  # far below the 5-minute margin: still used for half its lifetime
    tokens = tokens_for(oauth_fake, tmp_path, clock=clock)
    for _ in range(50):
        await tokens.token()
        clock.now += 0.019
    assert oauth.refreshes == 1
    clock.now += 0.1
    await tokens.token()
    assert oauth.refreshes == 2


async def test_proactive_refresh_over_real_time_never_meets_a_401(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    oauth = the_oauth(oauth_fake)
    oauth.expires_in = 2  # refreshed when 1 s old: a request would have to take 1 s to see a 401
    tokens = tokens_for(oauth_fake, tmp_path)

    async def refreshed_three_times() -> bool:
        await sync_once(oauth_fake, tokens)
        return oauth.refreshes >= 3

    await wait_for(refreshed_three_times, timeout=15, interval=0.05)
    assert all(r.status == 200 for r in oauth_fake.requests)


async def test_refreshes_on_401_when_the_server_expired_the_token(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    oauth = the_oauth(oauth_fake)
    oauth.expires_in = 1
    # The client's clock stands still: it believes the token is fresh (a wrong laptop clock).
    tokens = tokens_for(oauth_fake, tmp_path, clock=Clock())
    await sync_once(oauth_fake, tokens)
    first = oauth.issued[-1]
    await wait_for(lambda: not oauth.accepts(first), timeout=5)
    await sync_once(oauth_fake, tokens)
    assert oauth.refreshes == 2
    assert [r.status for r in oauth_fake.requests] == [200, 401, 200]


async def test_refreshes_on_401_when_the_server_revoked_the_token(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    tokens = tokens_for(oauth_fake, tmp_path)
    await sync_once(oauth_fake, tokens)
    the_oauth(oauth_fake).revoke_access_tokens()
    await sync_once(oauth_fake, tokens)
    assert the_oauth(oauth_fake).refreshes == 2


async def test_a_refused_fresh_token_ends_the_request_after_one_refresh(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    oauth = the_oauth(oauth_fake)
    oauth.expires_in = 0  # every access token is dead on arrival (and no lifetime is announced)
    tokens = tokens_for(oauth_fake, tmp_path)
    # At most one refresh per refused request: no loop, no storm.
    for refreshes in (2, 3):  # the first request also makes the first token from the seed
        with pytest.raises(AuthError) as info:
            await sync_once(oauth_fake, tokens)
        assert info.value.status == 401
        assert oauth.refreshes == refreshes


async def test_rejected_refreshes_once_per_token(oauth_fake: FakeUpstream, tmp_path: Path) -> None:
    tokens = tokens_for(oauth_fake, tmp_path)
    first = await tokens.token()
    assert await tokens.rejected(first)
    assert await tokens.rejected(first)  # already replaced: try the new one, no new refresh
    assert the_oauth(oauth_fake).refreshes == 2
    assert await tokens.token() != first


async def test_concurrent_callers_share_one_refresh(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    oauth = the_oauth(oauth_fake)
    tokens = tokens_for(oauth_fake, tmp_path)
    got = await asyncio.gather(*(tokens.token() for _ in range(20)))
    assert len(set(got)) == 1 and oauth.refreshes == 1
    answers = await asyncio.gather(*(tokens.rejected(got[0]) for _ in range(20)))
    assert all(answers) and oauth.refreshes == 2
    oauth.revoke_access_tokens()
    async with client(oauth_fake, tokens) as upstream:
        survey = oauth_fake.data.survey_ids()[0]
        pages = [upstream.sync_page(SYNC_IMAGES, survey, []) for _ in range(10)]
        await asyncio.gather(*pages)
    assert oauth.refreshes == 3


async def test_another_instance_rotation_is_adopted_not_replayed(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    """Two providers on one state dir (a config reload, a second process): when one rotates,
    the other must pick the new token up rather than replay the void one (invalid_grant)."""
    oauth = the_oauth(oauth_fake)
    a, b = tokens_for(oauth_fake, tmp_path), tokens_for(oauth_fake, tmp_path)
    old = await a.token()
    assert await b.token() == old
    oauth.revoke_access_tokens()
    await sync_once(oauth_fake, a)  # a rotates
    await sync_once(oauth_fake, b)  # b is refused with the old token, finds a's new one
    assert oauth.refreshes == 2 and all(r.status == 200 for r in oauth.requests)
    oauth.revoke_access_tokens()
    await sync_once(oauth_fake, b)  # and b can rotate on from there
    await sync_once(oauth_fake, a)
    assert all(r.status == 200 for r in oauth.requests)


# --------------------------------------------------------------------------- failures


async def test_invalid_grant_says_what_to_do(oauth_fake: FakeUpstream, tmp_path: Path) -> None:
    tokens = tokens_for(oauth_fake, tmp_path, config=oauth_config(oauth_fake, seed="void-seed-1"))
    with pytest.raises(RefreshTokenRejected) as info:
        await tokens.token()
    error = info.value
    assert isinstance(error, AuthError) and not error.retryable and error.status == 400
    message = str(error)
    assert "\n" not in message and "invalid_grant" in message
    assert "put a fresh refresh token in the config" in message and "[upstream.oauth]" in message
    assert "void-seed-1" not in message and CLIENT_SECRET not in message
    assert not (tmp_path / STATE_FILE).exists()


async def test_bad_client_credentials(oauth_fake: FakeUpstream, tmp_path: Path) -> None:
    config = oauth_config(oauth_fake, secret="wrong-client-secret-77")
    with pytest.raises(AuthError) as info:
        await tokens_for(oauth_fake, tmp_path, config=config).token()
    assert not isinstance(info.value, RefreshTokenRejected)
    assert info.value.status == 401 and "client_id and client_secret" in str(info.value)
    assert "wrong-client-secret-77" not in str(info.value)
    assert the_oauth(oauth_fake).refresh_token == SEED  # nothing was used up


async def test_network_failure_while_refreshing_is_retryable(
    oauth_fake: FakeUpstream, tmp_path: Path
) -> None:
    oauth = the_oauth(oauth_fake)
    oauth.offline = True
    tokens = tokens_for(oauth_fake, tmp_path)
    with pytest.raises(UpstreamUnavailable) as info:
        await tokens.token()
    assert info.value.retryable
    # Through the client, the retry policy retries it; once the link is back it succeeds.
    oauth.offline = False
    await sync_once(oauth_fake, tokens)
    closed = OAuthTokens(oauth_config(oauth_fake, url="http://127.0.0.1:9/oauth/token"), tmp_path)
    with pytest.raises(UpstreamUnavailable, match="cannot reach OAuth token endpoint"):
        await closed.token()


async def test_a_failed_early_refresh_keeps_the_valid_token(
    oauth_fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock, oauth = Clock(), the_oauth(oauth_fake)
    tokens = tokens_for(oauth_fake, tmp_path, clock=clock)
    first = await tokens.token()
    clock.now += 3500  # inside the margin, not expired
    oauth.offline = True
    assert await tokens.token() == first
    assert tokens.last_error is not None and "OAuth token endpoint" in tokens.last_error
    attempts = len(oauth.requests)
    assert await tokens.token() == first and len(oauth.requests) == attempts  # backing off
    oauth.offline = False
    clock.now += 31
    assert await tokens.token() != first and tokens.last_error is None
    clock.now += 3600  # expired, and the endpoint is down: now it is an error
    oauth.offline = True
    with pytest.raises(UpstreamUnavailable):
        await tokens.token()
    assert_no_secret(caplog.text, oauth_fake)


async def test_a_save_failure_is_loud_and_the_token_is_kept_in_memory(
    oauth_fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth, "write_private_atomic", disk_full)
    tokens = tokens_for(oauth_fake, tmp_path)
    with pytest.raises(OAuthStateError) as info:
        await tokens.token()
    assert "no space left" in str(info.value) and not info.value.retryable
    assert_no_secret(str(info.value), oauth_fake)
    with pytest.raises(OAuthStateError):
        await tokens.token()  # still unsaved: still refusing to carry on silently
    monkeypatch.undo()
    await tokens.token()
    oauth = the_oauth(oauth_fake)
    assert oauth.refreshes == 1 and saved(tmp_path)["refresh_token"] == oauth.refresh_token


def test_write_private_atomic_never_leaves_a_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state" / "f.json"
    old_umask = os.umask(0)  # even a permissive umask gets 0600
    try:
        write_private_atomic(path, b"old")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def crash(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_private_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


class TokenServer:
    """A bare token endpoint whose next answer the test chooses."""

    def __init__(self) -> None:
        self.answer: Callable[[], web.Response] = lambda: web.json_response({})
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.post()
        self.calls += 1
        return self.answer()

    async def __aenter__(self) -> TokenServer:
        app = web.Application()
        app.router.add_post("/oauth/token", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/oauth/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def _json(body: object, status: int = 200, **headers: str) -> Callable[[], web.Response]:
    return lambda: web.json_response(body, status=status, headers=headers)


@pytest.mark.parametrize(
    ("answer", "error", "retryable"),
    [
        (_json({}, 500), UpstreamServerError, True),
        (
            lambda: web.Response(status=302, headers={"Location": "http://portal.example/"}),
            BadAnswer,
            True,
        ),
        (lambda: web.Response(text="<html>no</html>", status=404), AuthError, False),
        (_json({}, 429, **{"Retry-After": "3"}), RateLimited, True),
        (
            lambda: web.Response(text="<html>login</html>", content_type="text/html"),
            BadAnswer,
            True,
        ),
        (lambda: web.Response(text="{cut", content_type="application/json"), BadAnswer, True),
        (_json(["a"]), ProtocolError, False),
        (_json({"token_type": "Bearer"}), ProtocolError, False),
        (_json({"access_token": "a b"}), ProtocolError, False),
        (_json({"access_token": "abc", "token_type": "mac"}), ProtocolError, False),
        (_json({"access_token": "abc", "refresh_token": 5}), ProtocolError, False),
        (_json({"error": "invalid_scope"}, 400), AuthError, False),
        (_json({"error": "invalid_client"}, 400), AuthError, False),
    ],
)
async def test_token_endpoint_answers_are_classified(
    tmp_path: Path, answer: Callable[[], web.Response], error: type[Exception], retryable: bool
) -> None:
    async with TokenServer() as server:
        server.answer = answer
        config = OAuthConfig(CLIENT_ID, Secret(CLIENT_SECRET), Secret(SEED), server.url)
        with pytest.raises(error) as info:
            await OAuthTokens(config, tmp_path, timeout=5).token()
    assert getattr(info.value, "retryable", None) is retryable
    assert "\n" not in str(info.value) and SEED not in str(info.value)
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 3.0


async def test_a_server_that_does_not_rotate_keeps_the_refresh_token(tmp_path: Path) -> None:
    async with TokenServer() as server:
        server.answer = _json({"access_token": "access-1", "expires_in": 7200})
        config = OAuthConfig(CLIENT_ID, Secret(CLIENT_SECRET), Secret(SEED), server.url)
        assert (await OAuthTokens(config, tmp_path, timeout=5).token()).reveal() == "access-1"
    assert saved(tmp_path)["refresh_token"] == SEED


@pytest.mark.parametrize("expires_in", [None, 0, -5, "7200", True, 1e400, float("nan")])
async def test_a_senseless_lifetime_means_no_early_refresh(
    tmp_path: Path, expires_in: object
) -> None:
    async with TokenServer() as server:
        body = json.dumps({"access_token": "access-1", "expires_in": expires_in})
        server.answer = lambda: web.Response(text=body, content_type="application/json")
        config = OAuthConfig(CLIENT_ID, Secret(CLIENT_SECRET), Secret(SEED), server.url)
        tokens = OAuthTokens(config, tmp_path, timeout=5)
        for _ in range(5):
            await tokens.token()
        assert server.calls == 1
        assert await OAuthTokens(config, tmp_path, timeout=5).token() == Secret("access-1")
        assert server.calls == 1


# --------------------------------------------------------------------------- no secret leaks


async def test_no_secret_in_reprs_logs_or_the_state_dir(
    oauth_fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    registered: list[str] = []
    tokens = tokens_for(oauth_fake, tmp_path, on_secret=registered.append)
    await sync_once(oauth_fake, tokens)
    the_oauth(oauth_fake).revoke_access_tokens()
    await sync_once(oauth_fake, tokens)
    oauth = the_oauth(oauth_fake)
    assert set(oauth.issued) | {oauth.refresh_token} <= set(registered)
    shown = [repr(tokens), str(tokens), repr(oauth_config(oauth_fake)), caplog.text]
    for text in shown:
        assert_no_secret(text, oauth_fake)
    for path in tmp_path.iterdir():
        if path.name != STATE_FILE:
            assert_no_secret(path.read_text(errors="replace"), oauth_fake)


# --------------------------------------------------------------------------- the config

OAUTH = (
    '[upstream]\nurl = "http://127.0.0.1:8080/graphql"\n'
    "[upstream.oauth]\n"
    'client_id = "cid"\n'
    f'client_secret = "{CLIENT_SECRET}"\n'
    f'refresh_token = "{SEED}"\n'
)


def load(text: str, env: dict[str, str] | None = None, path: Path = CFG) -> Config:
    return loads_config(text, path, env={} if env is None else env)


def oauth_of(config: Config) -> OAuthConfig:
    assert config.upstream.oauth is not None
    return config.upstream.oauth


def token_of(config: Config) -> str:
    assert config.upstream.token is not None
    return config.upstream.token.reveal()


def fail(text: str, env: dict[str, str] | None = None, path: Path = CFG) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, env, path)
    shown = f"{info.value} {info.value!r}"
    assert "\n" not in str(info.value)
    for secret in (CLIENT_SECRET, SEED, "env-secret-value-123"):
        assert secret not in shown
    return info.value


def test_oauth_config_loads_with_defaults() -> None:
    config = load(OAUTH)
    up = config.upstream
    assert up.token is None and up.oauth is not None
    assert up.oauth.client_id == "cid"
    assert up.oauth.client_secret == Secret(CLIENT_SECRET)
    assert up.oauth.refresh_token == Secret(SEED)
    assert up.oauth.token_url == "http://127.0.0.1:8080/oauth/token"
    assert config.storage.state_dir == Path("/var/lib/mirrord")
    assert CLIENT_SECRET not in repr(config) and SEED not in repr(config)
    assert isinstance(token_provider(up, config.storage.state_dir), OAuthTokens)
    static = load('[upstream]\ntoken = "tok-123"\n').upstream
    assert isinstance(token_provider(static, Path("/x")), StaticToken)


def test_oauth_secrets_from_files_env_and_token_url(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(f"{CLIENT_SECRET}\n")
    text = (
        '[upstream]\n[upstream.oauth]\nclient_id = "cid"\nclient_secret_file = "secret"\n'
        'refresh_token_env = "SEED"\ntoken_url = "https://auth.example/o/token"\n'
        '[storage]\npath = "db/m.db"\nstate_dir = "state"\n'
    )
    config = load(text, {"SEED": f" {SEED}\n"}, path=tmp_path / "m.toml")
    oauth = oauth_of(config)
    assert oauth.client_secret.reveal() == CLIENT_SECRET
    assert oauth.refresh_token.reveal() == SEED
    assert oauth.token_url == "https://auth.example/o/token"
    assert config.storage.state_dir == tmp_path / "state"
    default_dir = load(
        text.replace('state_dir = "state"\n', ""), {"SEED": SEED}, tmp_path / "m.toml"
    )
    assert default_dir.storage.state_dir == tmp_path / "db"


def test_systemd_credentials_fill_absent_secrets(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mirrord-client-secret").write_text(CLIENT_SECRET)
    (creds / "mirrord-refresh-token").write_text(SEED + "\n")
    (creds / "mirrord-token").write_text("static-from-credential")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    oauth = oauth_of(load('[upstream.oauth]\nclient_id = "cid"\n', env))
    assert oauth.client_secret.reveal() == CLIENT_SECRET and oauth.refresh_token.reveal() == SEED
    assert token_of(load("", env)) == "static-from-credential"
    # A key in the file always wins over a credential.
    assert token_of(load('[upstream]\ntoken = "explicit"\n', env)) == "explicit"
    (creds / "mirrord-refresh-token").write_text("\n")
    error = fail('[upstream.oauth]\nclient_id = "cid"\n', env)
    assert error.key == "upstream.oauth.refresh_token"
    assert f"systemd credential {creds}/mirrord-refresh-token is empty" in str(error)
    (creds / "mirrord-token").unlink()
    assert "systemd credential named mirrord-token" in str(fail("", env))
    # Without $CREDENTIALS_DIRECTORY nothing is looked up.
    assert "no OAuth client secret configured" in str(fail('[upstream.oauth]\nclient_id = "c"\n'))


@pytest.mark.parametrize(
    ("text", "env", "line", "key", "expect"),
    [
        (
            '[upstream]\ntoken = "tok-123"\n[upstream.oauth]\nclient_id = "c"\n',
            {},
            3,
            "upstream.oauth",
            "conflicts with upstream.token (use either a static token or [upstream.oauth]",
        ),
        (
            OAUTH.replace('client_id = "cid"\n', ""),
            {},
            3,
            "upstream.oauth.client_id",
            "missing ([upstream.oauth] needs client_id = ...)",
        ),
        (OAUTH.replace('"cid"', '" c "'), {}, 4, "upstream.oauth.client_id", "contains spaces"),
        (OAUTH.replace('"cid"', "5"), {}, 4, "upstream.oauth.client_id", "expected a string"),
        (
            OAUTH.replace(f'client_secret = "{CLIENT_SECRET}"\n', ""),
            {},
            3,
            "upstream.oauth.client_secret",
            "no OAuth client secret configured (set one of client_secret, client_secret_file or "
            "client_secret_env under [upstream.oauth]",
        ),
        (
            OAUTH + 'refresh_token_env = "T"\n',
            {"T": "env-secret-value-123"},
            7,
            "upstream.oauth.refresh_token_env",
            "conflicts with upstream.oauth.refresh_token (set exactly one of refresh_token, "
            "refresh_token_file, refresh_token_env)",
        ),
        (
            OAUTH.replace(f'refresh_token = "{SEED}"', 'refresh_token_env = "NOPE"'),
            {},
            6,
            "upstream.oauth.refresh_token_env",
            "environment variable NOPE is not set",
        ),
        (
            OAUTH.replace(f'refresh_token = "{SEED}"', 'refresh_token_env = "T"'),
            {"T": "env-secret-value-123 x"},
            6,
            "upstream.oauth.refresh_token_env",
            "contains spaces, line breaks or non-ASCII characters (OAuth refresh tokens are one",
        ),
        (
            OAUTH.replace(f'refresh_token = "{SEED}"', f'refresh_token = "{SEED} x"'),
            {},
            6,
            "upstream.oauth.refresh_token",
            "value contains spaces",
        ),
        (
            OAUTH.replace(f'client_secret = "{CLIENT_SECRET}"', 'client_secret_file = "/no/s"'),
            {},
            5,
            "upstream.oauth.client_secret_file",
            "cannot read client secret file /no/s: no such file",
        ),
        (
            OAUTH + 'token_url = "ftp://x/token"\n',
            {},
            7,
            "upstream.oauth.token_url",
            'must start with http:// or https:// (e.g. "https://api.sentera.com/oauth/token")',
        ),
        (OAUTH + 'client_secrte = "x"\n', {}, 7, "upstream.oauth.client_secrte", "did you mean"),
        (
            '[upstream]\nclient_id = "c"\n',
            {},
            2,
            "upstream.client_id",
            "did you mean upstream.oauth.client_id? it belongs under [upstream.oauth]",
        ),
        ("[upstream]\noauth = 1\n", {}, 2, "upstream.oauth", "expected a table ([upstream.oauth])"),
        (
            "[[upstream.oauth]]\nclient_id = 'c'\n",
            {},
            1,
            "upstream.oauth",
            "expected a table ([upstream.oauth]), got array",
        ),
        (
            '[upstream]\ntoken = "t"\n[storage]\nstate_dir = ""\n',
            {},
            4,
            "storage.state_dir",
            "empty",
        ),
        (
            '[upstream]\ntoken = "t"\n[storage]\nstate_dir = "~/s"\n',
            {},
            4,
            "storage.state_dir",
            "'~' is not expanded",
        ),
    ],
)
def test_oauth_config_errors(
    text: str, env: dict[str, str], line: int | None, key: str | None, expect: str
) -> None:
    error = fail(text, env)
    assert expect in str(error)
    assert (error.line, error.key) == (line, key)


def test_example_oauth_block_is_valid() -> None:
    example = (Path(__file__).resolve().parent.parent / "config.example.toml").read_text()
    text = re.sub(r"(?m)^token = .*$", "", example)
    text = text.replace("\n# [upstream.oauth]\n", "\n[upstream.oauth]\n")
    for name in ("client_id", "client_secret_env", "refresh_token_env"):
        text = re.sub(rf"(?m)^# ({name} = )", r"\1", text)
    env = {"MIRRORD_CLIENT_SECRET": CLIENT_SECRET, "MIRRORD_REFRESH_TOKEN": SEED}
    oauth = oauth_of(load(text, env))
    assert oauth.client_id == "REPLACE_WITH_YOUR_CLIENT_ID"
    assert oauth.token_url == "https://api.sentera.com/oauth/token"


# --------------------------------------------------------------------------- end to end


async def run_mirrord(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirrord",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.fixture
def subprocess_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env["MIRRORD_CLIENT_SECRET"] = CLIENT_SECRET
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    yield env


async def test_mirrord_sync_with_oauth_end_to_end(
    oauth_fake: FakeUpstream, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "seed").write_text(SEED + "\n")
    survey = oauth_fake.data.survey_ids()[0]
    config = tmp_path / "mirrord.toml"
    config.write_text(
        f'[upstream]\nurl = "{oauth_fake.url}"\ntimeout = "5s"\n'
        '[upstream.oauth]\nclient_id = "mirrord-test-client"\n'
        'client_secret_env = "MIRRORD_CLIENT_SECRET"\nrefresh_token_file = "seed"\n'
        '[storage]\npath = "data/mirror.db"\nstate_dir = "state"\n'
        f'[[surveys]]\nid = "{survey}"\n'
    )
    assert load_config(config, env=subprocess_env).upstream.oauth is not None
    oauth = the_oauth(oauth_fake)

    async def sync(expect_refreshes: int) -> None:
        code, output = await run_mirrord("sync", "-c", str(config), env=subprocess_env)
        assert code == 0, output
        assert "converged" in output
        assert_no_secret(output, oauth_fake)
        assert oauth.refreshes == expect_refreshes
        assert saved(tmp_path / "state")["refresh_token"] == oauth.refresh_token

    await sync(1)  # from the seed file; the rotated token is saved
    await sync(1)  # the saved access token is reused: no rotation per run
    oauth.revoke_access_tokens()
    await sync(2)  # 401 -> refresh with the saved (rotated) refresh token, not the void seed
    assert (tmp_path / "seed").read_text() == SEED + "\n"  # never written to
    mode = stat.S_IMODE((tmp_path / "state" / STATE_FILE).stat().st_mode)
    assert mode == 0o600
    # A void refresh token: exit 1 and the one-line instruction, no secret.
    (tmp_path / "state" / STATE_FILE).unlink()
    oauth.revoke_access_tokens()
    code, output = await run_mirrord("sync", "-c", str(config), env=subprocess_env)
    assert code == 1 and "put a fresh refresh token in the config" in output
    assert_no_secret(output, oauth_fake)
