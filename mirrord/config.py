"""Load and validate mirrord's single TOML configuration file.

Every key is declared once, in the per-section tables of ``SECTIONS``: unknown-key detection,
"did you mean" hints, defaults and the docs test (tests/test_config.py checks config.example.toml
against these tables) all follow from that one declaration.

Everything that can go wrong while loading becomes a one-line ``ConfigError`` naming the file,
the line where known, the dotted key, the problem and the fix: operators read these on a field
laptop's journal, so a traceback is a bug.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "SECTIONS",
    "Config",
    "ConfigError",
    "FieldConfig",
    "HttpConfig",
    "Key",
    "OAuthConfig",
    "Secret",
    "Section",
    "SettingError",
    "StorageConfig",
    "SurveyConfig",
    "SyncConfig",
    "UpstreamConfig",
    "is_loopback_host",
    "load_config",
    "loads_config",
    "parse_duration",
    "parse_size",
]

# Strings longer than this are never echoed in errors: a misplaced token is long, typos are short.
_MAX_SHOWN = 32
# Secrets shorter than this are not scrubbed from messages: replacing "ab" everywhere would mangle
# the message while protecting nothing.
_MIN_SCRUBBED = 4
# A token file larger than this is a wrong path (a log, a database), not a token.
_MAX_TOKEN_FILE = 64 * 1024
# Durations beyond this are typos, and would overflow the timers that later consume them.
_MAX_DURATION = 3650 * 86400.0

_DURATION_HELP = 'use integer seconds or e.g. "90s", "15m", "2h"'
_SIZE_HELP = 'use integer bytes or e.g. "500MB", "20GB", "1.5GiB"'


# --------------------------------------------------------------------------- errors and secrets


class ConfigError(Exception):
    """A configuration problem, rendered as one line: ``file:line: key: problem (fix)``."""

    def __init__(
        self, path: Path | str, problem: str, key: str | None = None, line: int | None = None
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        self.key = key
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        parts = [where, self.key, self.problem] if self.key else [where, self.problem]
        # One line, always: the journal and `check-config` output are read line by line.
        return _one_line(": ".join(parts))


class SettingError(ValueError):
    """A bad value for one dotted key; the loader adds the file and line to make a ConfigError."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class Secret:
    """A string that must never reach a log, an error message or a pickle.

    Equality is by value (constant-time) so configs compare naturally in tests and reloads.
    """

    __slots__ = ("_value",)
    _value: str
    _MASK = "Secret('********')"

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return self._MASK

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return self._MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secret is immutable")

    # Pickling would write the value in clear (queues, caches, crash dumps): refuse loudly.
    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("Secret cannot be pickled")

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret cannot be pickled")

    # copy/deepcopy would otherwise go through __reduce_ex__; an immutable value can be shared.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self


# --------------------------------------------------------------------------- the parsed config


@dataclass(frozen=True)
class OAuthConfig:
    client_id: str
    client_secret: Secret
    # The INITIAL refresh token: upstream rotates it on every use, so the current one lives in
    # the state file (mirrord.auth); this one only seeds it, and re-seeds it when it changes.
    refresh_token: Secret
    token_url: str


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    token: Secret | None  # exactly one of token and oauth is set
    timeout: float
    max_attempts: int
    retry_cap: float
    oauth: OAuthConfig | None = None


@dataclass(frozen=True)
class StorageConfig:
    path: Path
    state_dir: Path  # where mirrord.auth keeps the rotated OAuth refresh token
    files_dir: Path = Path("files")  # image files, when a survey or field has files = "all"
    max_disk: int = 20 * 10**9  # bytes of image files kept at most (downloads stop there)
    download_concurrency: int = 4


@dataclass(frozen=True)
class SyncConfig:
    interval: float
    reconcile_every: float  # 0.0 = full re-walks disabled
    max_pages: int
    concurrency: int
    jitter: float  # up to this much random delay per scheduled run (0.0 = none)
    backoff_cap: float  # longest wait between attempts while upstream is unreachable


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    # None: no bearer auth (only allowed while `host` is loopback; see _check_exposure).
    token: Secret | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS: exact origins; empty = CORS off
    hosts: tuple[str, ...] = ()  # Host names accepted besides loopback (DNS-rebinding guard)

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)


@dataclass(frozen=True)
class SurveyConfig:
    id: str
    interval: float | None  # None = use [sync] interval
    name: str | None
    files: str = "none"  # "none" | "all": whether the image files are mirrored too


@dataclass(frozen=True)
class FieldConfig:
    id: str
    interval: float | None  # None = use [sync] interval
    name: str | None
    files: str = "none"  # "none" | "all": whether the image files are mirrored too


@dataclass(frozen=True)
class Config:
    path: Path
    upstream: UpstreamConfig
    storage: StorageConfig
    sync: SyncConfig
    http: HttpConfig
    surveys: tuple[SurveyConfig, ...]
    fields: tuple[FieldConfig, ...]


# --------------------------------------------------------------------------- value parsers

Parser = Callable[[object, str], Any]


# bool first: it is an int in Python but not in TOML.
_TYPE_NAMES = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (dict, "table"),
    (list, "array"),
)


def _type_name(value: object) -> str:
    """The TOML name of a parsed value's type, as the operator wrote it."""
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), "date/time")


def _show(value: str) -> str:
    """A value quoted for an error message, or only its length if it may be a secret."""
    if len(value) > _MAX_SHOWN:
        return f"a {len(value)}-character string"
    return repr(value)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def _duration_seconds(text: str) -> float | None:
    """Seconds in "1h30m" / "500ms" / "90", or None if the text is not a duration."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return float(text)
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        pos = match.end()
    return total if text else None


def _duration(value: object, key: str) -> float:
    """A duration >= 0 in seconds; zero is left to the caller to judge."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingError(key, f"expected a duration, got {_type_name(value)} ({_DURATION_HELP})")
    if isinstance(value, str):
        seconds = _duration_seconds(value)
        if seconds is None:
            raise SettingError(key, f"bad duration {_show(value)} ({_DURATION_HELP})")
    elif value != value or value < 0:  # NaN compares unequal to itself
        raise SettingError(key, f"duration must be positive, got {value} ({_DURATION_HELP})")
    else:
        seconds = value  # compared before float(): float(10**400) would raise
    if seconds > _MAX_DURATION:
        raise SettingError(key, 'duration is too long (at most "3650d")')
    return float(seconds)


def parse_duration(value: object, key: str) -> float:
    """Seconds (> 0) from integer seconds or a string like "90s", "15m", "1h30m", "500ms"."""
    seconds = _duration(value, key)
    if seconds <= 0:
        raise SettingError(key, f"duration must be more than zero ({_DURATION_HELP})")
    return seconds


def _duration_or_off(value: object, key: str) -> float:
    """Like parse_duration, but 0 (or "0") is allowed and means "disabled"."""
    return _duration(value, key)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: object, key: str) -> int:
    """Bytes (> 0) from integer bytes or a string like "500MB", "20GB", "1.5GiB"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SettingError(key, f"expected a size, got {_type_name(value)} ({_SIZE_HELP})")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        unit = _SIZE_UNITS.get(match[2].lower()) if match else None
        if match is None or unit is None:
            raise SettingError(key, f"bad size {_show(value)} ({_SIZE_HELP})")
        # Decimal, not float: "1.5GiB" must be exactly 1610612736 bytes.
        exact = Decimal(match[1]) * unit
        if exact != exact.to_integral_value():
            raise SettingError(key, f"{_show(value)} is not a whole number of bytes ({_SIZE_HELP})")
        size = int(exact)
    if size <= 0:
        raise SettingError(key, f"size must be more than zero ({_SIZE_HELP})")
    return size


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise SettingError(
            key, f'expected a string, got {_type_name(value)} (e.g. {_leaf(key)} = "...")'
        )
    return value


def _label(value: object, key: str) -> str:
    text = _string(value, key)
    if not text.strip():
        raise SettingError(key, "is empty (give a label or remove the key)")
    return text


def _secret_text(value: object, key: str) -> str:
    # Unlike other parsers, nothing here may quote the value, whatever its type.
    if not isinstance(value, str):
        raise SettingError(
            key, f'expected a string, got {_type_name(value)} (e.g. {_leaf(key)} = "...")'
        )
    return value


def _client_id(value: object, key: str) -> str:
    text = _string(value, key)
    if not text or not text.isprintable() or any(c.isspace() for c in text):
        raise SettingError(
            key, "is empty or contains spaces (copy the OAuth application's client id exactly)"
        )
    return text


def _identifier(value: object, key: str) -> str:
    text = _string(value, key)
    if not text:
        raise SettingError(key, 'is empty (copy the sentera_id, e.g. id = "itqkn28_...")')
    if not text.isprintable() or any(c.isspace() for c in text):
        raise SettingError(
            key,
            f"{_show(text)} contains spaces or control characters "
            "(copy the sentera_id exactly, without surrounding spaces)",
        )
    return text


FILES_MODES = ("none", "all")


def _files_mode(value: object, key: str) -> str:
    text = _string(value, key)
    if text not in FILES_MODES:
        raise SettingError(key, f'{_show(text)} is not "none" or "all" (e.g. files = "all")')
    return text


def _positive_int(value: object, key: str) -> int:
    # bool is an int in Python, but `max_pages = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(
            key, f"expected an integer, got {_type_name(value)} (e.g. {_leaf(key)} = 5)"
        )
    if value < 1:
        raise SettingError(key, f"must be at least 1, got {value}")
    return value


def _path(value: object, key: str) -> str:
    text = _string(value, key)
    if not text.strip():
        raise SettingError(key, "is empty (give a file path)")
    if "\0" in text:
        raise SettingError(key, "contains a NUL character (give a plain file path)")
    if text.startswith("~"):
        # Services usually have no useful $HOME, so "~" would silently mean a directory named "~".
        raise SettingError(key, f"{_show(text)}: '~' is not expanded (write the full path)")
    return text


_URL_EXAMPLES = {"token_url": "https://api.sentera.com/oauth/token"}


def _url(value: object, key: str) -> str:
    text = _string(value, key)
    example = f'e.g. "{_URL_EXAMPLES.get(_leaf(key), "https://api.sentera.com/graphql")}"'
    # The URL itself is not echoed: it may carry credentials ("https://user:pass@host").
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise SettingError(key, f"is not a valid URL ({example})") from None
    if parts.scheme not in ("http", "https"):
        raise SettingError(key, f"must start with http:// or https:// ({example})")
    if not parts.hostname or text != text.strip() or any(c.isspace() for c in text):
        raise SettingError(key, f"is not a valid URL ({example})")
    if parts.username is not None or parts.password is not None:
        raise SettingError(key, "must not contain credentials (put the token in token/token_file)")
    return text


_LISTEN = re.compile(r"\[(?P<ip6>[^\]]*)\]:(?P<port6>.*)|(?P<host>[^:\[\]]+):(?P<port>.*)")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_LISTEN_HELP = 'use "host:port", e.g. "127.0.0.1:8765" or "[::1]:8765"'


def _listen(value: object, key: str) -> tuple[str, int]:
    text = _string(value, key)
    match = _LISTEN.fullmatch(text)
    if match is None:
        bare_ip6 = text.count(":") > 1 and "[" not in text
        problem = "IPv6 addresses need brackets" if bare_ip6 else "bad listen address"
        raise SettingError(key, f"{problem}: {_show(text)} ({_LISTEN_HELP})")
    host, port = match["host"], match["port"]
    if host is None:
        host, port = match["ip6"], match["port6"]
        if not _is_ip(host, 6):
            raise SettingError(key, f"bad IPv6 address in {_show(text)} ({_LISTEN_HELP})")
    elif not _is_hostname(host):
        raise SettingError(key, f"bad host in {_show(text)} ({_LISTEN_HELP})")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise SettingError(key, f"bad port in {_show(text)} (use a port from 1 to 65535)")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """Whether a listen host or Host header name is this machine only: "localhost", 127.0.0.0/8
    or ::1 (the names a browser page on another site cannot point at us by DNS rebinding)."""
    name = host.lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_ORIGIN_HELP = 'an origin is scheme://host[:port], e.g. "http://localhost:3000"'


def _origins(value: object, key: str) -> tuple[str, ...]:
    """CORS origins, normalised as browsers send them in `Origin` (lower-case, no path)."""
    found = []
    for index, item in enumerate(_string_list(value, key, '["http://localhost:3000"]')):
        where = f"{key}[{index}]"
        if item == "*":
            # Any web page could then read the mirror with a leaked or guessed token.
            raise SettingError(where, f"'*' is not allowed (list each origin; {_ORIGIN_HELP})")
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:
            raise SettingError(where, f"bad origin {_show(item)} ({_ORIGIN_HELP})") from None
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
            or any(c.isspace() for c in item)
        ):
            raise SettingError(where, f"bad origin {_show(item)} ({_ORIGIN_HELP})")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        found.append(f"{parts.scheme}://{host}" + (f":{port}" if port is not None else ""))
    return tuple(found)


def _host_names(value: object, key: str) -> tuple[str, ...]:
    """Host header names to accept, without port: DNS names or IP addresses."""
    found = []
    for index, item in enumerate(_string_list(value, key, '["mirror.local"]')):
        name = item.lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if not (_is_hostname(name) or _is_ip(name, 6)):
            raise SettingError(
                f"{key}[{index}]",
                f"bad host name {_show(item)} (a name or address without port, "
                'e.g. "mirror.local" or "192.168.1.20")',
            )
        found.append(name)
    return tuple(found)


def _string_list(value: object, key: str, example: str) -> list[str]:
    if not isinstance(value, list):
        raise SettingError(
            key, f"expected an array of strings, got {_type_name(value)} (e.g. {example})"
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise SettingError(
                f"{key}[{index}]", f"expected a string, got {_type_name(item)} (e.g. {example})"
            )
    return value


def _is_hostname(host: str) -> bool:
    # "999.1.1.1" fits the hostname grammar, but anyone writing it meant an IPv4 address.
    if re.fullmatch(r"[0-9.]+", host):
        return _is_ip(host, 4)
    return _HOSTNAME.fullmatch(host) is not None


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


# --------------------------------------------------------------------------- the spec tables


@dataclass(frozen=True)
class Key:
    """One config key. ``default`` is written as in TOML and goes through ``parse`` like user
    input, so the docs test can compare it with config.example.toml verbatim."""

    parse: Parser
    default: object = None  # None: optional without default (or required, see ``required``)
    required: bool = False
    secret: bool = False  # never echoed; scrubbed from every error message
    env_secret: bool = False  # names an environment variable whose value is a secret


@dataclass(frozen=True)
class Section:
    keys: Mapping[str, Key]
    array: bool = False  # [[name]] (array of tables) rather than [name]


# A dotted name ("upstream.oauth") is a sub-table of the section before the dot.
SECTIONS: Mapping[str, Section] = {
    "upstream": Section(
        {
            "url": Key(_url, "https://api.sentera.com/graphql"),
            "token": Key(_secret_text, secret=True),
            "token_file": Key(_path),
            "token_env": Key(_string, env_secret=True),
            "timeout": Key(parse_duration, "30s"),
            "max_attempts": Key(_positive_int, 5),
            "retry_cap": Key(parse_duration, "30s"),
        }
    ),
    "upstream.oauth": Section(
        {
            "client_id": Key(_client_id, required=True),
            "client_secret": Key(_secret_text, secret=True),
            "client_secret_file": Key(_path),
            "client_secret_env": Key(_string, env_secret=True),
            "refresh_token": Key(_secret_text, secret=True),
            "refresh_token_file": Key(_path),
            "refresh_token_env": Key(_string, env_secret=True),
            "token_url": Key(_url),  # None: derived from upstream.url
        }
    ),
    "storage": Section(
        {
            "path": Key(_path, "/var/lib/mirrord/mirror.db"),
            "state_dir": Key(_path),  # None: the directory of storage.path
            "files_dir": Key(_path),  # None: "files" beside storage.path
            "max_disk": Key(parse_size, "20GB"),
            "download_concurrency": Key(_positive_int, 4),
        }
    ),
    "sync": Section(
        {
            "interval": Key(parse_duration, "15m"),
            "reconcile_every": Key(_duration_or_off, "7d"),
            "max_pages": Key(_positive_int, 5000),
            "concurrency": Key(_positive_int, 2),
            "jitter": Key(_duration_or_off, "30s"),
            "backoff_cap": Key(parse_duration, "15m"),
        }
    ),
    "http": Section(
        {
            "listen": Key(_listen, "127.0.0.1:8765"),
            "token": Key(_secret_text, secret=True),
            "token_file": Key(_path),
            "token_env": Key(_string, env_secret=True),
            "allowed_origins": Key(_origins, []),
            "hosts": Key(_host_names, []),
        }
    ),
    "surveys": Section(
        {
            "id": Key(_identifier, required=True),
            "interval": Key(parse_duration),
            "name": Key(_label),
            "files": Key(_files_mode, "none"),
        },
        array=True,
    ),
    "fields": Section(
        {
            "id": Key(_identifier, required=True),
            "interval": Key(parse_duration),
            "name": Key(_label),
            "files": Key(_files_mode, "none"),
        },
        array=True,
    ),
}


# --------------------------------------------------------------------------- dotted key paths

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _segment(name: str) -> str:
    """A key as TOML would need it written: bare if possible, else quoted."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{_segment(name)}" if parent else _segment(name)


_LAST_SEGMENT = re.compile(r'(?:^|\.)(?:"(?:[^"\\]|\\.)*"|[^."\[\]]+)$|\[\d+\]$')


def _parent(path: str) -> str:
    match = _LAST_SEGMENT.search(path)
    return path[: match.start()] if match else ""


class _LineIndex:
    """Best-effort map of dotted key paths to the line that defines them.

    tomllib reports positions only for syntax errors, so semantic errors find their line by
    re-reading the text. It follows [tables], [[arrays]] and (dotted) keys; an unusual layout
    only costs the line number, never the error itself.
    """

    _KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
    _HEADER = re.compile(rf"\s*(\[\[?)\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]?\s*(?:#.*)?")
    _ASSIGN = re.compile(rf"\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")
    _PART = re.compile(_KEY)

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        self._index: dict[str, int] = {}  # array-of-tables path -> index of its latest element
        table = ""
        for number, line in self._code_lines(text):
            header = self._HEADER.fullmatch(line)
            if header:
                table = self._enter(header[2], header[1] == "[[", number)
            elif assign := self._ASSIGN.match(line):
                self._record(table, self._names(assign[1]), number)

    @staticmethod
    def _code_lines(text: str) -> Iterator[tuple[int, str]]:
        """Lines outside multi-line strings, numbered from 1."""
        closing: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if closing is None:
                yield number, line
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 and closing in (None, quote):
                    closing = None if closing else quote

    _LONG_ESCAPE = re.compile(r"\\U([0-9A-Fa-f]{8})")

    @staticmethod
    def _long(match: re.Match[str]) -> str:
        return json.dumps(chr(int(match[1], 16)))[1:-1]

    def _names(self, dotted: str) -> list[str]:
        names = []
        for part in self._PART.findall(dotted):
            try:  # TOML escapes are JSON's plus \UXXXXXXXX; an exotic one only costs the line
                names.append(
                    str(json.loads(self._LONG_ESCAPE.sub(self._long, part)))
                    if part[0] == '"'
                    else part.strip("'")
                )
            except ValueError:
                names.append(part[1:-1])
        return names

    def _enter(self, dotted: str, is_array: bool, number: int) -> str:
        path = ""
        for name in self._names(dotted):
            if path in self._index:  # [[a.b]] belongs to the latest [[a]]
                path = f"{path}[{self._index[path]}]"
            path = _join(path, name)
        if is_array:
            self._index[path] = self._index.get(path, -1) + 1
            self._lines.setdefault(path, number)
            path = f"{path}[{self._index[path]}]"
        self._lines.setdefault(path, number)
        return path

    def _record(self, table: str, names: list[str], number: int) -> None:
        path = table
        for name in names:
            path = _join(path, name)
            self._lines.setdefault(path, number)

    def line_of(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest enclosing table/key that has one."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = _parent(path)
        return None


# --------------------------------------------------------------------------- validation


def _raw_table(doc: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The table ``name`` (dotted for a sub-table) as written, or None if absent."""
    raw: Any = doc
    for part in name.split("."):
        raw = raw.get(part)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise SettingError(name, f"expected a table ([{name}]), got {_type_name(raw)}")
    return dict(raw)


def _table(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The parsed values of table section ``name``, defaults included."""
    return _values(_raw_table(doc, name) or {}, name, name)


def _unknown(key: str, name: str, known: Mapping[str, Key], section: str | None) -> NoReturn:
    elsewhere = [s for s, spec in SECTIONS.items() if name in spec.keys and s != section]
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if name in SECTIONS:
        # TOML puts every key after [upstream] into upstream, including `surveys = [...]`.
        hint = f"{name} is not a key here: move it above the first [table], or use {_header(name)}"
    elif elsewhere:
        hint = f"did you mean {elsewhere[0]}.{name}? it belongs under {_header(elsewhere[0])}"
    elif close:
        hint = f"did you mean {close[0]!r}?"
    else:
        hint = f"known keys: {', '.join(known)}"
    raise SettingError(key, f"unknown key ({hint})")


def _header(section: str) -> str:
    return f"[[{section}]]" if SECTIONS[section].array else f"[{section}]"


def _values(raw: Mapping[str, Any], prefix: str, section: str) -> dict[str, Any]:
    """Parse one table against its spec: reject unknown keys, apply defaults."""
    spec = SECTIONS[section].keys
    for name in raw:
        if name not in spec and f"{section}.{name}" not in SECTIONS:  # sub-tables: their own
            _unknown(_join(prefix, name), name, spec, section)
    values: dict[str, Any] = {}
    for name, key in spec.items():
        dotted = _join(prefix, name)
        if name in raw:
            values[name] = key.parse(raw[name], dotted)
        elif key.required:
            each = "each " if SECTIONS[section].array else ""
            raise SettingError(dotted, f"missing ({each}{_header(section)} needs {name} = ...)")
        else:
            values[name] = None if key.default is None else key.parse(key.default, dotted)
    return values


def _top_sections() -> list[str]:
    return [name for name in SECTIONS if "." not in name]


def _check_sections(doc: Mapping[str, Any]) -> None:
    for name in doc:
        if name in _top_sections():
            continue
        owners = [s for s, spec in SECTIONS.items() if name in spec.keys]
        close = difflib.get_close_matches(name, _top_sections(), n=1, cutoff=0.6)
        if owners:
            hint = f"put it under {_header(owners[0])}"
        elif close:
            hint = f"did you mean {_header(close[0])}?"
        else:
            hint = f"known sections: {', '.join(_header(s) for s in _top_sections())}"
        what = "section" if isinstance(doc[name], dict | list) else "top-level key"
        raise SettingError(_segment(name), f"unknown {what} ({hint})")


def _array(doc: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    raw = doc.get(name, [])
    example = f'[[{name}]] blocks, each with id = "..."'
    if not isinstance(raw, list):
        raise SettingError(name, f"expected an array of tables ({example}), got {_type_name(raw)}")
    items = []
    for index, item in enumerate(raw):
        key = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise SettingError(key, f"expected a table ({example}), got {_type_name(item)}")
        items.append(_values(item, key, name))
    return items


def _check_unique(items: list[dict[str, Any]], name: str, lines: _LineIndex) -> None:
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first = seen.setdefault(item["id"], index)
        if first != index:
            line = lines.line_of(f"{name}[{first}].id")
            at = f" at line {line}" if line is not None else ""
            raise SettingError(
                f"{name}[{index}].id",
                f"duplicate id {_show(item['id'])} "
                f"(same as {name}[{first}].id{at}; "
                "remove one of them)",
            )


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class _SecretSource:
    """A secret set by one of three keys (``name``, ``name_file``, ``name_env``) or, when none
    is set, by a systemd credential (``LoadCredential=``) of a conventional name."""

    section: str
    name: str
    noun: str  # what it is, for messages: "API token"
    file_noun: str  # "token" -> "token file /etc/mirrord/token"
    credential: str
    example_env: str

    @property
    def keys(self) -> tuple[str, str, str]:
        return (self.name, f"{self.name}_file", f"{self.name}_env")


_TOKEN = _SecretSource("upstream", "token", "API token", "token", "mirrord-token", "MIRRORD_TOKEN")
# Optional: no key and no credential means no auth, which _check_exposure allows on loopback only.
_HTTP_TOKEN = _SecretSource(
    "http", "token", "HTTP API token", "token", "mirrord-http-token", "MIRRORD_HTTP_TOKEN"
)
_CLIENT_SECRET = _SecretSource(
    "upstream.oauth",
    "client_secret",
    "OAuth client secret",
    "client secret",
    "mirrord-client-secret",
    "MIRRORD_CLIENT_SECRET",
)
_REFRESH_TOKEN = _SecretSource(
    "upstream.oauth",
    "refresh_token",
    "OAuth refresh token",
    "refresh token",
    "mirrord-refresh-token",
    "MIRRORD_REFRESH_TOKEN",
)


def _check_token(token: str, key: str, origin: str, noun: str) -> str:
    if not token:
        raise SettingError(key, f"{origin} is empty (put the {noun} there)")
    if token.lower().startswith("bearer "):
        raise SettingError(
            key, f"{origin} starts with 'Bearer ' (give the token alone; mirrord adds the prefix)"
        )
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise SettingError(
            key,
            f"{origin} contains spaces, line breaks or non-ASCII characters "
            f"({noun}s are one word of plain text)",
        )
    return token


def _read_token_file(path: Path, key: str, what: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_TOKEN_FILE + 1)
    except OSError as err:
        raise SettingError(key, f"cannot read {what} {path}: {_os_problem(err)}") from None
    if len(data) > _MAX_TOKEN_FILE:
        raise SettingError(key, f"{what} {path} is too large to hold a secret (check the path)")
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise SettingError(key, f"{what} {path} is not UTF-8 text (check the path)") from None


def _os_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such file (check the path)"
    if isinstance(err, IsADirectoryError):
        return "it is a directory (give the path of a file)"
    if isinstance(err, PermissionError):
        return "permission denied (the mirrord service user must be able to read it)"
    return (err.strerror or type(err).__name__).lower()


@dataclass(frozen=True)
class _Sources:
    """Where secrets may come from, besides the config text itself."""

    base: Path  # the config file's directory
    env: Mapping[str, str]
    secrets: list[str]  # every secret value read so far, scrubbed from every error

    def credential(self, name: str) -> Path | None:
        """``$CREDENTIALS_DIRECTORY/name`` if systemd handed the service that credential."""
        directory = self.env.get("CREDENTIALS_DIRECTORY", "")
        if not directory or not os.path.isabs(directory):
            return None
        path = Path(directory) / name
        return path if os.path.isfile(path) else None  # isfile: False, not raise, on EACCES


def _resolve_secret(values: Mapping[str, Any], source: _SecretSource, where: _Sources) -> Secret:
    """The secret from exactly one of its three keys, else from its systemd credential."""
    given = [name for name in source.keys if values[name] is not None]
    section = source.section
    if len(given) > 1:
        one_of = ", ".join(source.keys)
        raise SettingError(
            f"{section}.{given[1]}",
            f"conflicts with {section}.{given[0]} (set exactly one of {one_of})",
        )
    if not given:
        return _credential_secret(source, where)
    name, key = given[0], f"{section}.{given[0]}"
    if name == source.name:
        return Secret(_check_token(values[name], key, "value", source.noun))
    if name.endswith("_file"):
        path = _resolve(where.base, values[name])
        text = _read_token_file(path, key, f"{source.file_noun} file")
        where.secrets.append(text)
        return Secret(_check_token(text, key, f"{source.file_noun} file {path}", source.noun))
    return Secret(_env_secret(values[name], key, source, where))


def _optional_secret(
    values: Mapping[str, Any], source: _SecretSource, where: _Sources
) -> Secret | None:
    """Like _resolve_secret, but None when no key is set and no credential exists."""
    if all(values[name] is None for name in source.keys) and not where.credential(
        source.credential
    ):
        return None
    return _resolve_secret(values, source, where)


def _credential_secret(source: _SecretSource, where: _Sources) -> Secret:
    key = f"{source.section}.{source.name}"
    path = where.credential(source.credential)
    if path is None:
        alternatives = ", or an [upstream.oauth] table" if source is _TOKEN else ""
        a, b, c = source.keys
        raise SettingError(
            key,
            f"no {source.noun} configured (set one of {a}, {b} or {c} under "
            f"[{source.section}]{alternatives}; or give the service a systemd credential "
            f"named {source.credential})",
        )
    text = _read_token_file(path, key, "systemd credential")
    where.secrets.append(text)
    return Secret(_check_token(text, key, f"systemd credential {path}", source.noun))


def _env_secret(name: str, key: str, source: _SecretSource, where: _Sources) -> str:
    if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise SettingError(
            key,
            f"{_show(name)} is not an environment variable name "
            f'(e.g. {source.name}_env = "{source.example_env}")',
        )
    if name not in where.env:
        raise SettingError(
            key,
            f"environment variable {name} is not set (set it for the "
            "service, e.g. systemd Environment= or EnvironmentFile=)",
        )
    text = where.env[name].strip()
    where.secrets.append(text)
    return _check_token(text, key, f"environment variable {name}", source.noun)


def _resolve_auth(
    doc: Mapping[str, Any], up: Mapping[str, Any], where: _Sources
) -> tuple[Secret | None, OAuthConfig | None]:
    """A static token, or OAuth: exactly one of them."""
    oauth_raw = _raw_table(doc, "upstream.oauth")
    if oauth_raw is None:
        return _resolve_secret(up, _TOKEN, where), None
    static = [name for name in _TOKEN.keys if up[name] is not None]
    if static:
        raise SettingError(
            "upstream.oauth",
            f"conflicts with upstream.{static[0]} (use either a static token or "
            "[upstream.oauth], not both)",
        )
    values = _values(oauth_raw, "upstream.oauth", "upstream.oauth")
    oauth = OAuthConfig(
        client_id=values["client_id"],
        client_secret=_resolve_secret(values, _CLIENT_SECRET, where),
        refresh_token=_resolve_secret(values, _REFRESH_TOKEN, where),
        token_url=values["token_url"] or _default_token_url(up["url"]),
    )
    return None, oauth


def _default_token_url(api_url: str) -> str:
    parts = urlsplit(api_url)
    return urlunsplit((parts.scheme, parts.netloc, "/oauth/token", "", ""))


# --------------------------------------------------------------------------- assembling


def _resolve(base: Path, path: str) -> Path:
    # Relative to the config file, not the working directory: systemd starts us in "/".
    return base / path


def _build(
    doc: Mapping[str, Any],
    path: Path,
    env: Mapping[str, str],
    lines: _LineIndex,
    secrets: list[str],
) -> Config:
    _check_sections(doc)
    up = _table(doc, "upstream")
    # Early, so that a secret file's content is known (and scrubbed) for every later error.
    token, oauth = _resolve_auth(doc, up, _Sources(path.parent, env, secrets))
    storage, sync, http = _table(doc, "storage"), _table(doc, "sync"), _table(doc, "http")
    surveys = _array(doc, "surveys")
    fields = _array(doc, "fields")
    _check_unique(surveys, "surveys", lines)
    _check_unique(fields, "fields", lines)
    http_config = _http(http, _Sources(path.parent, env, secrets))
    upstream = UpstreamConfig(
        url=up["url"],
        token=token,
        timeout=up["timeout"],
        max_attempts=up["max_attempts"],
        retry_cap=up["retry_cap"],
        oauth=oauth,
    )
    return Config(
        path=path,
        upstream=upstream,
        storage=_storage(storage, path.parent),
        sync=SyncConfig(**sync),
        http=http_config,
        surveys=tuple(SurveyConfig(**item) for item in surveys),
        fields=tuple(FieldConfig(**item) for item in fields),
    )


def _http(values: Mapping[str, Any], where: _Sources) -> HttpConfig:
    host, port = values["listen"]
    config = HttpConfig(
        host=host,
        port=port,
        token=_optional_secret(values, _HTTP_TOKEN, where),
        allowed_origins=values["allowed_origins"],
        hosts=values["hosts"],
    )
    _check_exposure(config)
    return config


def _check_exposure(http: HttpConfig) -> None:
    # Beyond loopback, anyone on the field's Wi-Fi could read the mirror and start syncs.
    if not http.loopback and http.token is None:
        raise SettingError(
            "http.listen",
            f"{_show(http.host)} is not a loopback address and [http] has no token "
            "(set token, token_file or token_env under [http], or listen on 127.0.0.1)",
        )


def _storage(values: Mapping[str, Any], base: Path) -> StorageConfig:
    database = _resolve(base, values["path"])
    state_dir, files_dir = values["state_dir"], values["files_dir"]
    return StorageConfig(
        path=database,
        state_dir=database.parent if state_dir is None else _resolve(base, state_dir),
        files_dir=database.parent / "files" if files_dir is None else _resolve(base, files_dir),
        max_disk=values["max_disk"],
        download_concurrency=values["download_concurrency"],
    )


def _secret_strings(doc: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Every secret the file holds or points to in the environment, wherever the operator put
    it: collected before validation, so that no error, whichever comes first, can show one."""
    keys = [(n, k) for spec in SECTIONS.values() for n, k in spec.keys.items()]
    names = {name for name, key in keys if key.secret}
    env_names = {name for name, key in keys if key.env_secret}
    found: list[str] = []
    stack: list[object] = [doc]
    while stack:  # iterative: a hostile file must not hit the recursion limit here
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and k in names:
                    found.append(v)
                elif isinstance(v, str) and k in env_names and v in env:
                    found.append(env[v].strip())
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    return found


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SCRUBBED:
            text = text.replace(secret, "********")
    return text


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$|\s*\(at end of document\)$")


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = _TOML_POSITION.search(message)
        problem = message[: match.start()] if match else message
        line = int(match[1]) if match and match[1] else None
        column = f" at column {match[2]}" if match and match[2] else ""
        if match and not match[1]:
            line, column = text.count("\n") + 1, " at end of file"
        raise ConfigError(
            path,
            f"invalid TOML: {problem}{column} (check quotes, brackets and '=' on that line)",
            line=line,
        ) from None
    except ValueError:
        # Not a TOMLDecodeError: an integer past Python's int-string limit (4300 digits).
        raise ConfigError(path, "invalid TOML: a number is too long") from None
    except RecursionError:
        raise ConfigError(path, "invalid TOML: nested too deeply") from None


def loads_config(text: str, path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Parse config ``text`` as if read from ``path`` (for relative paths and messages).

    ``env`` defaults to ``os.environ`` and is only read for the ``*_env`` keys and, when a
    secret is not configured, ``$CREDENTIALS_DIRECTORY`` (systemd credentials).
    """
    config_path = Path(path).absolute()
    doc = _parse_toml(text, config_path)
    env = os.environ if env is None else env
    secrets = _secret_strings(doc, env)
    lines = _LineIndex(text)
    try:
        return _build(doc, config_path, env, lines, secrets)
    except SettingError as err:
        raise ConfigError(
            config_path,
            _scrub(err.problem, secrets),
            key=_scrub(err.key, secrets),
            line=lines.line_of(err.key),
        ) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``; raises ConfigError and nothing else."""
    config_path = Path(path).absolute()
    try:
        data = config_path.read_bytes()
    except OSError as err:
        hint = " (copy config.example.toml there)" if isinstance(err, FileNotFoundError) else ""
        raise ConfigError(
            config_path, f"cannot read config file: {_os_problem(err)}{hint}"
        ) from None
    except ValueError:  # e.g. a NUL byte in the path
        raise ConfigError(config_path, "cannot read config file: invalid path") from None
    try:
        # utf-8-sig: editors on Windows field laptops like to prepend a BOM.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            config_path, f"not UTF-8 text (byte {err.start}; save the file as UTF-8)", line=line
        ) from None
    return loads_config(text, config_path, env)
