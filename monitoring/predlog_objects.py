"""The prediction log in object storage: one object per segment under a prefix, for fleets.

Each serving process writes its segments (Arrow IPC streams, :mod:`modelloop.logformat`) as
objects under ``<prefix>/<yyyymmddHH>/<MM>/``, named so that names sort by the time they were
written and never collide::

    <prefix>/2026120717/05/20261207T170512.123456Z-<host>-<pid>-<token>-000042.arrows

(UTC; ``<token>`` is random per process start, ``000042`` the process's sequence number). An
object is never seen half-written: an S3 PUT is atomic, and on a local directory
(``file://``, a path) the segment is written under a hidden name and renamed. Segments are
as big as the logger makes them (:class:`~modelloop.serving.predlog.PredictionLogger`'s
``segment_s`` and ``segment_bytes``: a few seconds or megabytes).

The control plane reads the objects in name order. A read lists the hour prefixes, the minute
prefixes of the hours from its position on, and the keys of those minutes: a few small
listings, whatever the log holds, and it looks every ``poll_interval_s`` (1 s).

A slower writer's object can appear after newer ones were read (its PUT took longer, or its
clock is behind), so a reader's position (:class:`ObjectCursor`) is the set of keys it read
within ``grace_s`` of the newest one (or of the reader's own clock, if that is earlier): each
read lists the keys from that window on and takes those not in the set. Writers' clocks must
agree with the reader's within ``grace_s``. The position
is persisted in the store (``log_object_cursors``), so a restarted control plane reads each
object once; what it stored twice after a crash keeps one row per ``(model, request_id)``.
An object that arrives more than ``grace_s`` late is not read.

A name is taken at each attempt: after an outage, the segment is written under the time it
was written, not the time it was made, so it is not late. Objects are deleted by hour
prefix once read and older than ``retention_s``.

Example:

```python
log = ObjectPredictionLog("s3://logs/prod", store=store)
log.append(segment, rows=256)                 # a serving process
for position, payload in log.read(log.cursor()):
    ...                                        # the control plane
log.advance(position)
```
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.stores.engine import StoreEngine as SqlPredictionStore
from modelloop.monitoring.stores.engine import StoreUnavailable
from modelloop.storage import (
    RepositoryLocation,
    describe_error,
    open_filesystem,
    parse_repository,
)

SUFFIX = ".arrows"
"""An Arrow IPC stream (the log's segment format); pyarrow's ``ipc.open_stream`` and DuckDB read it."""
SEGMENT_S = 2.0
"""Seconds of traffic a writer gathers in one object (less when asked to flush)."""
CURSOR = "monitor"
"""The control plane's cursor name (the log's URL is added to it)."""

_HOUR = re.compile(r"^\d{10}$")
_MINUTE = re.compile(r"^\d{2}$")
_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-.+" + re.escape(".arrows") + "$")
_STAMP = "%Y%m%dT%H%M%S"
_CURSORS = (
    "CREATE TABLE IF NOT EXISTS log_object_cursors "
    "(name TEXT NOT NULL, object_key TEXT NOT NULL, PRIMARY KEY (name, object_key))"
)
_READ_CURSOR = sa.text("SELECT object_key FROM log_object_cursors WHERE name = :name")
_ADD_KEY = sa.text(
    "INSERT INTO log_object_cursors (name, object_key) VALUES (:name, :key) "
    "ON CONFLICT (name, object_key) DO NOTHING"
)
_FORGET_KEYS = sa.text("DELETE FROM log_object_cursors WHERE name = :name AND object_key < :floor")


def _hour(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d%H")


def _folder(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d%H/%M")


def _stamp(t: float) -> str:
    moment = datetime.fromtimestamp(t, UTC)
    return f"{moment.strftime(_STAMP)}.{moment.microsecond:06d}Z"


def time_key(t: float) -> str:
    """The smallest key of an object written at or after the Unix time ``t``."""
    return f"{_folder(t)}/{_stamp(t)}"


def key_time(key: str) -> float:
    """The Unix time an object key was taken at.

    Raises:
        ValueError: Not a segment key.
    """
    stamp = posixpath.basename(key)[: len("20261207T170512.123456")]
    return datetime.strptime(stamp, f"{_STAMP}.%f").replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True, slots=True)
class ObjectCursor:
    """A reader's position in an object log: the keys it read within the grace window.

    Attributes:
        seen: Keys (relative to the prefix) read, from the newest one's time minus the grace
            window on; empty before the first read.
        last: The key read last (what a message about a segment names); not persisted.
    """

    seen: frozenset[str] = frozenset()
    last: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        """The newest key read ("" before the first)."""
        return max(self.seen, default="")

    def __str__(self) -> str:
        return self.last or self.key


class ObjectPredictionLog:
    """The prediction log as segment objects under a prefix (``s3://`` or a local directory).

    Args:
        url: ``s3://bucket/prefix``, ``file:///absolute/path`` or a path.
        store: The SQL store that keeps the reader's position (the control plane's); a
            serving process that only writes needs none. Defaults to None.
        filesystem: An fsspec file system for ``s3://`` (tests pass one); defaults to
            :func:`modelloop.storage.open_filesystem`.
        grace_s: How late an object may appear, against the newest one read, and still be
            read. Defaults to 60.
        retention_s: How long read objects are kept (for ``modelloop log export``).
            Defaults to one day.
        segment_s: Seconds of traffic a writer puts in one object. Defaults to 2.
        segment_bytes: Most bytes a writer puts in one object. Defaults to 8 MiB.
        poll_interval_s: How often the control plane lists the prefix for new objects.
            Defaults to 1.

    Raises:
        StorageError: The URL's scheme is not supported.
    """

    def __init__(
        self,
        url: str,
        *,
        store: SqlPredictionStore | None = None,
        filesystem: Any = None,
        grace_s: float = 60.0,
        retention_s: float = 86400.0,
        segment_s: float = SEGMENT_S,
        segment_bytes: int = 8 << 20,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.location: RepositoryLocation = parse_repository(url)
        self.url = self.location.url if self.location.remote else f"file://{self._root_path()}"
        self.store = store
        self.grace_s = grace_s
        self.retention_s = retention_s
        self.segment_s = segment_s
        self.segment_bytes = segment_bytes
        self.poll_interval_s = poll_interval_s
        self._fs = filesystem
        self._writer = f"{_host()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._seq = 0
        self._lock = threading.Lock()
        self._ready = False
        self._persisted: set[str] = set()
        self._cursor_name = f"{CURSOR} {self.url}"

    # -- the objects -------------------------------------------------------------------

    def _root_path(self) -> Path:
        return self.location.local_path("the prediction log").absolute()

    @property
    def fs(self) -> Any:
        """The fsspec file system of an ``s3://`` log, opened on first use."""
        if self._fs is None:
            self._fs = open_filesystem(self.location)
        return self._fs

    def _call(self, what: str, work: Any) -> Any:
        try:
            return work()
        except StoreUnavailable:
            raise
        except Exception as exc:  # s3fs, botocore and aiohttp raise their own types, not only OSError
            detail = describe_error(exc, self.location) if self.location.remote else str(exc)
            raise StoreUnavailable(f"prediction log {self.url}: cannot {what}: {detail}") from exc

    def _put(self, key: str, data: bytes) -> None:
        if self.location.remote:
            self.fs.pipe_file(f"{self.location.root}/{key}", data)
            return
        target = self._root_path() / key
        target.parent.mkdir(parents=True, exist_ok=True)
        hidden = target.with_name(f".{target.name}.tmp")
        with hidden.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(hidden, target)

    def _get(self, key: str) -> bytes:
        if self.location.remote:
            return bytes(self.fs.cat_file(f"{self.location.root}/{key}"))
        return (self._root_path() / key).read_bytes()

    def _names(self, folder: str = "") -> list[str]:
        """Names directly under ``folder`` (the prefix itself by default), hidden ones left out."""
        try:
            if self.location.remote:
                path = f"{self.location.root}/{folder}".rstrip("/")
                names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
            else:
                names = [p.name for p in (self._root_path() / folder).iterdir()]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def _hours(self, since: str = "") -> list[str]:
        return [h for h in self._names() if _HOUR.match(h) and h >= since[:10]]

    def _folders(self, since: str = "") -> Iterator[str]:
        """The minute prefixes (``yyyymmddHH/MM``) from the one ``since`` falls in, in order."""
        for hour in self._call("list", lambda: self._hours(since)):
            minutes = self._call("list", lambda hour=hour: self._names(hour))
            for minute in minutes:
                folder = f"{hour}/{minute}"
                if _MINUTE.match(minute) and folder >= since[:13]:
                    yield folder

    def _keys(self, folder: str) -> list[str]:
        """The segment keys of one minute prefix (names of another shape are not the log's)."""
        return [f"{folder}/{n}" for n in self._call("list", lambda: self._names(folder)) if _NAME.match(n)]

    # -- serving: the sink -------------------------------------------------------------

    def append(self, segment: bytes, *, rows: int) -> None:
        """Writes one segment as a new object (whole or not at all).

        Raises:
            StoreUnavailable: The bucket or directory cannot be written; nothing was.
        """
        with self._lock:
            self._seq += 1
            seq = self._seq
        # Named when written (each attempt anew), so a retry after an outage is not late.
        now = time.time()
        key = f"{time_key(now)}-{self._writer}-{seq:06d}{SUFFIX}"
        self._call("write", lambda: self._put(key, segment))

    # -- the control plane: the reader -------------------------------------------------

    def _store(self) -> SqlPredictionStore:
        if self.store is None:
            raise RuntimeError("reading an object log needs a store for its cursor")
        if not self._ready:
            self.store.transaction(lambda conn: conn.execute(sa.text(_CURSORS)), write=True)
            self._ready = True
        return self.store

    def cursor(self) -> ObjectCursor:
        """The control plane's persisted position (empty before its first read)."""
        store = self._store()

        def work(conn: Connection) -> list[str]:
            return [str(k) for (k,) in conn.execute(_READ_CURSOR, {"name": self._cursor_name})]

        keys = store.transaction(work, write=False)
        self._persisted = set(keys)
        return ObjectCursor(frozenset(keys))

    def _floor(self, position: ObjectCursor) -> str:
        """The oldest key a reader at ``position`` still looks at: ``grace_s`` before the newest
        key read, or before this clock's time if that key is ahead (a writer whose clock runs
        fast must not hide the others' objects)."""
        if not position.seen:
            return ""
        return time_key(min(key_time(position.key), time.time()) - self.grace_s)

    def read(self, after: ObjectCursor, limit: int = 64) -> list[tuple[ObjectCursor, bytes]]:
        """Up to ``limit`` objects not read yet, oldest name first, each with the position after it.

        Raises:
            StoreUnavailable: The bucket or directory cannot be listed or read.
        """
        floor = self._floor(after)
        unread: list[str] = []
        for folder in self._folders(floor):
            unread.extend(k for k in self._keys(folder) if k >= floor and k not in after.seen)
            if len(unread) >= limit:
                break
        found: list[tuple[ObjectCursor, bytes]] = []
        seen = set(after.seen)
        for key in sorted(unread)[:limit]:
            try:
                payload = self._call("read", lambda key=key: self._get(key))
            except StoreUnavailable as exc:
                if isinstance(exc.__cause__, FileNotFoundError):
                    continue  # pruned since it was listed
                raise
            seen.add(key)
            found.append((self._trimmed(seen, key), payload))
        return found

    def _trimmed(self, seen: set[str], last: str) -> ObjectCursor:
        floor = self._floor(ObjectCursor(frozenset(seen)))
        return ObjectCursor(frozenset(k for k in seen if k >= floor), last)

    def advance(self, position: ObjectCursor) -> None:
        """Persists the reader's position: the keys it read within the grace window.

        Raises:
            StoreUnavailable: The store cannot be written.
        """
        store = self._store()
        new = sorted(position.seen - self._persisted)
        floor = min(position.seen, default="")

        def work(conn: Connection) -> None:
            if new:
                conn.execute(_ADD_KEY, [{"name": self._cursor_name, "key": k} for k in new])
            conn.execute(_FORGET_KEYS, {"name": self._cursor_name, "floor": floor})

        store.transaction(work, write=True)
        self._persisted = set(position.seen)

    def last(self) -> ObjectCursor:
        """The newest object written so far, as a position.

        Raises:
            StoreUnavailable: The bucket or directory cannot be listed.
        """
        for hour in reversed(self._call("list", self._hours)):
            for minute in reversed(self._call("list", lambda hour=hour: self._names(hour))):
                keys = self._keys(f"{hour}/{minute}") if _MINUTE.match(minute) else []
                if keys:
                    return ObjectCursor(frozenset({keys[-1]}))
        return ObjectCursor()

    def reached(self, position: ObjectCursor, target: ObjectCursor) -> bool:
        """Whether a reader at ``position`` has read up to ``target``'s newest key."""
        return position.key >= target.key

    def prune(self, upto: ObjectCursor, now: float | None = None) -> int:
        """Deletes whole hours of objects that were read (before the grace window) and are
        older than the retention.

        Returns:
            Objects deleted.
        """
        floor = self._floor(upto)
        cutoff = _hour((time.time() if now is None else now) - self.retention_s - 3600.0)
        deleted = 0
        for hour in self._call("list", self._hours):
            if hour >= floor[:10] or hour > cutoff:
                break
            deleted += sum(len(self._keys(folder)) for folder in self._folders(hour) if folder[:10] == hour)
            self._call("prune", lambda hour=hour: self._remove(hour))
        return deleted

    def _remove(self, hour: str) -> None:
        if self.location.remote:
            self.fs.rm(f"{self.location.root}/{hour}", recursive=True)
            return
        shutil.rmtree(self._root_path() / hour)

    def segments_since(self, since: float) -> Iterator[bytes]:
        """Every kept object written at or after the Unix time ``since``, in name order (for export).

        Raises:
            StoreUnavailable: The bucket or directory cannot be listed or read.
        """
        floor = time_key(since)
        for folder in self._folders(floor):
            for key in self._keys(folder):
                if key >= floor:
                    try:
                        yield self._call("read", lambda key=key: self._get(key))
                    except StoreUnavailable as exc:
                        if not isinstance(exc.__cause__, FileNotFoundError):
                            raise


def _host() -> str:
    name = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:40]
    return name or "host"
