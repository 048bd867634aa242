"""A faithful fake of Sentera's FieldAgent GraphQL upstream (see shared/upstream/PROTOCOL.md).

Real parts only: a real aiohttp server on an ephemeral loopback port, and real GraphQL
(graphql-core parses, validates and executes every request against mirrord/upstream.graphql).
On top of that:

- `FakeData`: deterministic, fast generated fields, surveys and images that tests mutate.
- `Behaviour`: every point PROTOCOL.md leaves undocumented, switchable, so the client can be
  proven correct whichever way the real server behaves.
- `Faults`: link and server failures (5xx, 429, cut-off bodies, resets, garbage, ...).
- Image files at the signed `url`s, with Range, and `FileFaults` for downloads
  (mirrord/fake_files.py).
- A JSON control API under `/_fake/` and `python -m mirrord.fake_upstream` for tests and demos
  that run the fake in another process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from random import Random
from typing import Any, Literal, NamedTuple, get_args

from aiohttp import web
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLResolveInfo,
    GraphQLSchema,
    ListValueNode,
    StringValueNode,
    VariableNode,
    execute_sync,
)
from graphql.language import FieldNode

from mirrord import gql
from mirrord.fake_files import (
    FILE_FAULT_KINDS,
    FileFault,
    FileFaults,
    FileRequest,
    ServedFile,
    file_chunks,
    s3_error,
    serve_file,
)

__all__ = [
    "FAULT_KINDS",
    "FILE_FAULT_KINDS",
    "IMAGE_FIELDS",
    "SURVEY_FIELDS",
    "Behaviour",
    "FakeData",
    "FakeOAuth",
    "FakeUpstream",
    "Fault",
    "Faults",
    "FileFault",
    "FileFaults",
    "FileRequest",
    "RequestRecord",
    "TokenRequest",
    "main",
]

Item = dict[str, Any]

OldHashMode = Literal["never", "same_answer", "before", "after"]
OrderMode = Literal["deleted_first", "upserted_first", "shuffled"]
UnknownHashMode = Literal["ignore", "deleted", "failed"]
EmptyFailedMode = Literal["empty_list", "null"]

# Field order follows the SDL so exported dicts read like a GraphQL answer.
IMAGE_FIELDS: tuple[str, ...] = (
    "sentera_id",
    "content_hash",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
    "filename",
    "download_filename",
    "latitude",
    "longitude",
    "altitude",
    "captured_at",
    "camera_make",
    "camera_model",
    "sensor_type",
    "size",
    "orientation",
    "pitch",
    "roll",
    "yaw",
    "gps_carrier_phase_status",
    "gps_horizontal_accuracy",
    "gps_vertical_accuracy",
    "url",
)
SURVEY_FIELDS: tuple[str, ...] = (
    "sentera_id",
    "content_hash",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
    "name",
)


# --------------------------------------------------------------------------------------------
# Behaviour: the undocumented parts of the contract
# --------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "old_hash_in_deleted": get_args(OldHashMode),
    "order": get_args(OrderMode),
    "unknown_hashes": get_args(UnknownHashMode),
    "empty_failed": get_args(EmptyFailedMode),
}


@dataclass
class Behaviour:
    """How the fake answers where PROTOCOL.md is silent; each field is one undocumented point.

    old_hash_in_deleted: how an UPDATED item's old hash (held by the client) is reported in
      `deleted`: "never"; "same_answer" (beside the new version); "before" (in an answer that
      withholds the new version; the new version comes once the client stops sending the old
      hash); "after" (the new version first; the server remembers per token and parent that it
      owes the stale report and sends it in a later answer, even though the client no longer
      sends that hash).
    order: which list fills the page first; "shuffled" = random per item, and each list's
      items are shuffled too (seeded).
    shared_limit: True -> len(deleted) + len(upserted) <= limit; False -> a limit per list.
    unknown_hashes: a hash never issued: ignored; in `deleted` (sentera_id ""); or in `failed`
      (key = the hash, code "UNKNOWN_HASH").
    failed_in_remaining: whether entries in `failed` count in remaining_count (the exact
      arithmetic is in _compute_sync's docstring).
    empty_failed: an answer with no failures carries `failed: []` or `failed: null` (the
      schema allows both).
    """

    old_hash_in_deleted: OldHashMode = "same_answer"
    order: OrderMode = "deleted_first"
    shared_limit: bool = True
    unknown_hashes: UnknownHashMode = "ignore"
    failed_in_remaining: bool = True
    image_page_limit: int = 1000
    survey_page_limit: int = 2000
    empty_failed: EmptyFailedMode = "empty_list"

    def __post_init__(self) -> None:
        # Fail at the typo, not as a mysteriously passing test later.
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Behaviour.{name} must be one of {allowed}")
        for name in ("shared_limit", "failed_in_remaining"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Behaviour.{name} must be a bool")
        for name in ("image_page_limit", "survey_page_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Behaviour.{name} must be a positive int")


# --------------------------------------------------------------------------------------------
# Generated data
# --------------------------------------------------------------------------------------------

_BASE_EPOCH = 1_717_423_200  # 2024-06-03T14:00:00Z, a plausible flying day
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ID_SPACE = 26**5
_ID_STRIDE = 4_999_999  # coprime to 26, so consecutive serials scatter over distinct tags
_GRID_COLS = 250
_NOISE_BYTES = 9  # random bytes per generated image
_ROW_DEG = 2.5e-5  # ~2.8 m between flight lines
_COL_DEG = 3.5e-5  # ~2.7 m between shots at 45°N
_CAMERAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("6X", ("RGB", "NIR", "RED_EDGE", "MULTISPECTRAL")),
    ("65R", ("RGB",)),
    ("6X Thermal", ("RGB", "THERMAL")),
    ("Double 4K", ("RGB", "CIR")),
)


_PAIRS = tuple(a + b for a in _LETTERS for b in _LETTERS)
_TWO_DIGITS = tuple(f"{i:02d}" for i in range(100))


@functools.lru_cache(maxsize=4096)
def _date(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


@functools.cache
def _times_of_day() -> tuple[str, ...]:
    return tuple(
        f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)
    )


def _iso(epoch: float) -> str:
    # Table lookups: strftime+gmtime were a large part of generating 100,000 images.
    day, second = divmod(int(epoch), 86_400)
    return f"{_date(day)}T{_times_of_day()[second]}Z"


def _tag(serial: int) -> str:
    """Seven chars like "jkxco43": unique for the first 26**5 serials, scrambled to look real."""
    x, low = divmod(serial * _ID_STRIDE % _ID_SPACE, 676)
    high, mid = divmod(x, 676)
    return _PAIRS[low] + _PAIRS[mid] + _LETTERS[high] + _TWO_DIGITS[serial % 100]


def _size_range(file_sizes: tuple[int, int] | None) -> tuple[int, int]:
    """(lowest size, span) for _new_image, which scales two random bytes onto the span."""
    if file_sizes is None:
        return 1_000_000, 290 * 65_535  # 1 to 20 MB, exactly the sizes of before file_sizes
    lo, hi = file_sizes
    if not 1 <= lo <= hi:
        raise ValueError("file_sizes must be (lo, hi) with 1 <= lo <= hi")  # no empty images
    return lo, hi - lo


class _Scope:
    """One parent's items: a survey's images or a field's surveys.

    Versions are never mutated in place (an update stores a new dict), so an answer already
    computed is not changed by later mutations, and `issued` can keep old versions as-is.
    """

    __slots__ = ("current", "current_hashes", "issued")

    def __init__(self) -> None:
        self.current: dict[str, Item] = {}  # sentera_id -> current version
        self.issued: dict[str, Item] = {}  # every content_hash ever given here -> that version
        # Lets a sync set-subtract in C instead of looking up 100,000 hashes one by one.
        self.current_hashes: set[str] = set()

    def put(self, item: Item) -> None:
        old = self.current.get(item["sentera_id"])
        if old is not None:
            self.current_hashes.discard(old["content_hash"])
        self.current[item["sentera_id"]] = item
        self.issued[item["content_hash"]] = item
        self.current_hashes.add(item["content_hash"])

    def remove(self, sentera_id: str) -> None:
        old = self.current.pop(sentera_id)
        self.current_hashes.discard(old["content_hash"])


@dataclass(eq=False)
class _Field:
    name: str
    lat: float
    lon: float
    surveys: _Scope = field(default_factory=_Scope)


@dataclass(eq=False)
class _Survey:
    field_id: str
    tag: str
    lat: float
    lon: float
    altitude_cm: int
    heading_cdeg: int
    camera: str
    bands: tuple[str, ...]
    flight_start: float
    cols: int = _GRID_COLS  # images per flight line
    images: _Scope = field(default_factory=_Scope)
    next_index: int = 1
    # Grid coordinates, rounded once here rather than per image.
    row_lats: list[float] = field(default_factory=list)
    col_lons: list[float] = field(default_factory=list)

    def grow_grid(self, last_index: int) -> None:
        if not self.col_lons:
            self.col_lons = [round(self.lon + c * _COL_DEG, 7) for c in range(self.cols)]
        rows = (last_index - 1) // self.cols + 1
        for r in range(len(self.row_lats), rows):
            self.row_lats.append(round(self.lat + r * _ROW_DEG, 7))


class FakeData:
    """Deterministic fields, surveys and images; the same seed and calls give the same data.

    `file_sizes=(lo, hi)` draws each image's `size` in [lo, hi] (tests use tiny files); None
    keeps 1 to 20 MB. Each image's file (`file_bytes`) is deterministic from its sentera_id
    and content_hash, so an update changes the bytes (not the size).
    """

    def __init__(self, seed: int = 0, file_sizes: tuple[int, int] | None = None) -> None:
        self.seed = seed
        self.file_sizes = file_sizes
        self._size_range = _size_range(file_sizes)
        self._rng = Random(seed)
        self._serial = 0
        self._now = float(_BASE_EPOCH)
        self._hashes: set[str] = set()
        self._fields: dict[str, _Field] = {}
        self._surveys: dict[str, _Survey] = {}
        self._suffix = f"FAKE{seed}_CV_fake_{self._rng.getrandbits(28):07x}_240603_140000"
        self._users = tuple({"sentera_id": self._new_id("US")} for _ in range(3))
        self._url_key = self._rng.getrandbits(128).to_bytes(16, "big")
        self._signer = (-1, hashlib.blake2b())  # (expires, keyed hasher primed with it)
        # Items whose sentera_id is here are answered in `failed` instead of `upserted`.
        self.failing: set[str] = set()
        # Set by FakeUpstream.start(); image URLs point at the fake itself.
        self.base_url = "http://127.0.0.1:0"
        # One expiry per run keeps URLs stable, so answers compare equal to images().
        self._expires_high = 0  # the latest expiry ever issued, for expire_urls()
        self.url_expires = int(time.time()) + 3600
        self.url_revoked_through = 0  # URLs expiring at or before this are void (403)

    # ---- ids, hashes, clock ----------------------------------------------------------------

    def _new_id(self, kind: str) -> str:
        return self._new_ids(kind, 1)[0]

    def _new_ids(self, kind: str, n: int) -> list[str]:
        first, self._serial = self._serial + 1, self._serial + n
        suffix = f"_{kind}_{self._suffix}"
        return [_tag(serial) + suffix for serial in range(first, first + n)]

    def _new_hash(self) -> str:
        return self._new_hashes(1)[0]

    def _new_hashes(self, n: int) -> list[str]:
        """n hashes never issued before, so an update always gets a new one.

        12 random bytes encode to exactly 16 base64 chars, so one encode of 12*n bytes cut
        every 16 chars gives n hashes at a fraction of the per-hash cost.
        """
        while True:
            text = binascii.b2a_base64(self._rng.randbytes(12 * n), newline=False).decode()
            hashes = [text[i : i + 16] for i in range(0, 16 * n, 16)]
            fresh = set(hashes)
            if len(fresh) == n and fresh.isdisjoint(self._hashes):
                self._hashes |= fresh
                return hashes

    def _tick(self) -> float:
        self._now += 60.0
        return self._now

    def _user(self) -> dict[str, str]:
        return self._rng.choice(self._users)

    # ---- lookups -----------------------------------------------------------------------------

    def field_ids(self) -> list[str]:
        return list(self._fields)

    def survey_ids(self, field_id: str | None = None) -> list[str]:
        if field_id is None:
            return list(self._surveys)
        return list(self._field(field_id).surveys.current)

    def field_of(self, survey_id: str) -> str:
        return self._survey(survey_id).field_id

    def _field(self, field_id: str) -> _Field:
        try:
            return self._fields[field_id]
        except KeyError:
            raise KeyError(f"no field {field_id!r}") from None

    def _survey(self, survey_id: str) -> _Survey:
        try:
            return self._surveys[survey_id]
        except KeyError:
            raise KeyError(f"no survey {survey_id!r}") from None

    def _scope_for(self, query_field: str, parent_id: str) -> _Scope | None:
        if query_field == "sync_images":
            survey = self._surveys.get(parent_id)
            return survey.images if survey else None
        parent = self._fields.get(parent_id)
        return parent.surveys if parent else None

    # ---- fields and surveys -------------------------------------------------------------------

    def add_field(self, n_surveys: int = 0, images_per_survey: int = 0) -> str:
        k = len(self._fields)
        rng = self._rng
        field_id = self._new_id("FD")
        self._fields[field_id] = _Field(
            name=f"Field {k + 1}",
            lat=45.32 + 0.03 * k + rng.uniform(-0.002, 0.002),
            lon=-93.52 - 0.04 * k + rng.uniform(-0.002, 0.002),
        )
        for _ in range(n_surveys):
            self.add_survey(images_per_survey, field_id)
        return field_id

    def add_survey(
        self, n_images: int = 0, field_id: str | None = None, grid_cols: int = _GRID_COLS
    ) -> str:
        """Add a survey to `field_id`, or to the first field (created if there is none).

        `grid_cols`: images per flight line (the demo flies squarer fields than the default).
        """
        if isinstance(grid_cols, bool) or not isinstance(grid_cols, int) or grid_cols < 1:
            raise ValueError("grid_cols must be a positive int")
        if field_id is None:
            field_id = next(iter(self._fields), None) or self.add_field()
        parent = self._field(field_id)
        rng, now = self._rng, self._tick()
        camera, bands = rng.choice(_CAMERAS)
        survey_id = self._new_id("CO")
        self._surveys[survey_id] = _Survey(
            field_id=field_id,
            tag=survey_id[:7],
            lat=parent.lat + rng.uniform(-0.003, 0.003),
            lon=parent.lon + rng.uniform(-0.003, 0.003),
            altitude_cm=rng.randrange(28_000, 32_000),
            heading_cdeg=rng.randrange(18_000),
            camera=camera,
            bands=bands,
            flight_start=now - 3600.0,
            cols=grid_cols,
        )
        stamp, user = _iso(now), self._user()
        parent.surveys.put(
            {
                "sentera_id": survey_id,
                "content_hash": self._new_hash(),
                "created_at": stamp,
                "created_by": user,
                "updated_at": stamp,
                "updated_by": user,
                "name": f"{parent.name} {stamp[:10]} {camera}",
            }
        )
        if n_images:
            self.add_images(survey_id, n_images)
        return survey_id

    def update_survey(self, survey_id: str) -> None:
        parent = self._field(self._survey(survey_id).field_id)
        old = parent.surveys.current[survey_id]
        stamp = _iso(self._tick())
        parent.surveys.put(
            {
                **old,
                "content_hash": self._new_hash(),
                "updated_at": stamp,
                "updated_by": self._user(),
                "name": f"{old['name'].split(' (edited')[0]} (edited {stamp})",
            }
        )

    def delete_survey(self, survey_id: str) -> None:
        """Remove the survey from its field; its images go with it (sync_images -> NOT_FOUND)."""
        survey = self._survey(survey_id)
        self._field(survey.field_id).surveys.remove(survey_id)
        del self._surveys[survey_id]
        self.failing.discard(survey_id)

    # ---- images ------------------------------------------------------------------------------

    def add_images(self, survey_id: str, n: int) -> list[str]:
        survey = self._survey(survey_id)
        stamp, user = _iso(self._tick()), self._user()
        first = survey.next_index
        survey.next_index += n
        survey.grow_grid(first + n - 1)
        ids, hashes = self._new_ids("IM", n), self._new_hashes(n)
        noise = self._rng.randbytes(_NOISE_BYTES * n)
        put, sizes = survey.images.put, self._size_range
        for k in range(n):
            put(self._new_image(survey, first + k, ids[k], hashes[k], noise, k, stamp, user, sizes))
        return ids

    @staticmethod
    def _new_image(
        s: _Survey,
        index: int,
        sentera_id: str,
        content_hash: str,
        noise: bytes,
        k: int,
        stamp: str,
        user: dict[str, str],
        sizes: tuple[int, int],
    ) -> Item:
        # Runs 100,000 times per big survey, hence random bytes instead of random() calls and
        # integer arithmetic then one division (short decimals without round()).
        o = _NOISE_BYTES * k
        cols = s.cols
        row, col = divmod(index - 1, cols)
        odd = row & 1  # serpentine flight lines, like a real mission plan
        filename = f"IMG_{index:05d}.jpg"
        return {
            "sentera_id": sentera_id,
            "content_hash": content_hash,
            "created_at": stamp,
            "created_by": user,
            "updated_at": stamp,
            "updated_by": user,
            "filename": filename,
            "download_filename": f"{s.tag}-{filename}",
            "latitude": s.row_lats[row],
            "longitude": s.col_lons[cols - 1 - col if odd else col],
            "altitude": (s.altitude_cm + (noise[o] - 128) * 3 // 2) / 100,
            "captured_at": _iso(s.flight_start + index * 2),
            "camera_make": "Sentera",
            "camera_model": s.camera,
            "sensor_type": s.bands[index % len(s.bands)],
            "size": sizes[0] + (noise[o + 1] << 8 | noise[o + 2]) * sizes[1] // 65_535,
            "orientation": 1,
            "pitch": (noise[o + 3] - 128) * 23 / 1000,
            "roll": (noise[o + 4] - 128) * 23 / 1000,
            "yaw": (s.heading_cdeg + 18_000 * odd + (noise[o + 5] - 128) * 2) % 36_000 / 100,
            "gps_carrier_phase_status": "FIXED" if noise[o + 6] < 230 else "FLOAT",
            "gps_horizontal_accuracy": (10 + noise[o + 7] % 50) / 1000,
            "gps_vertical_accuracy": (20 + noise[o + 8] % 80) / 1000,
            "url": None,  # made per answer from base_url, see image_url()
        }

    def update_images(
        self, survey_id: str, n: int | None = None, ids: list[str] | None = None
    ) -> list[str]:
        """Give `ids` (or `n` random images) new metadata and a new content_hash."""
        survey = self._survey(survey_id)
        chosen = self._pick(survey.images, n, ids)
        stamp, user, rnd = _iso(self._tick()), self._user(), self._rng.random
        for image_id in chosen:
            old = survey.images.current[image_id]
            survey.images.put(
                {
                    **old,
                    "content_hash": self._new_hash(),
                    "updated_at": stamp,
                    "updated_by": user,
                    "altitude": (round(old["altitude"] * 100) + int(rnd() * 100) - 50) / 100,
                    "gps_horizontal_accuracy": (10 + int(rnd() * 50)) / 1000,
                }
            )
        return chosen

    def delete_images(
        self, survey_id: str, n: int | None = None, ids: list[str] | None = None
    ) -> list[str]:
        survey = self._survey(survey_id)
        chosen = self._pick(survey.images, n, ids)
        for image_id in chosen:
            survey.images.remove(image_id)
        return chosen

    def _pick(self, scope: _Scope, n: int | None, ids: list[str] | None) -> list[str]:
        if ids is not None:
            missing = [i for i in ids if i not in scope.current]
            if missing:
                raise KeyError(f"no such items: {missing[:5]}")
            return list(dict.fromkeys(ids))
        if n is None:
            raise ValueError("give n or ids")
        population = list(scope.current)
        return self._rng.sample(population, min(n, len(population)))

    def set_failing(self, ids: Set[str]) -> None:
        """Answer these items in `failed` instead of `upserted` until set_failing(set()).

        Only while the client lacks the item's current version: an item it already holds is
        not serialized, so it cannot fail.
        """
        self.failing = set(ids)

    # ---- views -------------------------------------------------------------------------------

    @property
    def url_expires(self) -> int:
        """The expiry (epoch seconds) that URLs issued from now on carry."""
        return self._url_expires

    @url_expires.setter
    def url_expires(self, value: int) -> None:
        # Tests set it (to the past, say); expire_urls() must still void every URL issued.
        self._url_expires = value
        self._expires_high = max(self._expires_high, value)

    def expire_urls(self) -> int:
        """Void every file URL issued so far (403 from now on), as if an hour had passed.

        URLs in later answers carry a later expiry, so they differ and work. Returns it.
        """
        self.url_revoked_through = self._expires_high
        self.url_expires = max(self._expires_high + 1, int(time.time()) + 3600)
        return self._url_expires

    def url_refusal(self, sentera_id: str, expires: str, sig: str) -> tuple[str, str] | None:
        """Why a file URL with these query values gets 403, as S3's (code, message); None if
        it is good. The signature covers sentera_id and expires only, not the content_hash."""
        good = expires.isascii() and expires.isdigit() and len(expires) < 19  # fits an int64
        expected = self.url_signature(sentera_id, int(expires)) if good else ""
        if not (good and hmac.compare_digest(sig.encode(), expected.encode())):
            return "SignatureDoesNotMatch", "The request signature does not match"
        if int(expires) < time.time() or int(expires) <= self.url_revoked_through:
            return "AccessDenied", "Request has expired"
        return None

    def url_signature(self, sentera_id: str, expires: int) -> str:
        """The `sig` of a file URL; the file server checks it with this."""
        if self._signer[0] != expires:
            signer = hashlib.blake2b(key=self._url_key, digest_size=16)
            signer.update(f"{expires}:".encode())
            self._signer = (expires, signer)
        # Copying a keyed, primed hasher is much cheaper than keying a new one per image.
        signer = self._signer[1].copy()
        signer.update(sentera_id.encode())
        return signer.hexdigest()

    def image_url(self, image: Mapping[str, Any]) -> str:
        sentera_id, expires = image["sentera_id"], self._url_expires
        sig = self.url_signature(sentera_id, expires)
        return f"{self.base_url}/files/{sentera_id}?expires={expires}&sig={sig}"

    def served_file(self, sentera_id: str) -> ServedFile | None:
        """The current file of a current image; None if no survey holds that image."""
        for survey in self._surveys.values():
            image = survey.images.current.get(sentera_id)
            if image is not None:
                chash, size, filename = image["content_hash"], image["size"], image["filename"]
                return ServedFile(sentera_id, chash, size, filename)
        return None

    def _file_chunks(self, sentera_id: str) -> Iterator[bytes]:
        file = self.served_file(sentera_id)
        if file is None:
            raise KeyError(f"no image {sentera_id!r}")
        return file_chunks(file.sentera_id, file.content_hash, file.size)

    def file_bytes(self, sentera_id: str) -> bytes:
        """The whole current file of an image: `size` bytes, what GET on its url serves."""
        return b"".join(self._file_chunks(sentera_id))

    def file_sha256(self, sentera_id: str) -> str:
        """Hex SHA-256 of file_bytes(sentera_id), computed without holding the whole file."""
        digest = hashlib.sha256()
        for chunk in self._file_chunks(sentera_id):
            digest.update(chunk)
        return digest.hexdigest()

    def images(self, survey_id: str) -> dict[str, Item]:
        """sentera_id -> the image exactly as GraphQL answers a query of every Image field."""
        scope = self._survey(survey_id).images
        return {i: self._export(item, url=True) for i, item in scope.current.items()}

    def surveys(self, field_id: str) -> dict[str, Item]:
        scope = self._field(field_id).surveys
        return {i: self._export(item, url=False) for i, item in scope.current.items()}

    def image_hashes(self, survey_id: str) -> dict[str, str]:
        scope = self._survey(survey_id).images
        return {i: item["content_hash"] for i, item in scope.current.items()}

    def survey_hashes(self, field_id: str) -> dict[str, str]:
        scope = self._field(field_id).surveys
        return {i: item["content_hash"] for i, item in scope.current.items()}

    def _export(self, item: Item, *, url: bool) -> Item:
        # Copies all the way down: callers may mutate what they get.
        out = dict(item)
        out["created_by"] = dict(item["created_by"])
        out["updated_by"] = dict(item["updated_by"])
        if url:
            out["url"] = self.image_url(item)
        return out


# --------------------------------------------------------------------------------------------
# The sync computation (pure apart from `owed` and `rng`)
# --------------------------------------------------------------------------------------------


class _Unit(NamedTuple):
    """Entries that must travel in one answer; `owes` are reported after `ups` (mode "after")."""

    ups: tuple[Item, ...]
    dels: tuple[Item, ...]
    owes: tuple[Item, ...] = ()


@dataclass
class _Diff:
    """Everything that differs, grouped so a page can be filled in any order.

    Plain upserts (no old hash attached) stay bare items: with 100,000 of them, wrapping each
    in a unit would cost more than the rest of the request.
    """

    plain: list[Item] = field(default_factory=list)
    owing: list[_Unit] = field(default_factory=list)  # mode "after": ups with old hashes
    pairs: list[_Unit] = field(default_factory=list)  # mode "same_answer"
    dels: list[_Unit] = field(default_factory=list)
    failed: list[Item] = field(default_factory=list)
    pending: int = 0  # differing entries that cannot be in this answer at all

    def total(self) -> int:
        units = chain(self.owing, self.pairs, self.dels)
        weights = sum(len(u.ups) + len(u.dels) + len(u.owes) for u in units)
        return self.pending + len(self.plain) + weights


@dataclass
class _Page:
    limit: int
    shared: bool
    units: list[_Unit] = field(default_factory=list)
    n_up: int = 0
    n_del: int = 0

    def _fits(self, up: int, dl: int) -> bool:
        if self.shared:
            return self.n_up + self.n_del + up + dl <= self.limit
        return self.n_up + up <= self.limit and self.n_del + dl <= self.limit

    def _full(self) -> bool:
        if self.shared:
            return self.n_up + self.n_del >= self.limit
        return self.n_up >= self.limit and self.n_del >= self.limit

    def add_units(self, units: Iterable[_Unit]) -> None:
        """Take units in order while they fit (later smaller ones may still fit)."""
        for unit in units:
            if self._full():
                return
            for part in self._split_if_oversized(unit):
                if self._fits(len(part.ups), len(part.dels)):
                    self.units.append(part)
                    self.n_up += len(part.ups)
                    self.n_del += len(part.dels)

    def add_plain(self, items: list[Item]) -> None:
        room = self.limit - self.n_up - (self.n_del if self.shared else 0)
        if room > 0 and items:
            taken = tuple(items[:room])
            self.units.append(_Unit(taken, ()))
            self.n_up += len(taken)

    def _split_if_oversized(self, unit: _Unit) -> Iterable[_Unit]:
        # A pair under a page limit of 1 would otherwise never be sent and the client would
        # loop forever; the "same answer" promise yields to the limit.
        up, dl = len(unit.ups), len(unit.dels)
        if (up + dl if self.shared else max(up, dl)) <= self.limit:
            return (unit,)
        dels = [_Unit((), (d,)) for d in unit.dels]
        return dels + [_Unit((u,), (), unit.owes) for u in unit.ups]


def _compute_sync(
    scope: _Scope,
    hashes: Sequence[str],
    *,
    item_type: Literal["Image", "Survey"],
    behaviour: Behaviour,
    failing: Set[str],
    owed: dict[str, Item],
    rng: Random,
) -> Item:
    """One sync answer for a client holding `hashes`; updates `owed` (mode "after").

    Differing entries (H = the client's hashes):
    - each current item whose hash is not in H: an upsert, or a `failed` entry if failing;
    - each stale hash in H (issued here, no longer current): a deletion, always for a deleted
      item; for an updated item per `old_hash_in_deleted`;
    - owed stale reports (mode "after"), unknown hashes (per `unknown_hashes`).
    Arithmetic: remaining_count = T - len(upserted) - len(deleted) + (len(failed) if
    failed_in_remaining else 0), where T counts every upsert and deletion still to be sent:
    those in this answer, those left out by the page limit, updated items withheld until the
    client drops the old hash ("before"), old hashes still to be reported ("after", including
    the ones first owed by this very answer), and a failing item's old hashes in "same_answer"
    / "after" (they wait for its upsert). So with failed_in_remaining, remaining_count never
    drops below the number of `failed` entries. `failed` is outside the page limit: every
    failure is listed in every answer.
    """
    held = dict.fromkeys(hashes)  # a set that keeps the client's order
    mode = behaviour.old_hash_in_deleted
    stale, unknown = _classify(scope, held)
    held_current = len(held) - len(unknown) - sum(map(len, stale.values()))
    diff = _Diff()
    _add_needed(diff, scope, held, held_current, stale, failing, mode, item_type)
    _add_leftover_stale(diff, stale, scope, mode)
    _add_owed(diff, owed, held, scope)
    _add_unknown(diff, unknown, behaviour.unknown_hashes, item_type)
    limit = behaviour.image_page_limit if item_type == "Image" else behaviour.survey_page_limit
    page = _Page(limit, behaviour.shared_limit)
    _fill(page, diff, behaviour.order, rng)
    upserted = [item for unit in page.units for item in unit.ups]
    deleted = [item for unit in page.units for item in unit.dels]
    if behaviour.order == "shuffled":
        rng.shuffle(upserted)
        rng.shuffle(deleted)
    _settle_owed(owed, page.units, deleted)
    remaining = diff.total() - len(upserted) - len(deleted)
    if behaviour.failed_in_remaining:
        remaining += len(diff.failed)
    failed = diff.failed or ([] if behaviour.empty_failed == "empty_list" else None)
    return {
        "upserted": upserted,
        "deleted": deleted,
        "failed": failed,
        "remaining_count": remaining,
    }


def _classify(scope: _Scope, held: Mapping[str, None]) -> tuple[dict[str, list[Item]], list[str]]:
    """Split the client's non-current hashes into stale versions (by sentera_id) and unknown."""
    stale: dict[str, list[Item]] = {}
    unknown: list[str] = []
    odd = held.keys() - scope.current_hashes
    for h in [h for h in held if h in odd] if odd else ():  # keeps the client's order
        version = scope.issued.get(h)
        if version is None:
            unknown.append(h)
        else:
            stale.setdefault(version["sentera_id"], []).append(version)
    return stale, unknown


def _add_needed(
    diff: _Diff,
    scope: _Scope,
    held: Mapping[str, None],
    held_current: int,
    stale: dict[str, list[Item]],
    failing: Set[str],
    mode: OldHashMode,
    item_type: str,
) -> None:
    """Current items the client lacks, each with the old hashes it holds for them."""
    if held_current == len(scope.current):
        needed = []  # the steady state of a big survey: nothing new, skip the scan
    else:
        needed = [item for item in scope.current.values() if item["content_hash"] not in held]
    if not stale and not failing:
        diff.plain = needed  # the common case, kept to one fast pass
        return
    for item in needed:
        sentera_id = item["sentera_id"]
        old = tuple(stale.pop(sentera_id, ()))
        if sentera_id in failing:
            diff.failed.append(_item_failure(sentera_id, item_type))
            if old and mode == "before":
                diff.dels.append(_Unit((), old))
            elif mode in ("same_answer", "after"):
                diff.pending += len(old)
        elif not old or mode == "never":
            diff.plain.append(item)
        elif mode == "same_answer":
            diff.pairs.append(_Unit((item,), old))
        elif mode == "before":
            diff.dels.append(_Unit((), old))
            diff.pending += 1
        else:
            diff.owing.append(_Unit((item,), (), old))


def _add_leftover_stale(
    diff: _Diff, stale: dict[str, list[Item]], scope: _Scope, mode: OldHashMode
) -> None:
    """Stale hashes of deleted items, and of updated items whose new version the client has."""
    for sentera_id, versions in stale.items():
        if mode == "never" and sentera_id in scope.current:
            continue
        diff.dels.append(_Unit((), tuple(versions)))


def _add_owed(
    diff: _Diff, owed: Mapping[str, Item], held: Mapping[str, None], scope: _Scope
) -> None:
    for h, version in owed.items():
        if h in held:
            continue  # still sent by the client, so already handled as a held stale hash
        item = scope.current.get(version["sentera_id"])
        if item is not None and item["content_hash"] not in held:
            diff.pending += 1  # the new version goes (again) first; report strictly after it
        else:
            diff.dels.append(_Unit((), (version,)))


def _add_unknown(diff: _Diff, unknown: list[str], mode: UnknownHashMode, item_type: str) -> None:
    if mode == "deleted":
        diff.dels.extend(_Unit((), (_tombstone(h, item_type),)) for h in unknown)
    elif mode == "failed":
        diff.failed.extend(_unknown_failure(h) for h in unknown)


def _fill(page: _Page, diff: _Diff, order: OrderMode, rng: Random) -> None:
    if order == "deleted_first":
        page.add_units(chain(diff.dels, diff.pairs, diff.owing))
        page.add_plain(diff.plain)
    elif order == "upserted_first":
        page.add_plain(diff.plain)
        page.add_units(chain(diff.owing, diff.pairs, diff.dels))
    else:
        units = [*diff.dels, *diff.pairs, *diff.owing, *(_Unit((i,), ()) for i in diff.plain)]
        rng.shuffle(units)
        page.add_units(units)


def _settle_owed(owed: dict[str, Item], chosen: list[_Unit], deleted: list[Item]) -> None:
    for version in deleted:
        owed.pop(version["content_hash"], None)
    for unit in chosen:
        for version in unit.owes:
            owed[version["content_hash"]] = version


def _item_failure(sentera_id: str, item_type: str) -> Item:
    return {
        "key": sentera_id,
        "message": f"{item_type.lower()} metadata could not be serialized",
        "code": "INTERNAL",
        "details": {"sentera_id": sentera_id},
        "reason": "serialization_error",
    }


def _unknown_failure(content_hash: str) -> Item:
    return {
        "key": content_hash,
        "message": "content hash was not issued by this server",
        "code": "UNKNOWN_HASH",
        "details": None,
        "reason": None,
    }


def _tombstone(content_hash: str, item_type: str) -> Item:
    # The server cannot know whose hash it was, so sentera_id is empty.
    item = dict.fromkeys(IMAGE_FIELDS if item_type == "Image" else SURVEY_FIELDS)
    item.update(sentera_id="", content_hash=content_hash, created_by={"sentera_id": ""})
    return item


# --------------------------------------------------------------------------------------------
# GraphQL
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    upstream: FakeUpstream
    token: str
    record: RequestRecord
    # Variables taken by gql.take_hash_lists, by name; graphql-core saw `[]` for them.
    hash_lists: dict[str, list[str]] = field(default_factory=dict)


def _resolve_sync(
    _root: object, info: GraphQLResolveInfo[Any], content_hashes: list[str], **parent: str
) -> Item:
    context = info.context
    assert isinstance(context, _Context)
    (parent_id,) = parent.values()
    for argument in info.field_nodes[0].arguments or ():
        value = argument.value
        if argument.name.value == "content_hashes" and isinstance(value, VariableNode):
            content_hashes = context.hash_lists.get(value.name.value, content_hashes)
    return context.upstream._answer_sync(info.field_name, parent_id, content_hashes, context)


def _resolve_item_type(value: Item, _info: GraphQLResolveInfo[Any], _type: object) -> str:
    # Stored items carry no __typename; every Image dict has "filename", no Survey dict does.
    return "Image" if "filename" in value else "Survey"


def _resolve_url(image: Item, info: GraphQLResolveInfo[Any]) -> str:
    context = info.context
    assert isinstance(context, _Context)
    return context.upstream.data.image_url(image)


@functools.cache
def _schema() -> GraphQLSchema:
    schema = gql.build_upstream_schema()  # its own copy: the resolvers below are the fake's
    assert schema.query_type is not None
    for name in ("sync_images", "sync_surveys"):
        schema.query_type.fields[name].resolve = _resolve_sync
    sync_item, image = schema.get_type("SyncItem"), schema.get_type("Image")
    assert isinstance(sync_item, GraphQLInterfaceType)
    assert isinstance(image, GraphQLObjectType)
    sync_item.resolve_type = _resolve_item_type
    image.fields["url"].resolve = _resolve_url
    return schema


@dataclass
class _GraphQLRequest:
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None


def _describe(request: _GraphQLRequest, record: RequestRecord) -> None:
    """Best effort: name the root field, parent id and hash count, even if a fault strikes."""
    document = gql.prepare(request.query)
    if not isinstance(document, DocumentNode):
        return
    operation = gql.operation_of(document, request.operation_name)
    if operation is None:
        return
    root = operation.selection_set.selections[0]
    if not isinstance(root, FieldNode):
        return
    record.field = root.name.value
    variables = request.variables or {}
    for argument in root.arguments or ():
        value: Any = argument.value
        if isinstance(value, VariableNode):
            value = variables.get(value.name.value)
        elif isinstance(value, StringValueNode):
            value = value.value
        elif isinstance(value, ListValueNode):
            value = value.values
        if argument.name.value == "content_hashes" and isinstance(value, list | tuple):
            record.n_hashes = len(value)
        elif argument.name.value.endswith("_sentera_id") and isinstance(value, str):
            record.parent_id = value


def _error_code(error: Item) -> Item:
    # graphql-core leaves codes to the server; real ones (Apollo) always send one.
    if "code" not in error.get("extensions", {}):
        code = "BAD_USER_INPUT" if "path" not in error else "INTERNAL_SERVER_ERROR"
        error["extensions"] = {**error.get("extensions", {}), "code": code}
    return error


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

_FAULT_PARAMS: dict[str, tuple[str, ...]] = {
    "http_500": (),
    "http_502": (),
    "http_503": ("retry_after",),
    "http_429": ("retry_after",),
    "http_401": (),
    "slow": ("delay",),
    "hang": ("delay",),
    "cutoff": ("fraction",),
    "reset": (),
    "graphql_error": (),
    "html": ("status",),
    "bad_shape": ("variant",),
    "not_json": (),
}
FAULT_KINDS: frozenset[str] = frozenset(_FAULT_PARAMS)
_BAD_SHAPES = ("missing_content_hash", "remaining_count_string", "upserted_null", "data_list")


@dataclass(frozen=True)
class Fault:
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {sorted(FAULT_KINDS)}")
        unknown = set(self.params) - set(_FAULT_PARAMS[self.kind])
        if unknown:
            raise ValueError(f"fault {self.kind!r} takes no {sorted(unknown)}")
        variant = self.params.get("variant", _BAD_SHAPES[0])
        if self.kind == "bad_shape" and variant not in _BAD_SHAPES:
            raise ValueError(f"bad_shape variant must be one of {_BAD_SHAPES}")


class Faults:
    """Failures applied to /graphql requests: offline > queued one-shots > random."""

    def __init__(self) -> None:
        self.offline = False
        self._queue: deque[Fault] = deque()
        self._random: tuple[float, tuple[str, ...], Random] | None = None

    def push(self, kind: str, times: int = 1, **params: Any) -> None:
        fault = Fault(kind, dict(params))
        self._queue.extend([fault] * times)

    def random(self, rate: float, kinds: list[str], seed: int) -> None:
        """Each request fails with probability `rate`, kind drawn from `kinds`; replayable."""
        for kind in kinds:
            Fault(kind)
        if not kinds or not 0.0 <= rate <= 1.0:
            raise ValueError("random faults need 0 <= rate <= 1 and at least one kind")
        self._random = (rate, tuple(kinds), Random(seed))

    def clear(self) -> None:
        self.offline = False
        self._queue.clear()
        self._random = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def next(self) -> Fault | None:
        """The fault for the request being handled now, if any (consumes it)."""
        if self._queue:
            return self._queue.popleft()
        if self._random is None:
            return None
        rate, kinds, rng = self._random
        # Always draw both numbers so the sequence depends only on the request count.
        roll, kind = rng.random(), rng.choice(kinds)
        return Fault(kind) if roll < rate else None


_DROPPED = 499  # marks the response of a killed connection; it never reaches the client


def _drop(request: web.BaseRequest, *, reset: bool) -> web.Response:
    """Kill the connection without an answer; aiohttp then ignores the returned response."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if reset and sock is not None:
            # Linger 0 makes close() send RST instead of FIN: a real "connection reset".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.Response(status=_DROPPED)


def _seconds(value: Any) -> str:
    if isinstance(value, str):
        return value  # e.g. an HTTP-date, passed through verbatim
    return str(int(value)) if float(value).is_integer() else str(value)


def _json_response(
    status: int, body: object, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def _error_body(message: str, code: str) -> Item:
    return {"errors": [{"message": message, "extensions": {"code": code}}]}


def _html(status: int, title: str, text: str) -> web.Response:
    page = (
        f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n"
        f"<body><h1>{title}</h1><p>{text}</p><hr><center>nginx</center></body></html>\n"
    )
    return web.Response(status=status, text=page, content_type="text/html")


def _immediate_fault(fault: Fault) -> web.Response | None:
    """Responses that replace the answer entirely; None for faults that need the answer."""
    kind, params = fault.kind, fault.params
    if kind == "http_500":
        return _json_response(500, _error_body("Internal Server Error", "INTERNAL_SERVER_ERROR"))
    if kind == "http_502":
        return _html(502, "502 Bad Gateway", "The upstream server did not answer.")
    if kind == "http_503":
        response = _html(503, "503 Service Temporarily Unavailable", "Try again later.")
        if "retry_after" in params:
            response.headers["Retry-After"] = _seconds(params["retry_after"])
        return response
    if kind == "http_429":
        headers = {"Retry-After": _seconds(params.get("retry_after", 1))}
        return _json_response(429, _error_body("Too Many Requests", "RATE_LIMITED"), headers)
    if kind == "http_401":
        return _json_response(401, _error_body("Not authenticated", "UNAUTHENTICATED"))
    if kind == "graphql_error":
        body = _error_body("Internal server error", "INTERNAL_SERVER_ERROR")
        return _json_response(200, {"data": None, **body})
    if kind == "html":
        return _html(int(params.get("status", 200)), "Sign in to Wi-Fi", "Accept the terms.")
    if kind == "not_json":
        garbage = b'\xff\xfe\x00<<not json>>\x00{"data": {"sync_images": '
        return web.Response(status=200, body=garbage, content_type="application/json")
    return None


def _misshape(body: Item, variant: str) -> object:
    """Valid JSON of the wrong shape, built from the real answer."""
    if variant == "data_list":
        return {"data": []}
    data = body.get("data") or {}
    result = next(iter(data.values()), None) if isinstance(data, dict) else None
    if not isinstance(result, dict):
        return {"data": {"sync_images": {"remaining_count": "many"}}}
    if variant == "missing_content_hash":
        upserted = [dict(item) for item in result.get("upserted", [])] or [{"sentera_id": "x"}]
        upserted[0].pop("content_hash", None)
        result["upserted"] = upserted
    elif variant == "remaining_count_string":
        result["remaining_count"] = str(result.get("remaining_count"))
    else:
        result["upserted"] = None
    return body


async def _cut_off(
    request: web.BaseRequest, status: int, payload: bytes, fraction: float
) -> web.StreamResponse:
    """Announce the full Content-Length, send only part of the body, then close."""
    response = web.StreamResponse(status=status)
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    cut = min(len(payload) - 1, max(1, int(len(payload) * fraction)))
    await response.write(payload[:cut])
    if request.transport is not None:
        request.transport.close()  # close() flushes what was written, unlike abort()
    return response


# --------------------------------------------------------------------------------------------
# OAuth2
# --------------------------------------------------------------------------------------------


@dataclass
class TokenRequest:
    """One POST /oauth/token as the fake saw it (status None: connection dropped)."""

    grant_type: str | None
    status: int | None
    error: str | None = None


class FakeOAuth:
    """The token endpoint of the fake: the refresh_token grant, as PROTOCOL.md describes it.

    Every successful refresh ROTATES the refresh token (the old one is void from then on) and
    issues an access token that the fake's /graphql accepts for `expires_in` seconds (tests use
    one or two). A void or unknown refresh token gets HTTP 400 `invalid_grant`, wrong client
    credentials HTTP 401 `invalid_client`. `requests` records every token request; `offline`
    drops them (the token endpoint unreachable while /graphql still answers).
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        *,
        expires_in: float = 28800,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token  # the one refresh token valid now
        self.expires_in = expires_in
        self.offline = False
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []  # every access token handed out, oldest first
        self._expiry: dict[str, float] = {}  # access token -> time.monotonic() it expires
        self._serial = 0

    @property
    def refreshes(self) -> int:
        """Successful refreshes so far."""
        return sum(1 for r in self.requests if r.status == 200)

    def accepts(self, access_token: str) -> bool:
        expiry = self._expiry.get(access_token)
        return expiry is not None and time.monotonic() < expiry

    def revoke_access_tokens(self) -> None:
        """Void every access token issued so far (as a server-side logout would)."""
        self._expiry.clear()

    def grant(self, form: Mapping[str, str], basic: tuple[str, str] | None) -> tuple[int, Item]:
        client_id, secret = basic or (form.get("client_id", ""), form.get("client_secret", ""))
        grant_type = form.get("grant_type")
        if grant_type != "refresh_token":
            return self._refuse(grant_type, 400, "unsupported_grant_type")
        if not (_same(client_id, self.client_id) and _same(secret, self.client_secret)):
            return self._refuse(grant_type, 401, "invalid_client")
        if not _same(form.get("refresh_token", ""), self.refresh_token):
            return self._refuse(grant_type, 400, "invalid_grant")
        self.requests.append(TokenRequest(grant_type, 200))
        return 200, self._issue()

    def _refuse(self, grant_type: str | None, status: int, error: str) -> tuple[int, Item]:
        self.requests.append(TokenRequest(grant_type, status, error))
        return status, {"error": error, "error_description": error.replace("_", " ")}

    def _issue(self) -> Item:
        self._serial += 1
        access = f"fake-access-{self._serial}-{binascii.hexlify(os.urandom(12)).decode()}"
        self.refresh_token = (
            f"fake-refresh-{self._serial}-{binascii.hexlify(os.urandom(12)).decode()}"
        )
        self._expiry[access] = time.monotonic() + self.expires_in
        self.issued.append(access)
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "scope": "public",
            "created_at": int(time.time()),
        }


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _basic_auth(request: web.BaseRequest) -> tuple[str, str] | None:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(encoded.strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return client_id, secret


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One /graphql request as the fake saw it (status None: connection dropped unanswered)."""

    method: str
    content_length: int | None = None  # the request's Content-Length (None: chunked, or none)
    field: str | None = None
    parent_id: str | None = None
    n_hashes: int = 0
    status: int | None = None
    fault: str | None = None
    upserted: int = 0
    deleted: int = 0
    failed: int = 0
    remaining_count: int | None = None


_ITEM_TYPE: dict[str, Literal["Image", "Survey"]] = {
    "sync_images": "Image",
    "sync_surveys": "Survey",
}
_PARENT_NOUN = {"sync_images": "Survey", "sync_surveys": "Field"}


class FakeUpstream:
    """The fake FieldAgent API on http://127.0.0.1:<ephemeral port>/graphql.

    All attributes may be changed while it runs: `token` (rotate it to test re-auth),
    `behaviour`, `faults`, `file_faults`, `data`, and `on_answer`, called right after each
    sync answer is computed (and before it is sent), e.g. to edit data between the pages of
    one sync. `requests` records every /graphql request.

    GET/HEAD `/files/{sentera_id}?expires=&sig=` serves each image's current file at its
    signed `url` (see mirrord/fake_files.py): no bearer token, the signature is the auth, as
    with a CDN. 403 for a wrong signature or an expired or revoked URL (checked first), 404
    for an image that no longer exists, else 200 with Content-Type, Content-Length,
    `ETag: "<content_hash>"` and Accept-Ranges; one Range (`bytes=a-b`, `a-`, `-n`) gives 206
    with Content-Range, past the end 416; If-Range with another ETag gives the whole file.
    A URL signed before an update serves the new bytes (the signature covers the id and the
    expiry only, like a real CDN). `file_faults` fails downloads; `file_requests` records
    every file request, `file_bytes_sent` totals the body bytes sent. `faults.offline` (the
    link is down) drops file requests too; no other /graphql fault touches them.

    Under `/_fake/` (JSON, no auth, loopback only): GET state | requests | behaviour |
    file_requests | file_faults, POST mutate | faults | behaviour | file_faults | expire_urls.
    POST mutate takes {"op": <a FakeData method in _MUTATIONS>, ...its arguments}.
    POST faults takes {"clear", "offline", "push": [{"kind", "times", ...params}],
    "random": {"rate", "kinds", "seed"}}; POST file_faults takes {"clear", "ranges", "rate",
    "chunked", "push": [{"kind", "times", ...params}]} and answers {"queued", "ranges", "rate",
    "chunked"};
    POST expire_urls (FakeData.expire_urls) answers {"url_expires", "revoked_through"}.

    With `oauth=FakeOAuth(...)` it also serves POST /oauth/token, and /graphql accepts the
    access tokens issued there (until they expire) as well as `token`.
    """

    def __init__(
        self,
        data: FakeData | None = None,
        *,
        token: str = "test-token",
        behaviour: Behaviour | None = None,
        seed: int = 0,
        port: int = 0,
        oauth: FakeOAuth | None = None,
    ) -> None:
        self.data = data if data is not None else FakeData(seed)
        self.token = token
        self.oauth = oauth
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self.file_faults = FileFaults()
        self.file_requests: list[FileRequest] = []
        self.on_answer: Callable[[], None] | None = None
        self._rng = Random(seed)
        self._port = port
        # (token, query field, parent id) -> stale versions owed to that client (mode "after").
        self._owed: dict[tuple[str, str, str], dict[str, Item]] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._base = ""

    # ---- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._runner is not None:
            return
        _schema()  # build once up front, not inside the first timed request
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._stopping.clear()
        self._base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.data.base_url = self._base

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()  # wakes "slow"/"hang" handlers so shutdown does not wait for them
        await runner.cleanup()

    @property
    def base(self) -> str:
        if not self._base:
            raise RuntimeError("FakeUpstream is not started")
        return self._base

    @property
    def url(self) -> str:
        return f"{self.base}/graphql"

    def _app(self) -> web.Application:
        # 100,000 hashes are ~2 MB of JSON; aiohttp's default cap is 1 MB.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("POST", "/graphql", self._handle_graphql)
        app.router.add_route("GET", "/graphql", self._handle_graphql)
        app.router.add_post("/oauth/token", self._handle_token)
        app.router.add_get("/files/{sentera_id}", self._handle_file)  # and HEAD
        app.router.add_get("/_fake/state", self._handle_state)
        app.router.add_get("/_fake/requests", self._handle_requests)
        app.router.add_get("/_fake/behaviour", self._handle_behaviour)
        app.router.add_post("/_fake/behaviour", self._handle_behaviour)
        app.router.add_post("/_fake/mutate", self._handle_mutate)
        app.router.add_post("/_fake/faults", self._handle_faults)
        app.router.add_get("/_fake/file_faults", self._handle_file_faults)
        app.router.add_post("/_fake/file_faults", self._handle_file_faults)
        app.router.add_get("/_fake/file_requests", self._handle_file_requests)
        app.router.add_post("/_fake/expire_urls", self._handle_expire_urls)
        return app

    @property
    def file_bytes_sent(self) -> int:
        """Body bytes sent by every file request so far (a cut one counts what went out)."""
        return sum(r.bytes_sent for r in self.file_requests)

    # ---- /graphql ----------------------------------------------------------------------------

    async def _handle_graphql(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(method=request.method, content_length=request.content_length)
        self.requests.append(record)
        if self.faults.offline:
            record.fault = "offline"
            return _drop(request, reset=False)
        fault = self.faults.next()
        record.fault = fault.kind if fault else None
        parsed = await _read_graphql_request(request)
        if isinstance(parsed, _GraphQLRequest):
            _describe(parsed, record)
        response = await self._respond(request, parsed, fault, record)
        record.status = None if response.status == _DROPPED else response.status
        return response

    async def _respond(
        self,
        request: web.Request,
        parsed: _GraphQLRequest | str,
        fault: Fault | None,
        record: RequestRecord,
    ) -> web.StreamResponse:
        if fault is not None:
            if fault.kind == "reset":
                return _drop(request, reset=True)
            immediate = _immediate_fault(fault)
            if immediate is not None:
                return immediate
            if fault.kind in ("slow", "hang"):
                default = 1.0 if fault.kind == "slow" else 60.0
                if await self._pause(float(fault.params.get("delay", default))):
                    return _drop(request, reset=True)  # shutting down: the link just dies
        token = self._presented_token(request)
        if token is None:
            return _json_response(401, _error_body("Not authenticated", "UNAUTHENTICATED"))
        if isinstance(parsed, str):
            return _json_response(400, _error_body(parsed, "BAD_REQUEST"))
        body = self._execute(parsed, _Context(self, token, record))
        if fault is not None and fault.kind == "bad_shape":
            return _json_response(200, _misshape(body, fault.params.get("variant", _BAD_SHAPES[0])))
        if fault is not None and fault.kind == "cutoff":
            payload = json.dumps(body).encode()
            return await _cut_off(request, 200, payload, float(fault.params.get("fraction", 0.5)))
        return _json_response(200, body)

    async def _pause(self, delay: float) -> bool:
        """Sleep `delay` seconds; True if the server started stopping meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
        except TimeoutError:
            return False
        return True

    def _presented_token(self, request: web.BaseRequest) -> str | None:
        header = request.headers.get("Authorization", "").strip()
        scheme, _, rest = header.partition(" ")
        presented = rest.strip() if scheme.lower() == "bearer" else header
        if presented and hmac.compare_digest(presented.encode(), self.token.encode()):
            return presented
        if presented and self.oauth is not None and self.oauth.accepts(presented):
            # The client, not its token: what a client is owed outlives token rotation.
            return f"oauth-client:{self.oauth.client_id}"
        return None

    # ---- /files -------------------------------------------------------------------------------

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        sentera_id = request.match_info["sentera_id"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record = FileRequest(
            request.method,
            sentera_id,
            request.headers.get("Range"),
            headers=dict(request.headers),
            client_port=peer[1] if peer else None,
        )
        self.file_requests.append(record)
        if self.faults.offline:
            return _drop(request, reset=False)
        query = request.query
        refusal = self.data.url_refusal(sentera_id, query.get("expires", ""), query.get("sig", ""))
        if refusal is not None:
            record.status = 403
            return s3_error(403, *refusal)
        file = self.data.served_file(sentera_id)
        if file is None:
            record.status = 404
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return await serve_file(request, file, self.file_faults, record, self._stopping)

    # ---- /oauth/token ------------------------------------------------------------------------

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        oauth = self.oauth
        if oauth is None:
            return _json_response(404, {"error": "not_found"})
        if self.faults.offline or oauth.offline:
            oauth.requests.append(TokenRequest(None, None, "offline"))
            return _drop(request, reset=False)
        form = {key: str(value) for key, value in (await request.post()).items()}
        status, body = oauth.grant(form, _basic_auth(request))
        return _json_response(status, body, {"Cache-Control": "no-store"})

    def _execute(self, request: _GraphQLRequest, context: _Context) -> Item:
        prepared = gql.prepare(request.query)
        if not isinstance(prepared, DocumentNode):
            return {"errors": list(prepared)}  # a copy: the cached errors stay untouched
        operation = gql.operation_of(prepared, request.operation_name)
        variables, context.hash_lists = gql.take_hash_lists(operation, request.variables)
        result = execute_sync(
            _schema(),
            prepared,
            context_value=context,
            variable_values=variables,
            operation_name=request.operation_name,
        )
        body: Item = {"data": result.data}
        if result.errors:
            body["errors"] = [_error_code(dict(e.formatted)) for e in result.errors]
        return body

    def _answer_sync(
        self, query_field: str, parent_id: str, hashes: list[str], context: _Context
    ) -> Item:
        scope = self.data._scope_for(query_field, parent_id)
        if scope is None:
            message = f"{_PARENT_NOUN[query_field]} not found"
            raise GraphQLError(message, extensions={"code": "NOT_FOUND"})
        owed = self._owed.setdefault((context.token, query_field, parent_id), {})
        answer = _compute_sync(
            scope,
            hashes,
            item_type=_ITEM_TYPE[query_field],
            behaviour=self.behaviour,
            failing=self.data.failing,
            owed=owed,
            rng=self._rng,
        )
        record = context.record
        record.upserted += len(answer["upserted"])
        record.deleted += len(answer["deleted"])
        record.failed += len(answer["failed"] or ())
        record.remaining_count = answer["remaining_count"]
        if self.on_answer is not None:
            self.on_answer()
        return answer

    # ---- control API -------------------------------------------------------------------------

    async def _handle_state(self, request: web.Request) -> web.Response:
        return _loopback_only(request) or _json_response(200, self._state())

    def _state(self) -> Item:
        data = self.data
        return {
            "url": self.url,
            "token": self.token,
            "fields": {f: data.survey_hashes(f) for f in data.field_ids()},
            "surveys": {s: data.image_hashes(s) for s in data.survey_ids()},
            "failing": sorted(data.failing),
        }

    async def _handle_requests(self, request: web.Request) -> web.Response:
        return _loopback_only(request) or _json_response(200, [asdict(r) for r in self.requests])

    async def _handle_behaviour(self, request: web.Request) -> web.Response:
        denied = _loopback_only(request)
        if denied:
            return denied
        if request.method == "POST":
            changes = await _json_object(request)
            try:
                self.behaviour = replace(self.behaviour, **changes)
            except (TypeError, ValueError) as error:
                return _json_response(400, _error_body(str(error), "BAD_REQUEST"))
        return _json_response(200, asdict(self.behaviour))

    async def _handle_mutate(self, request: web.Request) -> web.Response:
        denied = _loopback_only(request)
        if denied:
            return denied
        args = await _json_object(request)
        operation = _MUTATIONS.get(str(args.pop("op", "")))
        if operation is None:
            message = f"op must be one of {sorted(_MUTATIONS)}"
            return _json_response(400, _error_body(message, "BAD_REQUEST"))
        try:
            result = operation(self.data, **args)
        except KeyError as error:
            return _json_response(404, _error_body(str(error), "NOT_FOUND"))
        except (TypeError, ValueError) as error:
            return _json_response(400, _error_body(str(error), "BAD_REQUEST"))
        return _json_response(200, {"result": result})

    async def _handle_faults(self, request: web.Request) -> web.Response:
        denied = _loopback_only(request)
        if denied:
            return denied
        body = await _json_object(request)
        try:
            self._apply_fault_changes(body)
        except (TypeError, ValueError) as error:
            return _json_response(400, _error_body(str(error), "BAD_REQUEST"))
        return _json_response(200, {"offline": self.faults.offline, "queued": self.faults.queued})

    async def _handle_file_faults(self, request: web.Request) -> web.Response:
        denied = _loopback_only(request)
        if denied:
            return denied
        if request.method == "POST":
            try:
                self.file_faults.apply(await _json_object(request))
            except (TypeError, ValueError) as error:
                return _json_response(400, _error_body(str(error), "BAD_REQUEST"))
        return _json_response(200, self.file_faults.state())

    async def _handle_file_requests(self, request: web.Request) -> web.Response:
        records = [asdict(r) for r in self.file_requests]
        return _loopback_only(request) or _json_response(200, records)

    async def _handle_expire_urls(self, request: web.Request) -> web.Response:
        denied = _loopback_only(request)
        if denied:
            return denied
        expires = self.data.expire_urls()
        body = {"url_expires": expires, "revoked_through": self.data.url_revoked_through}
        return _json_response(200, body)

    def _apply_fault_changes(self, body: Item) -> None:
        if body.get("clear"):
            self.faults.clear()
        if "offline" in body:
            self.faults.offline = bool(body["offline"])
        for entry in body.get("push", []):
            params = dict(entry)
            self.faults.push(str(params.pop("kind", "")), int(params.pop("times", 1)), **params)
        if "random" in body:
            spec = body["random"]
            self.faults.random(float(spec["rate"]), list(spec["kinds"]), int(spec.get("seed", 0)))


_MUTATIONS: dict[str, Callable[..., Any]] = {
    "add_field": FakeData.add_field,
    "add_survey": FakeData.add_survey,
    "add_images": FakeData.add_images,
    "update_images": FakeData.update_images,
    "delete_images": FakeData.delete_images,
    "update_survey": FakeData.update_survey,
    "delete_survey": FakeData.delete_survey,
    "set_failing": lambda data, ids: data.set_failing(set(ids)),
    "expire_urls": FakeData.expire_urls,
}


def _loopback_only(request: web.BaseRequest) -> web.Response | None:
    if request.remote in ("127.0.0.1", "::1"):
        return None
    return _json_response(403, _error_body("control API is loopback only", "FORBIDDEN"))


async def _json_object(request: web.BaseRequest) -> Item:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(text="malformed JSON body") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def _read_graphql_request(request: web.BaseRequest) -> _GraphQLRequest | str:
    """The GraphQL-over-HTTP request, or a message saying why it is malformed."""
    raw: Any
    if request.method == "GET":
        raw = dict(request.query)
    else:
        try:
            raw = json.loads(await request.read())
        except ValueError:
            return "Malformed JSON body"
    if not isinstance(raw, dict):
        return "Request body must be a JSON object"
    query, variables, operation = raw.get("query"), raw.get("variables"), raw.get("operationName")
    if not isinstance(query, str) or not query.strip():
        return "Must provide query string."
    if isinstance(variables, str):  # GET carries variables as JSON text
        try:
            variables = json.loads(variables) if variables else None
        except ValueError:
            return "Variables are invalid JSON."
    if variables is not None and not isinstance(variables, dict):
        return "Variables must be an object."
    if operation is not None and not isinstance(operation, str):
        return "operationName must be a string."
    return _GraphQLRequest(query, variables, operation or None)


# --------------------------------------------------------------------------------------------
# Standalone runner
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mirrord.fake_upstream", description="Run the fake FieldAgent upstream."
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fields", type=int, default=1)
    parser.add_argument("--surveys", type=int, default=1, help="surveys per field")
    parser.add_argument("--images", type=int, default=100, help="images per survey")
    parser.add_argument("--token", default="test-token")
    parser.add_argument(
        "--file-sizes",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        help="image file sizes in bytes, drawn in [LO, HI] (default 1 to 20 MB)",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    data = FakeData(args.seed, tuple(args.file_sizes) if args.file_sizes else None)
    for _ in range(args.fields):
        data.add_field(n_surveys=args.surveys, images_per_survey=args.images)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with FakeUpstream(data, token=args.token, seed=args.seed, port=args.port) as fake:
        line = {
            "url": fake.url,
            "base": fake.base,
            "token": fake.token,
            "field_ids": data.field_ids(),
            "survey_ids": data.survey_ids(),
        }
        print(json.dumps(line), flush=True)
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
