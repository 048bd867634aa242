"""mirrord.config: the loader, its errors, Secret, and the truth of config.example.toml."""

from __future__ import annotations

import copy
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord import config as config_module
from mirrord.config import (
    SECTIONS,
    Config,
    ConfigError,
    Secret,
    SettingError,
    load_config,
    loads_config,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
CFG = Path("/etc/mirrord/mirrord.toml")
MINIMAL = '[upstream]\ntoken = "tok-123"\n'
TOKEN = "s3cr3t-TOKEN-0123456789abcdef-XYZ"  # long enough that any leak is unambiguous


def load(text: str, env: dict[str, str] | None = None, path: Path = CFG) -> Config:
    return loads_config(text, path, env={} if env is None else env)


def fail(text: str, env: dict[str, str] | None = None, path: Path = CFG) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, env, path)
    error = info.value
    assert "\n" not in str(error)
    # No chained exception: a traceback printer must have nothing more to show.
    assert error.__cause__ is None and error.__suppress_context__
    return error


# --------------------------------------------------------------------------- the example file


@dataclass(frozen=True)
class DocKey:
    section: str
    name: str
    line: int
    commented: bool
    comment: str  # the comment block right above the key


_DOC_HEADER = re.compile(r"^(?:#\s*)?\[\[?\s*([a-z_.]+)\s*\]\]?\s*$")
_DOC_KEY = re.compile(r"^(#\s*)?([a-z_]+)\s*=")


def documented_keys(text: str) -> list[DocKey]:
    """Every `key =` and `# key =` line of the example, with its section and comment block.

    Commented-out [[headers]] count too, so an optional block can be documented in comments.
    """
    lines = text.splitlines()
    keys, section = [], ""
    for number, line in enumerate(lines, start=1):
        if header := _DOC_HEADER.match(line):
            section = header[1]
        elif key := _DOC_KEY.match(line):
            keys.append(
                DocKey(section, key[2], number, bool(key[1]), _comment_above(lines, number - 1))
            )
    return keys


def _comment_above(lines: list[str], index: int) -> str:
    block: list[str] = []
    for line in reversed(lines[:index]):
        if not line.startswith("#") or _DOC_HEADER.match(line) or _DOC_KEY.match(line):
            break
        block.insert(0, line)
    return "\n".join(block)


def known_keys() -> set[tuple[str, str]]:
    return {(section, name) for section, spec in SECTIONS.items() for name in spec.keys}


def toml_literal(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def test_example_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.path == EXAMPLE
    assert cfg.upstream.token.reveal() == "REPLACE_WITH_YOUR_API_TOKEN"
    assert [s.id for s in cfg.surveys] == ["itqkn28_CO_SHORT1_CV_test_dc0d87d_170907_235328"]
    assert cfg.surveys[0].interval == 300.0 and cfg.surveys[0].name == "North 40"
    assert cfg.fields == ()


def test_example_shows_the_defaults() -> None:
    example = load_config(EXAMPLE, env={})
    defaults = load(MINIMAL.replace("tok-123", "REPLACE_WITH_YOUR_API_TOKEN"))
    for part in ("upstream", "storage", "sync", "http"):
        assert getattr(example, part) == getattr(defaults, part), part


def test_every_known_key_is_documented() -> None:
    documented = {(k.section, k.name) for k in documented_keys(EXAMPLE.read_text())}
    missing = known_keys() - documented
    assert not missing, f"keys the loader knows but config.example.toml omits: {missing}"


def test_every_documented_key_is_known() -> None:
    documented = {(k.section, k.name) for k in documented_keys(EXAMPLE.read_text())}
    unknown = documented - known_keys()
    assert not unknown, f"config.example.toml documents keys the loader rejects: {unknown}"


def test_every_documented_key_states_type_and_true_default() -> None:
    for key in documented_keys(EXAMPLE.read_text()):
        where = f"config.example.toml:{key.line} {key.section}.{key.name}"
        assert "Type:" in key.comment and "Default:" in key.comment, where
        default = SECTIONS[key.section].keys[key.name].default
        if default is not None:
            assert f"Default: {toml_literal(default)}." in key.comment, where


def test_example_commented_alternatives_are_valid() -> None:
    text = EXAMPLE.read_text()
    # Uncomment the [[fields]] block (everything after its commented header).
    head, _, tail = text.partition("# [[fields]]")
    fields = re.sub(r"(?m)^# ((?:[a-z_]+ =).*)$", r"\1", "[[fields]]" + tail)
    cfg = load(head + fields)
    assert [f.id for f in cfg.fields] == ["REPLACE_WITH_A_FIELD_SENTERA_ID"]
    assert cfg.fields[0].interval == 3600.0
    # Swap the inline token for the token_env alternative.
    swapped = re.sub(r"(?m)^token = .*$", "", head).replace("# token_env = ", "token_env = ", 1)
    assert load(swapped, env={"MIRRORD_TOKEN": "abc"}).upstream.token.reveal() == "abc"


# --------------------------------------------------------------------------- defaults, paths


def test_minimal_config_gets_defaults() -> None:
    cfg = load(MINIMAL)
    assert cfg.upstream.url == "https://api.sentera.com/graphql"
    assert cfg.upstream.token == Secret("tok-123")
    assert (cfg.upstream.timeout, cfg.upstream.max_attempts, cfg.upstream.retry_cap) == (
        30.0,
        5,
        30.0,
    )
    assert cfg.storage.path == Path("/var/lib/mirrord/mirror.db")
    assert cfg.sync == config_module.SyncConfig(900.0, 7 * 86400.0, 5000, 2, 30.0, 900.0)
    assert cfg.http == config_module.HttpConfig("127.0.0.1", 8765)
    assert cfg.surveys == () and cfg.fields == ()


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "secrets").mkdir()
    (etc / "secrets" / "token").write_text("  file-token\n")
    text = '[upstream]\ntoken_file = "secrets/token"\n[storage]\npath = "data/mirror.db"\n'
    (etc / "m.toml").write_text(text)
    cfg = load_config(etc / "m.toml", env={})
    assert cfg.storage.path == etc / "data" / "mirror.db"
    assert cfg.upstream.token.reveal() == "file-token"


def test_relative_config_path_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text(MINIMAL + '[storage]\npath = "mirror.db"\n')
    cfg = load_config("m.toml", env={})
    assert cfg.path == tmp_path / "m.toml"
    assert cfg.storage.path == tmp_path / "mirror.db"


def test_absolute_storage_path_is_kept() -> None:
    assert load(MINIMAL + '[storage]\npath = "/srv/m.db"\n').storage.path == Path("/srv/m.db")


def test_surveys_and_fields() -> None:
    cfg = load(
        MINIMAL + '[[surveys]]\nid = "a"\n[[surveys]]\nid = "b"\ninterval = 60\n'
        '[[fields]]\nid = "a"\nname = "F"\n'
    )
    assert cfg.surveys == (
        config_module.SurveyConfig("a", None, None),
        config_module.SurveyConfig("b", 60.0, None),
    )
    # Survey and field ids are separate namespaces.
    assert cfg.fields == (config_module.FieldConfig("a", None, "F"),)


def test_inline_array_of_surveys() -> None:
    cfg = load('surveys = [{ id = "a" }, { id = "b", name = "B" }]\n' + MINIMAL)
    assert [(s.id, s.name) for s in cfg.surveys] == [("a", None), ("b", "B")]


def test_config_is_frozen_and_comparable() -> None:
    assert load(MINIMAL) == load(MINIMAL)
    with pytest.raises(AttributeError):
        load(MINIMAL).sync.interval = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- durations and sizes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (" 5m ", 300.0),
        ("1d2h3m4s", 93784.0),
        ("3650d", 3650 * 86400.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value, "k") == seconds


@pytest.mark.parametrize(
    "value",
    [
        "fast",
        "",
        " ",
        "5 minutes",
        "5M",
        "5x",
        "m",
        "-5s",
        "1h-30m",
        "5s5",
        "0",
        "0s",
        0,
        -1,
        0.0,
        -0.5,
        True,
        False,
        [],
        {},
        None,
        float("nan"),
        float("inf"),
        float("-inf"),
        10**400,
        "3651d",
        "9" * 500,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(SettingError) as info:
        parse_duration(value, "upstream.timeout")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("upstream.timeout: ")
    assert "\n" not in str(info.value)


def test_bad_duration_message() -> None:
    error = fail(MINIMAL + 'timeout = "fast"\n')
    assert str(error) == (
        f"{CFG}:3: upstream.timeout: bad duration 'fast' "
        '(use integer seconds or e.g. "90s", "15m", "2h")'
    )


@pytest.mark.parametrize("value", ["0", "0s", 0, '"7d"'])
def test_reconcile_every_may_be_zero(value: object) -> None:
    literal = value if isinstance(value, str) and value.startswith('"') else json.dumps(value)
    expected = 7 * 86400.0 if value == '"7d"' else 0.0
    cfg = load(MINIMAL + f"[sync]\nreconcile_every = {literal}\n")
    assert cfg.sync.reconcile_every == expected


def test_interval_may_not_be_zero() -> None:
    assert "more than zero" in str(fail(MINIMAL + '[sync]\ninterval = "0s"\n'))


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1, 1),
        (123, 123),
        ("123", 123),
        ("10B", 10),
        ("500MB", 500 * 10**6),
        ("20GB", 20 * 10**9),
        ("20gb", 20 * 10**9),
        ("1kB", 1000),
        ("2TB", 2 * 10**12),
        ("1.5GiB", 1610612736),
        ("1KiB", 1024),
        ("3 MiB", 3 * 2**20),
        ("1TiB", 2**40),
    ],
)
def test_parse_size_accepts(value: object, size: int) -> None:
    assert parse_size(value, "k") == size


@pytest.mark.parametrize(
    "value",
    [
        "",
        "GB",
        "20 G",
        "20XB",
        "-1GB",
        "1.5",
        "0.1B",
        "0",
        0,
        -5,
        1.5,
        True,
        None,
        [],
        "1e9",
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(SettingError) as info:
        parse_size(value, "storage.max_disk")
    assert str(info.value).startswith("storage.max_disk: ")


# --------------------------------------------------------------------------- Secret


def test_secret_never_shows_its_value() -> None:
    secret = Secret(TOKEN)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret:>40}",
        "%s %r" % (secret, secret),  # noqa: UP031
        format(secret),
        repr([secret]),
        repr(load(MINIMAL.replace("tok-123", TOKEN))),
    ]
    for text in shown:
        assert TOKEN not in text
    assert repr(secret) == "Secret('********')"
    assert secret.reveal() == TOKEN


def test_secret_equality_and_hash() -> None:
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2


def test_secret_cannot_be_pickled_or_changed() -> None:
    secret = Secret(TOKEN)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(secret, protocol)
    with pytest.raises(TypeError):
        pickle.dumps(load(MINIMAL))
    with pytest.raises(TypeError):
        json.dumps(secret)
    with pytest.raises(AttributeError):
        secret._value = "x"
    assert copy.deepcopy(secret) == secret and copy.copy(secret) is secret
    assert copy.deepcopy(load(MINIMAL)) == load(MINIMAL)


# --------------------------------------------------------------------------- errors


UP = MINIMAL  # lines 1-2


@pytest.mark.parametrize(
    ("text", "line", "key", "expect"),
    [
        # TOML syntax: tomllib's position
        ("[upstream]\ntoken = abc\n", 2, None, "invalid TOML: Invalid value at column 9"),
        (UP + "[sync\n", 3, None, "invalid TOML"),
        (UP + "timeout = 1\ntimeout = 2\n", 4, None, "invalid TOML"),
        ("x = [1,", 1, None, "at end of file"),
        # unknown keys and sections, with hints
        (UP + 'timout = "30s"\n', 3, "upstream.timout", "did you mean 'timeout'?"),
        (
            UP + "[sync]\ntimeout = 3\n",
            4,
            "sync.timeout",
            "did you mean upstream.timeout? it belongs under [upstream]",
        ),
        (UP + "[sync]\nzzz = 3\n", 4, "sync.zzz", "known keys: interval, reconcile_every"),
        (UP + "[uptream]\nx = 1\n", 3, "uptream", "unknown section (did you mean [upstream]?)"),
        (UP + "[zzz]\n", 3, "zzz", "known sections: [upstream], [storage]"),
        ('interval = "5m"\n' + UP, 1, "interval", "unknown top-level key (put it under [sync])"),
        (
            UP + 'surveys = [{id = "a"}]\n',
            3,
            "upstream.surveys",
            "move it above the first [table], or use [[surveys]]",
        ),
        (UP + "[upstream.oauht]\nclient_id = 1\n", 3, "upstream.oauht", "unknown key"),
        (UP + '[upstream.oauth]\nclient_id = "c"\n', 3, "upstream.oauth", "conflicts with"),
        (UP + '[[surveys]]\nid = "a"\nnmae = "x"\n', 5, "surveys[0].nmae", "did you mean 'name'?"),
        (UP + '"odd key" = 1\n', 3, 'upstream."odd key"', "unknown key"),
        # wrong types
        (UP + "[sync]\ninterval = true\n", 4, "sync.interval", "expected a duration, got boolean"),
        (UP + "[sync]\nmax_pages = 1.5\n", 4, "sync.max_pages", "expected an integer, got float"),
        (UP + "[sync]\nconcurrency = true\n", 4, "sync.concurrency", "got boolean"),
        (UP + "[sync]\nconcurrency = 0\n", 4, "sync.concurrency", "must be at least 1, got 0"),
        (UP + "max_attempts = 0\n", 3, "upstream.max_attempts", "must be at least 1"),
        (UP + "[http]\nlisten = 8765\n", 4, "http.listen", "expected a string, got integer"),
        ('upstream = "x"\n', 1, "upstream", "expected a table ([upstream]), got string"),
        (UP + "storage = 1\n", 3, "upstream.storage", "is not a key here"),
        ("sync = [1]\n" + UP, 1, "sync", "expected a table ([sync]), got array"),
        (UP + '[surveys]\nid = "a"\n', 3, "surveys", "expected an array of tables"),
        ('surveys = ["a"]\n' + UP, 1, "surveys[0]", "expected a table ([[surveys]] blocks"),
        ('surveys = "a"\n' + UP, 1, "surveys", "got string"),
        (UP + "[[surveys]]\nid = 5\n", 4, "surveys[0].id", "expected a string, got integer"),
        (UP + "[[fields]]\nid = 1979-05-27\n", 4, "fields[0].id", "got date/time"),
        # bad durations
        (UP + 'retry_cap = "-1s"\n', 3, "upstream.retry_cap", "bad duration '-1s'"),
        (UP + "retry_cap = -1\n", 3, "upstream.retry_cap", "duration must be positive"),
        (UP + "[sync]\ninterval = 0\n", 4, "sync.interval", "more than zero"),
        (
            UP + '[[surveys]]\nid = "a"\ninterval = "soon"\n',
            5,
            "surveys[0].interval",
            "bad duration",
        ),
        # token sources
        ("[upstream]\n", 1, "upstream.token", "no API token configured"),
        ("", None, "upstream.token", "set one of token, token_file or token_env"),
        (UP + 'token_env = "X"\n', 3, "upstream.token_env", "conflicts with upstream.token"),
        (
            '[upstream]\ntoken_file = "f"\ntoken_env = "X"\n',
            3,
            "upstream.token_env",
            "conflicts with upstream.token_file",
        ),
        ('[upstream]\ntoken = ""\n', 2, "upstream.token", "value is empty"),
        ('[upstream]\ntoken_env = "NOPE"\n', 2, "upstream.token_env", "NOPE is not set"),
        (
            '[upstream]\ntoken_env = "1 bad"\n',
            2,
            "upstream.token_env",
            "is not an environment variable name",
        ),
        ('[upstream]\ntoken_file = ""\n', 2, "upstream.token_file", "is empty"),
        ('[upstream]\ntoken_file = "~/token"\n', 2, "upstream.token_file", "'~' is not expanded"),
        (
            '[upstream]\ntoken_file = "/nonexistent/t"\n',
            2,
            "upstream.token_file",
            "cannot read token file /nonexistent/t: no such file",
        ),
        # URLs
        (
            UP + 'url = "ftp://x/graphql"\n',
            3,
            "upstream.url",
            "must start with http:// or https://",
        ),
        (UP + 'url = "api.sentera.com"\n', 3, "upstream.url", "must start with http://"),
        (UP + 'url = "https://"\n', 3, "upstream.url", "is not a valid URL"),
        (UP + 'url = "https://x:99999/"\n', 3, "upstream.url", "is not a valid URL"),
        (UP + 'url = "https://[::1/"\n', 3, "upstream.url", "is not a valid URL"),
        (UP + 'url = " https://x/"\n', 3, "upstream.url", "is not a valid URL"),
        (UP + 'url = "https://u:p@x/"\n', 3, "upstream.url", "must not contain credentials"),
        # listen addresses
        (UP + '[http]\nlisten = "127.0.0.1"\n', 4, "http.listen", "bad listen address"),
        (UP + '[http]\nlisten = ":8765"\n', 4, "http.listen", "bad listen address"),
        (UP + '[http]\nlisten = "::1:8765"\n', 4, "http.listen", "IPv6 addresses need brackets"),
        (UP + '[http]\nlisten = "[::1]"\n', 4, "http.listen", "bad listen address"),
        (UP + '[http]\nlisten = "[1.2.3.4]:80"\n', 4, "http.listen", "bad IPv6 address"),
        (UP + '[http]\nlisten = "999.0.0.1:80"\n', 4, "http.listen", "bad host"),
        (UP + '[http]\nlisten = "bad_host:80"\n', 4, "http.listen", "bad host"),
        (UP + '[http]\nlisten = "127.0.0.1:0"\n', 4, "http.listen", "bad port"),
        (UP + '[http]\nlisten = "127.0.0.1:65536"\n', 4, "http.listen", "bad port"),
        (UP + '[http]\nlisten = "127.0.0.1:http"\n', 4, "http.listen", "bad port"),
        (UP + '[http]\nlisten = "127.0.0.1:８７６５"\n', 4, "http.listen", "bad port"),
        # surveys and fields
        (UP + "[[surveys]]\n", 3, "surveys[0].id", "missing (each [[surveys]] needs id = ...)"),
        (UP + '[[surveys]]\nid = ""\n', 4, "surveys[0].id", "is empty"),
        (UP + '[[surveys]]\nid = " a"\n', 4, "surveys[0].id", "contains spaces"),
        (UP + '[[surveys]]\nid = "a"\nname = " "\n', 5, "surveys[0].name", "is empty"),
        (
            UP + '[[surveys]]\nid = "a"\n[[surveys]]\nid = "b"\n\n[[surveys]]\nid = "a"\n',
            9,
            "surveys[2].id",
            "duplicate id 'a' (same as surveys[0].id at line 4; remove one of them)",
        ),
        (
            UP + '[[fields]]\nid = "f"\n[[fields]]\nid = "f"\n',
            6,
            "fields[1].id",
            "duplicate id 'f' (same as fields[0].id at line 4",
        ),
        ('fields = [{id = "f"}, {id = "f"}]\n' + UP, 1, "fields[1].id", "duplicate id"),
        # paths
        (UP + '[storage]\npath = ""\n', 4, "storage.path", "is empty"),
        (UP + '[storage]\npath = "a\\u0000b"\n', 4, "storage.path", "NUL"),
    ],
)
def test_error_messages(text: str, line: int | None, key: str | None, expect: str) -> None:
    error = fail(text)
    assert expect in str(error)
    assert error.line == line and error.key == key and error.path == CFG
    prefix = f"{CFG}:{line}: " if line is not None else f"{CFG}: "
    assert str(error).startswith(prefix + (f"{key}: " if key else ""))


def test_line_numbers_survive_multiline_strings_and_dotted_keys() -> None:
    text = UP + '[[surveys]]\nid = "a"\nname = """\n[sync]\ninterval = 1\n"""\ninterval = "x"\n'
    assert fail(text).line == 9
    dotted = UP + 'sync.interval = "x"\n'  # a dotted key under [upstream]: upstream.sync
    assert fail(dotted).key == "upstream.sync" and fail(dotted).line == 3


def test_quoted_keys_are_shown_and_located() -> None:
    error = fail(UP + '\n"caf\\u00e9 \\U0001F600" = 1\n')
    assert error.key == 'upstream."café 😀"' and error.line == 4


def test_huge_integer_is_a_config_error() -> None:
    assert "a number is too long" in str(fail(UP + "timeout = " + "9" * 5000 + "\n"))


def test_deep_nesting_is_a_config_error() -> None:
    assert "nested too deeply" in str(fail("x = " + "[" * 100_000))


def test_nested_array_tables_are_located() -> None:
    text = UP + '[[surveys]]\nid = "a"\n[[surveys]]\nid = "b"\n[[surveys.files]]\nx = 1\n'
    error = fail(text)
    assert error.key == "surveys[1].files" and error.line == 7


def test_config_error_without_line_or_key() -> None:
    error = ConfigError(Path("/x.toml"), "problem (fix)")
    assert str(error) == "/x.toml: problem (fix)"
    assert str(ConfigError("/x.toml", "a\nb", key="k", line=3)) == "/x.toml:3: k: a\\nb"


# --------------------------------------------------------------------------- no token leaks


@pytest.mark.parametrize(
    ("text", "env"),
    [
        (f'[upstream]\ntoken = "{TOKEN}"\ntimeout = "{TOKEN}"\n', {}),
        (f'[upstream]\ntoken = "{TOKEN[:20]}"\ntimeout = "{TOKEN[:20]}"\n', {}),
        (f'[upstream]\ntimeout = "{TOKEN}"\n', {}),
        (f'[upstream]\ntoken = "{TOKEN} extra"\n', {}),
        (f'[upstream]\ntoken = "Bearer {TOKEN}"\n', {}),
        (f'[upstream]\ntoken = "{TOKEN}\\n"\n', {}),
        (f'[upstream]\ntoken = ["{TOKEN}"]\n', {}),
        (f'[upstream]\ntoken = {{ value = "{TOKEN}" }}\n', {}),
        ("[upstream]\ntoken = 12345678901234567890\n", {}),
        (f'[upstream]\ntoken = "{TOKEN}"\ntoken_env = "T"\n', {"T": TOKEN}),
        (f"[upstream]\ntoken = {TOKEN}\n", {}),
        (f'[upstream]\ntoken = "{TOKEN}\n', {}),
        (f'[upstream]\ntoken = "{TOKEN}"\n[sync]\ntoken = "{TOKEN}"\n', {}),
        (
            f'[upstream]\ntoken = "{TOKEN[:20]}"\n[[surveys]]\nid = "{TOKEN[:20]}"\n'
            f'[[surveys]]\nid = "{TOKEN[:20]}"\n',
            {},
        ),
        (f'[upstream]\ntoken = "{TOKEN[:12]}"\n[http]\nlisten = "{TOKEN[:12]}:0"\n', {}),
        (f'[upstream]\nurl = "https://user:{TOKEN}@x/"\ntoken = "a"\n', {}),
        (f'[upstream]\nurl = "{TOKEN}://x/"\ntoken = "a"\n', {}),
        ('[upstream]\ntoken_env = "T"\n', {"T": f"{TOKEN} {TOKEN}"}),
        ('[upstream]\ntoken_env = "T"\n[sync]\ninterval = "T"\n', {"T": "Tlong"}),
        (f'[upstream]\ntoken_env = "T"\n[sync]\ninterval = "{TOKEN[:10]}"\n', {"T": TOKEN[:10]}),
    ],
)
def test_token_never_in_errors(text: str, env: dict[str, str]) -> None:
    error = fail(text, env)
    secrets = [TOKEN, TOKEN[:20], TOKEN[:12], TOKEN[:10], "12345678901234567890"]
    shown = f"{error} {error!r} {error.args} {error.key} {error.problem}"
    for secret in secrets:
        assert secret not in shown
    assert "Tlong" not in shown


def test_token_file_content_never_in_errors(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"{TOKEN}\nsecond line\n")
    error = fail('[upstream]\ntoken_file = "token"\n', path=tmp_path / "m.toml")
    assert "line breaks" in str(error) and TOKEN not in str(error)
    (tmp_path / "token").write_text(f"Bearer {TOKEN}")
    assert TOKEN not in str(fail('[upstream]\ntoken_file = "token"\n', path=tmp_path / "m.toml"))


# --------------------------------------------------------------------------- token sources


def test_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    text = '[upstream]\ntoken_env = "MIRRORD_T"\n'
    assert load(text, {"MIRRORD_T": " abc \n"}).upstream.token.reveal() == "abc"
    assert "MIRRORD_T is empty" in str(fail(text, {"MIRRORD_T": "  "}))
    monkeypatch.setenv("MIRRORD_T", "from-os")
    assert loads_config(text, CFG).upstream.token.reveal() == "from-os"


def test_token_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "m.toml"
    text = '[upstream]\ntoken_file = "token"\n'
    (tmp_path / "token").write_text("\n\n")
    assert "token file " + str(tmp_path / "token") + " is empty" in str(fail(text, path=cfg))
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    assert "is not UTF-8 text" in str(fail(text, path=cfg))
    (tmp_path / "token").write_bytes(b"x" * (64 * 1024 + 1))
    assert "too large" in str(fail(text, path=cfg))
    (tmp_path / "token").unlink()
    (tmp_path / "token").mkdir()
    assert "it is a directory" in str(fail(text, path=cfg))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    assert "permission denied (the mirrord service user" in str(fail(text, path=cfg))


def test_token_file_with_bom_and_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbfabc\r\n")
    cfg = load('[upstream]\ntoken_file = "token"\n', path=tmp_path / "m.toml")
    assert cfg.upstream.token.reveal() == "abc"


# --------------------------------------------------------------------------- reading the file


def test_load_config_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    error = _load_fail(missing)
    assert str(error) == (
        f"{missing}: cannot read config file: no such file (check the path) "
        "(copy config.example.toml there)"
    )
    assert "it is a directory" in str(_load_fail(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[upstream]\ntoken = "a"\nname = "\xff"\n')
    error = _load_fail(bad)
    assert error.line == 3 and "not UTF-8 text" in str(error)
    assert "invalid path" in str(_load_fail(Path("a\0b")))

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert "permission denied" in str(_load_fail(bad))


def _load_fail(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return info.value


def test_load_config_accepts_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_bytes(b'\xef\xbb\xbf[upstream]\r\ntoken = "abc"\r\n')
    assert load_config(path, env={}).upstream.token.reveal() == "abc"


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8765", "127.0.0.1", 8765),
        ("[::1]:8765", "::1", 8765),
        ("localhost:1", "localhost", 1),
        ("127.8.9.10:80", "127.8.9.10", 80),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
        ("[fe80::1]:80", "fe80::1", 80),
        ("my-host.lan:8080", "my-host.lan", 8080),
    ],
)
def test_listen(listen: str, host: str, port: int) -> None:
    # A token makes every address acceptable; test_non_loopback_listen_needs_a_token below.
    http = load(UP + f'[http]\nlisten = "{listen}"\ntoken = "{TOKEN}"\n').http
    assert (http.host, http.port) == (host, port)


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.255.0.9:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("LOCALHOST:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("192.168.1.20:1", False),
        ("[fe80::1]:1", False),
        ("mirror.local:1", False),
        ("localhost.evil.example:1", False),
    ],
)
def test_non_loopback_listen_needs_a_token(listen: str, loopback: bool) -> None:
    text = UP + f'[http]\nlisten = "{listen}"\n'
    if loopback:
        assert load(text).http.token is None and load(text).http.loopback
        return
    error = fail(text)
    assert error.key == "http.listen" and error.line == 4
    assert "is not a loopback address and [http] has no token" in str(error)
    assert "set token, token_file or token_env under [http]" in str(error)
    assert load(text + f'token = "{TOKEN}"\n').http.token == Secret(TOKEN)


def test_http_token_sources_and_defaults(tmp_path: Path) -> None:
    http = load(MINIMAL).http
    assert (http.token, http.allowed_origins, http.hosts) == (None, (), ())
    (tmp_path / "http-token").write_text(f"{TOKEN}\n")
    cfg = load(UP + '[http]\ntoken_file = "http-token"\n', path=tmp_path / "m.toml")
    assert cfg.http.token == Secret(TOKEN) and cfg.upstream.token == Secret("tok-123")
    env = {"H": TOKEN}
    assert load(UP + '[http]\ntoken_env = "H"\n', env).http.token == Secret(TOKEN)
    # The systemd credential is a fallback, as for [upstream] token.
    (tmp_path / "mirrord-http-token").write_text("from-credential")
    cred = load(UP, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).http.token
    assert cred == Secret("from-credential")
    assert TOKEN not in repr(load(UP + f'[http]\ntoken = "{TOKEN}"\n'))


def test_http_origins_and_hosts_are_normalised() -> None:
    text = UP + (
        '[http]\nallowed_origins = ["HTTP://LocalHost:3000", "https://app.example/",'
        ' "http://[::1]:8080"]\nhosts = ["Mirror.Local.", "192.168.1.20", "[fe80::1]"]\n'
    )
    http = load(text).http
    assert http.allowed_origins == (
        "http://localhost:3000",
        "https://app.example",
        "http://[::1]:8080",
    )
    assert http.hosts == ("mirror.local", "192.168.1.20", "fe80::1")


@pytest.mark.parametrize(
    ("text", "key", "expect"),
    [
        ('allowed_origins = "http://x"', "http.allowed_origins", "expected an array of strings"),
        ("allowed_origins = [1]", "http.allowed_origins[0]", "expected a string, got integer"),
        ('allowed_origins = ["*"]', "http.allowed_origins[0]", "'*' is not allowed"),
        ('allowed_origins = ["localhost:3000"]', "http.allowed_origins[0]", "bad origin"),
        ('allowed_origins = ["http://x/app"]', "http.allowed_origins[0]", "bad origin"),
        ('allowed_origins = ["ftp://x"]', "http.allowed_origins[0]", "bad origin"),
        ('allowed_origins = ["http://x:99999"]', "http.allowed_origins[0]", "bad origin"),
        ('hosts = ["a", "mirror.local:80"]', "http.hosts[1]", "bad host name"),
        ('hosts = ["bad_name"]', "http.hosts[0]", "without port"),
        ("hosts = true", "http.hosts", "expected an array of strings, got boolean"),
        ('token = "Bearer abc"', "http.token", "starts with 'Bearer '"),
        ('token = ""', "http.token", "value is empty"),
        ('token = "a"\ntoken_env = "X"', "http.token_env", "conflicts with http.token"),
        ('token_env = "NOPE"', "http.token_env", "NOPE is not set"),
    ],
)
def test_http_errors(text: str, key: str, expect: str) -> None:
    error = fail(UP + "[http]\n" + text + "\n")
    assert error.key == key and expect in str(error)
    assert error.line is not None and error.line >= 4


def test_http_token_never_in_errors() -> None:
    for text in (
        f'[http]\ntoken = "{TOKEN[:12]}"\nlisten = "{TOKEN[:12]}:0"\n',
        f'[http]\ntoken = "{TOKEN} x"\n',
        f'[http]\ntoken = "{TOKEN}"\nhosts = ["{TOKEN}:1"]\n',
    ):
        error = fail(UP + text)
        assert TOKEN not in str(error) and TOKEN[:12] not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.sentera.com/graphql",
        "http://127.0.0.1:8080/graphql",
        "http://[::1]:1/g?x=1",
    ],
)
def test_url_accepted(url: str) -> None:
    assert load(UP + f'url = "{url}"\n').upstream.url == url


# --------------------------------------------------------------------------- robustness


def _outcome(text: str) -> None:
    try:
        loads_config(text, CFG, env={"T": "abc"})
    except ConfigError as error:
        assert "\n" not in str(error)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_raises_only_config_error(text: str) -> None:
    _outcome(text)


_VALUES = st.sampled_from(
    [
        '"x"',
        '""',
        '"30s"',
        '"0"',
        '"127.0.0.1:8765"',
        '"[::1]:1"',
        '"https://h/g"',
        '"T"',
        "0",
        "-1",
        "1",
        "5",
        "1.5",
        "nan",
        "inf",
        "true",
        "1979-05-27",
        "[]",
        '["a"]',
        "[1, [2]]",
        "{}",
        '{ id = "a" }',
        "99999999999999999999",
        '"~/x"',
        '"a\\u0000"',
        '"\\t"',
        '"1h30m"',
    ]
)
_NAMES = st.sampled_from(sorted({n for s in SECTIONS.values() for n in s.keys} | {"zz"}))
_HEADERS = st.sampled_from(
    [f"[{s}]" for s in SECTIONS]
    + [f"[[{s}]]" for s in SECTIONS]
    + ["[zz]", "[upstream.oauth]", "[[surveys.files]]"]
)
_LINES = st.one_of(_HEADERS, st.builds(lambda n, v: f"{n} = {v}", _NAMES, _VALUES))


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINES, max_size=12))
def test_random_configs_raise_only_config_error(lines: list[str]) -> None:
    _outcome("\n".join(lines))
