"""
A private Docker Engine for the benchmark's real-pull scenario: its own data
root, exec root, pid file and unix socket under a work directory, the vfs
storage driver, no networking of its own (PEERS.md). 127.0.0.0/8 counts as an
insecure registry, so plain-HTTP registries on 127.0.0.1 work without flags.

``start_dockerd`` prefers the integration tests' ``clients.Dockerd`` (which
also keeps dockerd's containerd and trust key inside the work directory) and
falls back to the minimal ``Dockerd`` below when tests/clients.py is absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


class DockerdError(RuntimeError):
    pass


class Dockerd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.data_root = self.workdir / "data"
        self.exec_root = self.workdir / "exec"
        self.pidfile = self.workdir / "docker.pid"
        self.socket = self.workdir / "docker.sock"
        self.cli_config = self.workdir / "cli"
        self.log_path = self.workdir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 60.0) -> Dockerd:
        dockerd = shutil.which("dockerd")
        if dockerd is None or shutil.which("docker") is None:
            raise DockerdError("dockerd or the docker CLI is not installed")
        for d in (self.data_root, self.exec_root, self.cli_config):
            d.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        self.process = subprocess.Popen(
            [
                dockerd, "--iptables=false", "--ip6tables=false", "--bridge=none",
                "--storage-driver=vfs", "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
                "-H", self.host,
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            # Its own process group: a Ctrl-C in the terminal reaches us, and we
            # stop dockerd (and the containerd it started) in order.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = "\n".join(self.log_text().splitlines()[-15:])
                self.stop()
                raise DockerdError(f"dockerd exited with {self.process.returncode}:\n{tail}")
            probe = self.cli("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
            if probe.returncode == 0:
                return self
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-15:])
                self.stop()
                raise DockerdError(f"dockerd did not answer within {timeout}s:\n{tail}")
            time.sleep(0.3)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 900.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        proc = subprocess.run(
            ["docker", "--config", str(self.cli_config), "-H", self.host, *args],
            capture_output=True, text=True, timeout=timeout, env=env, input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL, check=False,
        )
        if check and proc.returncode != 0:
            raise DockerdError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def login(self, registry: str, username: str, password: str) -> None:
        self.cli("login", registry, "-u", username, "--password-stdin", stdin=password)

    def stop(self, grace: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # Kill the whole group: dockerd and the containerd it started.
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class _TestsDockerd:
    """tests/clients.py's Dockerd behind the interface used by bench/run.py."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def cli(
        self, *args: str, check: bool = True, timeout: float = 900.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc: subprocess.CompletedProcess[str] = self._inner.docker(  # type: ignore[attr-defined]
            *args, input=stdin, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise DockerdError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def login(self, registry: str, username: str, password: str) -> None:
        self.cli("login", registry, "-u", username, "--password-stdin", stdin=password + "\n")

    def stop(self) -> None:
        self._inner.stop()  # type: ignore[attr-defined]

    def log_text(self) -> str:
        return str(self._inner.log_text())  # type: ignore[attr-defined]


def start_dockerd(workdir: Path, on_created: Callable[[Callable[[], None]], None]) -> Dockerd | _TestsDockerd:
    """
    A started Docker Engine; ``on_created`` receives its stop function before
    it starts (so an interrupted start is still cleaned up). Raises
    DockerdError when it cannot start.
    """
    try:
        from clients import Dockerd as TestsDockerd  # tests/ is on sys.path
    except ImportError:
        TestsDockerd = None  # noqa: N806
    if TestsDockerd is None:
        mine = Dockerd(workdir)
        on_created(mine.stop)
        return mine.start()
    inner = TestsDockerd(workdir)
    wrapped = _TestsDockerd(inner)
    on_created(wrapped.stop)
    try:
        inner.start()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - pytest's skip is a BaseException
        raise DockerdError(str(e) or type(e).__name__) from e
    return wrapped
