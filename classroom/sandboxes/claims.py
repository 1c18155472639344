"""Claims on SQLite sandbox files: a lock that dies with the process holding it.

A process holds a shared flock on `<sandbox file>.lock` for as long as it holds the sandbox,
awake or dormant, and touches that file when it uses the sandbox (at most once per lease renewal
interval), so the lock file's time says when the sandbox was last used, as a PostgreSQL lease
does. The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a
sandbox file whose lock nobody holds belongs to no live process: once unused for longer than the
idle limit, any QuLab process deletes it, with its Redis keys. It takes the lock exclusively
first, so nobody opens the sandbox meanwhile, and a process that opens it next locks a new lock
file. Files made before these locks existed carry their process id in their name (embedded) and
are left alone while that process lives.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from classroom.errors import BackendUnavailableError
from classroom.sandboxes.sandbox import SANDBOX_ID_PATTERN

logger = logging.getLogger("qulab")

LOCK_SUFFIX = ".lock"
COMPANION_SUFFIXES = ("", "-wal", "-shm", "-journal")  # SQLite's files beside a database
CLAIM_WAIT_SECONDS = 10.0  # a reaper holds a lock only while it deletes one sandbox's files
# Embedded sandbox files: qulab-<pid>-<sandbox id>.sqlite3 (the class file, qulab-<pid>-class-…,
# is not one of them).
EMBEDDED_FILE_NAME = re.compile(r"qulab-(?P<pid>[0-9]+)-(?P<id>[a-z0-9]{8,32})\.sqlite3")


def lock_path(path: Path) -> Path:
    """The lock file of a sandbox file."""
    return Path(str(path) + LOCK_SUFFIX)


def delete_sandbox_files(path: Path) -> None:
    """Delete a sandbox's database with its WAL, shared memory and journal files."""
    for suffix in COMPANION_SUFFIXES:
        Path(str(path) + suffix).unlink(missing_ok=True)


def last_written(path: Path) -> float:
    """When the sandbox's files last changed (in WAL mode commits land in -wal), 0 if none."""
    times = []
    for suffix in COMPANION_SUFFIXES:
        try:
            times.append(Path(str(path) + suffix).stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times, default=0.0)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _same_file(descriptor: int, path: Path) -> bool:
    """True when the open lock file is still the one at `path` (a reaper did not unlink it)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _lock(path: Path, mode: int, *, create: bool = True) -> Optional[int]:
    """An open descriptor of `path` holding the flock `mode` now, or None when someone else holds
    a lock that conflicts (or, without create, when there is no lock file)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    while True:
        try:
            descriptor = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        except PermissionError:  # another user's process made it: not ours to judge
            return None
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # unlinked by a reaper between open and lock: lock the new file
        if not create:
            return None


class FileClaims:
    """The sandbox files this process holds: one open, shared-locked lock file each."""

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}

    def holds(self, path: Path) -> bool:
        """True while this process holds the sandbox file."""
        return path in self._held

    async def claim(self, path: Path) -> None:
        """Hold the sandbox file (shared lock) until released; waits while a reaper deletes it."""
        if path in self._held:
            return
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        while (descriptor := _lock(lock_path(path), fcntl.LOCK_SH)) is None:
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"The sandbox file {path.name} stayed locked for {CLAIM_WAIT_SECONDS:g} s."
                )
            await asyncio.sleep(0.01)  # a reaper is deleting its files: a matter of moments
        self._held[path] = descriptor
        self.renew(path)

    def renew(self, path: Path) -> bool:
        """Mark the sandbox used now (the lock file's time); False if this process lost it."""
        if path not in self._held:
            return False
        try:
            os.utime(lock_path(path))
        except FileNotFoundError:
            return False
        return True

    def take_for_deletion(self, path: Path) -> Optional[int]:
        """This process's claim made exclusive, or None when another live process holds the
        sandbox too (its data then stays). Deletion ends with end_deletion."""
        descriptor = self._held.pop(path, None)
        if descriptor is None:
            return _lock(lock_path(path), fcntl.LOCK_EX)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        return descriptor

    @staticmethod
    def end_deletion(path: Path, descriptor: int) -> None:
        """The files are gone: the lock file goes too, then the lock is let go."""
        try:
            lock_path(path).unlink(missing_ok=True)
        finally:
            os.close(descriptor)

    def release_all(self) -> None:
        """Let go of every claim; the files stay (the next process reaps them once idle)."""
        for descriptor in self._held.values():
            os.close(descriptor)
        self._held.clear()


def adopt_unheld(directory: Path, sandbox_id: str, path: Path) -> Optional[Path]:
    """Move to `path` the sandbox's files that another process made and no live process holds
    (it was killed, or stopped): the learner it sends here (HAProxy's redispatch, a reload)
    finds their data. Returns the file adopted, or None (none, or a live process holds it)."""
    for found in embedded_sandbox_files(directory):
        if found.sandbox_id != sandbox_id or found.path == path:
            continue
        descriptor = _lock(lock_path(found.path), fcntl.LOCK_EX, create=False)
        if descriptor is None:
            continue  # a live process holds it (or it has no lock file: made before locks)
        try:
            if not found.path.exists():
                continue
            for suffix in COMPANION_SUFFIXES:  # the database last: a crash leaves it findable
                moved = Path(str(found.path) + suffix)
                if suffix and moved.exists():
                    moved.rename(str(path) + suffix)
            found.path.rename(path)
            lock_path(found.path).unlink(missing_ok=True)
        finally:
            os.close(descriptor)
        return found.path
    return None


@dataclass(frozen=True)
class SandboxFile:
    """A sandbox's database file found on disk."""

    path: Path
    sandbox_id: str
    pid: Optional[int]  # the process that made it (embedded files); None beside a sqlite:/// path


def embedded_sandbox_files(directory: Path) -> Iterator[SandboxFile]:
    """Every embedded sandbox file in the directory, whichever process made it."""
    with os.scandir(directory) as entries:
        for entry in entries:
            named = EMBEDDED_FILE_NAME.fullmatch(entry.name)
            if named is not None:
                yield SandboxFile(Path(entry.path), named["id"], int(named["pid"]))


def files_beside(template: Path, placeholder: str) -> Iterator[SandboxFile]:
    """Sandbox files named like `template` (placeholder where the sandbox id goes)."""
    prefix, suffix = template.name.split(placeholder, 1)
    for path in template.parent.glob(f"{prefix}*{suffix}"):
        sandbox_id = path.name[len(prefix) : len(path.name) - len(suffix)]
        if SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
            yield SandboxFile(path, sandbox_id, None)


def reap_unheld(
    files: Iterator[SandboxFile], claims: FileClaims, *, unused_for_seconds: float
) -> list[SandboxFile]:
    """Delete the sandbox files no live process holds, unused for longer than that."""
    cutoff = time.time() - unused_for_seconds
    reaped = []
    for found in files:
        if claims.holds(found.path):
            continue
        try:
            if _reap_if_unheld(found, cutoff):
                reaped.append(found)
        except OSError:
            logger.warning("could not reap sandbox file %s", found.path, exc_info=True)
    return reaped


def _reap_if_unheld(found: SandboxFile, cutoff: float) -> bool:
    """Delete one sandbox's files if no live process holds them and nobody used them since."""
    lock = lock_path(found.path)
    had_lock = lock.exists()
    if not had_lock and found.pid is not None and process_alive(found.pid):
        return False  # made before locks existed, and its process still runs
    descriptor = _lock(lock, fcntl.LOCK_EX)
    if descriptor is None:
        return False  # a live process holds it
    try:
        exists = found.path.exists()  # its files may have gone meanwhile
        used = last_written(found.path)
        if had_lock:
            used = max(used, os.fstat(descriptor).st_mtime)
        unused = exists and used < cutoff
        if unused:
            delete_sandbox_files(found.path)
        elif not had_lock or not exists:  # a file made before locks stays as it was
            lock.unlink(missing_ok=True)
    except BaseException:
        os.close(descriptor)
        raise
    if not unused:
        os.close(descriptor)
        return False
    FileClaims.end_deletion(found.path, descriptor)
    logger.info("deleted sandbox file %s: no live process held it", found.path)
    return True
