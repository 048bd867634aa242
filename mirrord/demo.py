"""`mirrord demo`: the whole mirror working against the built-in fake upstream, no account."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from mirrord.config import load_config
from mirrord.fake_upstream import FakeData, FakeUpstream
from mirrord.sync import SyncRun, sync_from_config

DEMO_TOKEN = "demo-token"  # the fake upstream's own token: not a secret


def demo_config(url: str, survey_ids: list[str], field_ids: list[str]) -> str:
    surveys = "".join(f'\n[[surveys]]\nid = "{sid}"\n' for sid in survey_ids)
    fields = "".join(f'\n[[fields]]\nid = "{fid}"\n' for fid in field_ids)
    return (
        "# Written by `mirrord demo`: a config for the built-in fake upstream.\n"
        "# Every key is explained in config.example.toml.\n"
        f'[upstream]\nurl = "{url}"\ntoken = "{DEMO_TOKEN}"\ntimeout = "10s"\n\n'
        '[storage]\npath = "mirror.db"\n\n[sync]\ninterval = "1m"\n'
        f"{surveys}{fields}"
    )


def run_demo(directory: Path, *, images: int) -> int:
    return asyncio.run(_demo_once(directory, images))


async def _demo_once(directory: Path, images: int) -> int:
    from mirrord.cli import describe_run

    directory.mkdir(parents=True, exist_ok=True)
    data = FakeData(seed=7)
    big = data.add_survey(n_images=images)
    field = data.add_field(n_surveys=2, images_per_survey=max(1, images // 10))
    async with FakeUpstream(data, token=DEMO_TOKEN) as fake:
        config_path = directory / "mirrord.toml"
        config_path.write_text(demo_config(fake.url, [big], [field]))
        config = load_config(config_path)
        print(f"demo: fake upstream at {fake.url}; config written to {config_path}")
        started = time.monotonic()
        runs = await sync_from_config(config)
        seconds = time.monotonic() - started
    for run in runs:
        print(describe_run(run), file=sys.stdout if run.ok else sys.stderr)
    print(_summary(runs, config.storage.path, seconds))
    print(f"next: mirrord status -c {config_path}")
    return 0 if all(run.ok for run in runs) else 1


def _summary(runs: list[SyncRun], db: Path, seconds: float) -> str:
    images = sum(r.item_count for r in runs if r.kind == "images")
    surveys = sum(1 for r in runs if r.kind == "images")
    return (
        f"mirrored {images:,} images of {surveys} surveys into {db} in {seconds:.1f}s "
        f"({'all converged' if all(r.ok for r in runs) else 'NOT all converged'})"
    )
