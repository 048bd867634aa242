"""The `mirrord` command: argparse subcommands, each one `asyncio.run` away from its work.

Exit codes: 0 success; 1 the work ran but did not fully succeed (a survey failed to converge);
2 usage, config or database errors (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mirrord import __version__
from mirrord.config import Config, ConfigError, load_config
from mirrord.store import CollectionStatus, FileTally, Store, StoreError
from mirrord.sync import SyncProgress, SyncRun

if TYPE_CHECKING:
    from mirrord.files import DownloadRound, VerifyReport

DEFAULT_CONFIG = "/etc/mirrord/mirrord.toml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with how mirrord was invoked; printed as one line, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
        return code
    except (ConfigError, StoreError, UsageError) as e:
        print(f"mirrord: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mirrord: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrord",
        description="Offline-first local mirror of Sentera FieldAgent image surveys.",
    )
    parser.add_argument("--version", action="version", version=f"mirrord {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    check = sub.add_parser("check-config", help="validate a config file (exit 0 or 2)")
    check.add_argument("path", nargs="?", help=f"config file (default: {DEFAULT_CONFIG})")
    check.add_argument("-c", "--config", dest="config_opt", help=argparse.SUPPRESS)
    check.set_defaults(handler=cmd_check_config)

    sync = sub.add_parser("sync", help="sync the configured surveys and fields once")
    _config_arg(sync)
    sync.add_argument(
        "--survey",
        action="extend",
        nargs="+",
        metavar="ID",
        help="sync only these surveys (repeatable)",
    )
    sync.add_argument(
        "--field",
        action="extend",
        nargs="+",
        metavar="ID",
        help="sync only these fields (repeatable)",
    )
    sync.add_argument(
        "--full",
        action="store_true",
        help="re-list every collection from scratch (a reconcile walk)",
    )
    sync.add_argument("--quiet", "-q", action="store_true", help="print only problems")
    sync.set_defaults(handler=cmd_sync)

    status = sub.add_parser("status", help="show what the mirror holds and how fresh it is")
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    run = sub.add_parser("run", help="run the daemon: scheduled syncs and the local HTTP API")
    _config_arg(run)
    run.set_defaults(handler=cmd_run)

    verify = sub.add_parser(
        "verify", help="check the image files on disk against the mirror (exit 0 or 1)"
    )
    _config_arg(verify)
    verify.add_argument(
        "--fix",
        action="store_true",
        help="re-queue missing or damaged files and delete stray ones",
    )
    verify.set_defaults(handler=cmd_verify)

    prune = sub.add_parser("prune", help="delete mirrored data of surveys no longer configured")
    _config_arg(prune)
    prune.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    prune.set_defaults(handler=cmd_prune)

    demo = sub.add_parser(
        "demo",
        help="run the daemon on a built-in fake upstream (no account needed); Ctrl-C stops it",
    )
    demo.add_argument("--once", action="store_true", help="sync once, print a summary, exit")
    demo.add_argument("--dir", default="mirrord-demo", help="demo directory (default: %(default)s)")
    demo.add_argument(
        "--images",
        type=int,
        default=3000,
        help="images in the largest demo survey (default: %(default)s)",
    )
    demo.add_argument(
        "--port",
        type=int,
        default=8765,
        help="HTTP API port, or the next free one (default: %(default)s; 0: any free port)",
    )
    demo.add_argument(
        "--tick",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between simulated upstream changes (default: %(default)s)",
    )
    demo.add_argument(
        "--interval",
        default="10s",
        metavar="DURATION",
        help="the daemon's sync interval (default: %(default)s)",
    )
    demo.add_argument(
        "--ticks",
        type=int,
        metavar="N",
        help="simulate N ticks of field life, then leave upstream still (default: forever)",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("MIRRORD_CONFIG", DEFAULT_CONFIG),
        help=f"config file (default: $MIRRORD_CONFIG or {DEFAULT_CONFIG})",
    )


# ---- check-config -------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config_opt or os.environ.get("MIRRORD_CONFIG", DEFAULT_CONFIG)
    config = load_config(path)
    print(
        f"{config.path}: ok ({_plural(len(config.surveys), 'survey')}, "
        f"{_plural(len(config.fields), 'field')}, mirror at {config.storage.path})"
    )
    return EXIT_OK


# ---- sync ---------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    surveys, fields = _selection(config, args.survey, args.field)
    return run_sync_command(config, surveys, fields, full=args.full, quiet=args.quiet)


def run_sync_command(
    config: Config,
    surveys: Sequence[str] | None,
    fields: Sequence[str] | None,
    *,
    full: bool = False,
    quiet: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    from mirrord.files import sync_and_download

    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not quiet else None
    runs, files = asyncio.run(
        sync_and_download(
            config, surveys=surveys, fields=fields, full=full, progress=bar.update if bar else None
        )
    )
    if bar:
        bar.clear()
    for run in runs:
        if not quiet or not run.ok:
            print(describe_run(run), file=out if run.ok else sys.stderr)
    files_ok = files is None or (files.failed == 0 and files.expired == 0 and not files.blocked)
    if files is not None and (not quiet or not files_ok):
        print(describe_files(files), file=out if files_ok else sys.stderr)
    return EXIT_OK if all(run.ok for run in runs) and files_ok else EXIT_FAILED


def describe_files(files: DownloadRound) -> str:
    line = (
        f"files: {files.done:,} downloaded ({files.bytes / 1e6:,.1f} MB), {files.removed:,} removed"
    )
    if files.failed:
        line += f", {files.failed:,} failed (tried again next sync)"
    if files.expired:
        line += f", {files.expired:,} waiting for a fresh URL"
    if files.blocked:
        line += f": {files.blocked}"
    return line


def _selection(
    config: Config, surveys: list[str] | None, fields: list[str] | None
) -> tuple[list[str] | None, list[str] | None]:
    """--survey/--field narrow the run; naming either leaves the other kind out."""
    if not surveys and not fields:
        if not config.surveys and not config.fields:
            raise UsageError(
                f"{config.path}: no [[surveys]] or [[fields]] configured: nothing to sync"
            )
        return None, None
    return list(surveys or []), list(fields or [])


def describe_run(run: SyncRun) -> str:
    what = "survey" if run.kind == "images" else "field"
    head = f"{what} {run.parent_id}: {run.outcome}"
    counts = (
        f"{run.item_count:,} {run.kind}, {_plural(run.pages, 'page')}, "
        f"+{run.upserted:,} -{run.deleted:,}"
    )
    if run.failed:
        counts += f", {run.failed:,} failed upstream"
    if run.full_walk:
        counts += ", full walk"
    line = f"{head} ({counts}, {run.seconds:.1f}s)"
    if run.error:
        line += f": {run.error}"
    return line


class ProgressBar:
    """One redrawn line on a terminal; remaining_count gives the total."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def update(self, p: SyncProgress) -> None:
        total = p.applied + p.remaining
        done = p.applied
        width = 30
        filled = width if total == 0 else int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        label = p.parent_id if len(p.parent_id) <= 32 else p.parent_id[:31] + "…"
        self.stream.write(f"\r{label:<32} [{bar}] {done:,}/{total:,} page {p.pages}\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


# ---- run ----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from mirrord import logs
    from mirrord.daemon import StartupError, run_daemon

    logs.configure()
    try:
        return run_daemon(Path(args.config))
    except StartupError as e:
        raise UsageError(str(e)) from None


# ---- verify -------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from mirrord.files import verify_files

    config = load_config(args.config)

    async def check() -> VerifyReport:
        async with await Store.open(config.storage.path, readonly=not args.fix) as store:
            return await verify_files(store, config.storage.files_dir, fix=args.fix)

    report = asyncio.run(check())
    for sentera_id in report.missing:
        print(f"missing or damaged: the file of image {sentera_id}")
    for path in report.stray:
        print(f"stray: {path} (the mirror does not know it)")
    verdict = f"{report.checked:,} files checked in {config.storage.files_dir}"
    if report.clean:
        print(f"{verdict}: all present and the right size")
        return EXIT_OK
    problems = f"{len(report.missing):,} missing or damaged, {len(report.stray):,} stray"
    if args.fix:
        print(f"{verdict}: {problems}; fixed (missing files download again after the next sync)")
        return EXIT_OK
    print(f"{verdict}: {problems} (run `mirrord verify --fix` to repair)")
    return EXIT_FAILED


# ---- prune --------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return asyncio.run(_prune(config, assume_yes=args.yes))


def prunable(config: Config, statuses: list[CollectionStatus]) -> list[CollectionStatus]:
    """Collections the config no longer asks for: surveys neither configured nor brought by a
    configured field, and fields no longer configured."""
    surveys = {s.id for s in config.surveys}
    fields = {f.id for f in config.fields}
    origins = {f"field:{f}" for f in fields}
    return [
        s
        for s in statuses
        if (s.kind == "images" and s.parent_id not in surveys and s.origin not in origins)
        or (s.kind == "surveys" and s.parent_id not in fields)
    ]


async def _prune(config: Config, *, assume_yes: bool) -> int:
    store = await Store.open(config.storage.path)
    try:
        doomed = prunable(config, await store.statuses())
        if not doomed:
            print("nothing to prune: every mirrored survey and field is configured")
            return EXIT_OK
        print("these are no longer configured; pruning deletes their mirrored data:")
        for s in doomed:
            what = "survey" if s.kind == "images" else "field"
            print(f"  {what} {s.parent_id} ({s.item_count:,} {s.kind})")
        if not assume_yes and not _confirm("delete them?"):
            print("nothing deleted")
            return EXIT_FAILED
        for s in doomed:
            coll = await store.find_collection(s.kind, s.parent_id)
            if coll is not None:
                await store.drop_collection(coll)
        removed = await remove_unwanted_files(config, store)
        print(
            f"pruned {_plural(len(doomed), 'collection')}"
            + (f" and {_plural(removed, 'image file')}" if removed else "")
        )
        return EXIT_OK
    finally:
        await store.close()


async def remove_unwanted_files(config: Config, store: Store) -> int:
    from mirrord.files import Downloader

    # Removing needs no session: the downloader is not entered.
    return await Downloader.for_config(config, store).remove_unwanted()


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("not a terminal to ask on: run `mirrord prune --yes` to delete")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


# ---- status -------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    statuses, tallies = asyncio.run(_read_statuses(config.storage.path))
    if args.json:
        collections = [
            s.as_dict()
            | ({"files": tallies[s.parent_id].as_dict()} if s.parent_id in tallies else {})
            for s in statuses
        ]
        print(
            json.dumps({"mirror": str(config.storage.path), "collections": collections}, indent=2)
        )
        return EXIT_OK
    print(render_status(config, statuses, tallies))
    return EXIT_OK


def _with_files(entry: dict[str, Any], tally: FileTally | None) -> dict[str, Any]:
    return (
        entry if tally is None or entry["kind"] != "images" else entry | {"files": tally.as_dict()}
    )


async def _read_statuses(
    path: Path,
) -> tuple[list[CollectionStatus], dict[str, FileTally]]:
    store = await Store.open(path, readonly=True)
    try:
        return await store.statuses(), await store.file_tallies()
    finally:
        await store.close()


def render_status(
    config: Config, statuses: list[CollectionStatus], tallies: dict[str, FileTally] | None = None
) -> str:
    """A table, one row per survey/field; `!` marks a last error, `?` a survey no longer
    configured (kept until pruned)."""
    configured = {s.id for s in config.surveys} | {f.id for f in config.fields}
    width = max([len(s.parent_id) for s in statuses] + [2])
    lines = [
        f"mirror {config.storage.path}",
        f"  {'kind':7} {'id':{width}} {'items':>8} {'remaining':>9} {'failed':>6}  last success",
    ]
    for s in statuses:
        orphan = s.origin == "config" and s.parent_id not in configured
        mark = "!" if s.last_error else ("?" if orphan else " ")
        kind = "survey" if s.kind == "images" else "field"
        remaining = "-" if s.remaining_count is None else f"{s.remaining_count:,}"
        lines.append(
            f"{mark} {kind:7} {s.parent_id:{width}} {s.item_count:>8,} {remaining:>9} "
            f"{s.failed_count:>6}  {ago(s.last_success_at)}"
        )
        tally = (tallies or {}).get(s.parent_id) if s.kind == "images" else None
        if tally is not None:
            lines.append(f"    files: {_describe_tally(tally)}")
        if s.last_error:
            lines.append(f"    last error ({s.last_outcome}): {s.last_error}")
        elif orphan:
            lines.append("    no longer in the config: its data stays until pruned")
    if not statuses:
        lines.append("  (nothing mirrored yet: run `mirrord sync`)")
    return "\n".join(lines)


def _describe_tally(t: FileTally) -> str:
    text = f"{t.done:,} of {t.done + t.pending + t.failed + t.expired:,} on disk"
    text += f" ({t.bytes_done / 1e6:,.1f} of {t.bytes_wanted / 1e6:,.1f} MB)"
    for count, what in ((t.pending, "pending"), (t.expired, "waiting for a fresh URL")):
        if count:
            text += f", {count:,} {what}"
    if t.failed:
        text += f", {t.failed:,} failed (see /v1/status)"
    return text


def ago(timestamp: str | None, now: datetime | None = None) -> str:
    if timestamp is None:
        return "never"
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            return f"{_plural(seconds // size, unit)} ago"
    return "just now"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# ---- demo ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from mirrord.demo import DemoError, run_demo  # the fake upstream is only loaded for the demo

    if args.images < 1 or not 0 <= args.port <= 65535 or not args.tick > 0:
        raise UsageError("demo: --images must be at least 1, --port 0-65535, --tick above 0")
    if args.ticks is not None and args.ticks < 0:
        raise UsageError("demo: --ticks must be 0 or more")
    try:
        return run_demo(
            Path(args.dir),
            images=args.images,
            once=args.once,
            port=args.port,
            tick=args.tick,
            interval=args.interval,
            ticks=args.ticks,
        )
    except DemoError as e:
        raise UsageError(str(e)) from None
