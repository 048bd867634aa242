"""Fuzzing the local HTTP API from its own OpenAPI document with Schemathesis (issue #7 item 4).

The real `mirrord run` process serves a mirror of the fake upstream; Schemathesis's `st run`
(a child process, so this test's event loop keeps serving the fake upstream) loads GET
/v1/openapi.json from the daemon and sends, per operation, boundary values (coverage phase),
generated requests both valid and invalid (fuzzing phase, positive and negative), and
sequences that follow the document's links with real ids (stateful phase), over real sockets.
What every answer must be:

- never a 5xx (`not_a_server_error`), never a traceback, errors exactly
  `{"error": {"code", "message"}}` as JSON (`mirrord_error_format` in tests/fuzz_hooks.py);
- what the document says: status codes, content types, body schemas, headers, Allow on 405,
  invalid input refused (Schemathesis's other checks);
- and the daemon is up afterwards, logged no error, and still holds its whole mirror.

`positive_data_acceptance` is left out: a schema-valid request can still be refused for what
no schema can say (an opaque cursor this API never gave out, a bbox whose minimum exceeds its
maximum). Deterministic generation: CI sends the same requests every run, in about ten
seconds; `pytest -m slow` sends many more.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from mirrord.fake_upstream import FakeUpstream
from tests.test_daemon import DaemonProcess, config_text, free_port, launch, targets

ROOT = Path(__file__).resolve().parent.parent
CI_EXAMPLES = 25  # per operation (fuzzing phase), on top of the coverage and stateful cases
SOAK_EXAMPLES = 500
IMAGES = 60


async def _fuzz(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess], examples: int
) -> None:
    a = fake.data.add_survey(n_images=IMAGES)
    b = fake.data.add_survey(n_images=IMAGES)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a, b], interval="1h"))
    d = await launch(daemons, config, port)
    await d.wait_status(
        lambda s: all(targets(s).get(x, {}).get("last_outcome") == "converged" for x in (a, b))
    )
    st = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run",
        f"http://127.0.0.1:{port}/v1/openapi.json",
        "--max-examples", str(examples),
        "--generation-deterministic",
        "--workers", "1",
        "--request-timeout", "15",
        "--checks", "all",
        "--exclude-checks", "positive_data_acceptance",
        "--no-color",
        cwd=tmp_path,  # its report and cache stay out of the repository
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(ROOT),
             "COLUMNS": "120"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(st.communicate(), 600)
    report = out.decode(errors="replace")
    assert st.returncode == 0, report[-8000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", report)
    assert cases and cases[1] == cases[2], report[-3000:]
    assert int(cases[1]) >= 12 * min(examples, 25), report[-3000:]  # 12 operations, each fuzzed

    # The daemon stayed up, logged no error, and holds its whole mirror.
    assert d.proc is not None and d.proc.returncode is None
    status = await d.status()
    assert {t["id"]: t["image_count"] for t in status["targets"]} == {a: IMAGES, b: IMAGES}
    assert await d.stop() == 0
    assert not any("Traceback" in line for line in d.raw)
    assert not [line for line in d.lines if line.get("level") in ("error", "critical")]


async def test_fuzz_the_api_from_its_openapi_document(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    await _fuzz(tmp_path, fake, daemons, CI_EXAMPLES)


@pytest.mark.slow
async def test_fuzz_the_api_soak(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    await _fuzz(tmp_path, fake, daemons, SOAK_EXAMPLES)
