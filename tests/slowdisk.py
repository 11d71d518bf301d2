"""
A real filesystem whose writes are slow, for testing what cargobay does when
its cache's disk cannot keep up with the upstream: a FUSE passthrough
(fusepy over libfuse 2) onto a plain directory, every write throttled to a
given number of bytes per second.  Reads, renames, fsync and the rest pass
straight through.

    python tests/slowdisk.py SOURCE MOUNTPOINT BYTES_PER_SECOND

``SlowDisk`` mounts one for a test and unmounts it afterwards.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def available() -> str | None:
    """None when a slow disk can be mounted here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and shutil.which("fusermount") is None:
        return "not root, and no fusermount (Debian package fuse)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:  # fusepy raises OSError without libfuse.so.2
        return f"fusepy cannot load libfuse 2 ({e})"
    return None


def _operations(root: str, rate: float) -> Any:
    from fuse import FuseOSError, Operations

    class Throttled(Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._free_at = time.monotonic()

        def _path(self, path: str) -> str:
            return os.path.join(root, path.lstrip("/"))

        def _throttle(self, count: int) -> None:
            # One disk: writes queue behind each other at ``rate``.
            with self._lock:
                now = time.monotonic()
                self._free_at = max(now, self._free_at) + count / rate
                wait = self._free_at - now
            time.sleep(wait)

        def __call__(self, op: str, path: str, *args: Any) -> Any:
            try:
                return super().__call__(op, path, *args)
            except OSError as e:
                raise FuseOSError(e.errno or errno.EIO) from None

        def access(self, path: str, mode: int) -> None:
            if not os.access(self._path(path), mode):
                raise FuseOSError(errno.EACCES)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.lstat(self._path(path))
            keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
            return {key: getattr(st, key) for key in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._path(path))]

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(self._path(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                    "f_frsize", "f_namemax")
            return {key: getattr(st, key) for key in keys}

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._path(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._path(path), uid, gid)

        def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
            os.utime(self._path(path), times)

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._path(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._path(path))

        def unlink(self, path: str) -> None:
            os.unlink(self._path(path))

        def rename(self, old: str, new: str) -> None:
            os.rename(self._path(old), self._path(new))

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            os.truncate(self._path(path), length)

        def open(self, path: str, flags: int) -> int:
            return os.open(self._path(path), flags)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            self._throttle(len(data))
            return os.pwrite(fh, data, offset)

        def flush(self, path: str, fh: int) -> None:
            return None

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            os.fsync(fh)

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

    return Throttled()


class SlowDisk:
    """A mounted slow disk at ``mountpoint``, its data kept in ``source``."""

    def __init__(self, base: Path, bytes_per_second: int) -> None:
        self.source = base / "slowdisk-data"
        self.mountpoint = base / "slowdisk"
        self.rate = bytes_per_second
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SlowDisk:
        self.source.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._log = open(self.source.parent / "slowdisk.log", "wb")  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(self.source), str(self.mountpoint), str(self.rate)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                log = (self.source.parent / "slowdisk.log").read_text(errors="replace")
                raise RuntimeError(f"the slow disk did not mount: {log[-2000:]}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        # Always try: a mount whose daemon died is not "a mount" to ismount()
        # ("transport endpoint is not connected") but must still go.  libfuse
        # mounts directly as root; fusermount is for everyone else.
        unmount = ["fusermount", "-u"] if shutil.which("fusermount") else ["umount"]
        if subprocess.run([*unmount, str(self.mountpoint)], capture_output=True).returncode:
            lazily = ["fusermount", "-uz"] if unmount[0] == "fusermount" else ["umount", "-l"]
            subprocess.run([*lazily, str(self.mountpoint)], capture_output=True)
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._log.close()


def main(argv: list[str]) -> None:
    from fuse import FUSE

    source, mountpoint, rate = argv
    # kernel_cache: what was written stays in the page cache across opens, so
    # reading the cache back is not slowed down too.
    FUSE(_operations(os.path.abspath(source), float(rate)), mountpoint, foreground=True, nothreads=False,
         big_writes=True, max_write=131072, kernel_cache=True)


if __name__ == "__main__":
    main(sys.argv[1:])
