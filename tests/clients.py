"""
Real pull clients for integration tests: Docker Engine (dockerd + the docker
CLI), containerd (+ ctr) and podman, each with every bit of state in a
private directory, listening only on unix sockets, and stopped cleanly.

Nothing starts on import. Every helper calls ``need(binary)`` first, so a
missing client skips the test (fails it under CI=true).

What these programs would otherwise touch on the machine, and how it is
avoided here:

- containerd: ``root``, ``state`` and both sockets come from its config file;
  the ``opt`` plugin (which creates ``/opt/containerd``) and the plugins that
  cannot work here (CRI, btrfs, zfs, devmapper, aufs, tracing) are disabled.
- dockerd: runs on a private containerd of its own (``--containerd``) rather
  than the one it would spawn (that one creates ``/opt/containerd``); a
  private ``--config-file`` puts its trust key (``deprecated-key-path``,
  otherwise ``/etc/docker/key.json``) in the work dir. dockerd 20.10 still
  creates the empty directory ``/run/docker/plugins`` (hard-coded).
- podman: ``--root``, ``--runroot``, ``--tmpdir`` and ``--network-config-dir``
  in the work dir (the last one, otherwise ``/etc/cni/net.d/cni.lock``),
  ``--events-backend none``, ``--cgroup-manager cgroupfs``. podman refuses
  a runroot path longer than 50 characters: a longer one is reached through
  a symlink ``/tmp/cb-podman-<hash>``, removed when the interpreter exits.
  (skopeo and podman still share the machine's blob-info cache,
  ``/var/lib/containers/cache/blob-info-cache-v1.boltdb``, as peers.skopeo does.)
- Unix socket paths longer than about 90 bytes go to a short ``/tmp/cb-sock-*``
  directory, removed by ``stop()``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

import pytest

from peers import LoggedProcess, need

#: Longest unix socket path we use as is (sun_path holds 108 bytes).
_MAX_SOCKET_PATH = 90


def need_root(program: str) -> None:
    """Skip (fail under CI=true) when not root: ``program`` needs it here."""
    if os.geteuid() != 0:
        reason = f"{program} needs root in these tests"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The environment for client programs: no HTTP proxies (everything here is
    on 127.0.0.1) and no AWS_CA_BUNDLE (some Go programs choke on it).
    """
    env = {
        k: v for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and k != "AWS_CA_BUNDLE"
    }
    env.update(extra or {})
    return env


def _socket_dir(workdir: Path) -> tuple[Path, bool]:
    """
    ``workdir``, or a short private directory (made now; the caller removes
    it) when socket paths would be too long; and whether it was made.
    """
    if len(str(workdir)) + 32 <= _MAX_SOCKET_PATH:
        return workdir, False
    return Path(tempfile.mkdtemp(prefix="cb-sock-", dir="/tmp")), True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _stop_process(proc: subprocess.Popen[Any] | None, grace: float) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _run(
    args: Sequence[str], *, input: str | None = None, timeout: float = 300.0,
    check: bool = False, env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args), input=input, capture_output=True, text=True, timeout=timeout,
        env=client_env(env), stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# ---------------------------------------------------------------------------
# containerd
# ---------------------------------------------------------------------------

#: Plugins that either fail on this kind of machine or write outside the work
#: dir; none is needed to pull images.
CONTAINERD_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)


class Containerd(LoggedProcess):
    """
    ``containerd --config C.toml`` with root, state and sockets under
    ``workdir``. Construct, ``start()`` (returns self), ``ctr(...)``, ``stop()``.
    Also a context manager.
    """

    def __init__(self, workdir: Path, log_level: str = "info") -> None:
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.config_path = self.workdir / "containerd.toml"
        self.log_path = self.workdir / "containerd.log"
        self.socket_dir, self._own_socket_dir = _socket_dir(self.workdir)
        self.address = str(self.socket_dir / "containerd.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def config_text(self) -> str:
        disabled = ", ".join(json.dumps(p) for p in CONTAINERD_DISABLED_PLUGINS)
        return "\n".join([
            "version = 2",
            f"root = {json.dumps(str(self.root))}",
            f"state = {json.dumps(str(self.state))}",
            f"disabled_plugins = [{disabled}]",
            "[grpc]",
            f"  address = {json.dumps(self.address)}",
            "[ttrpc]",
            f"  address = {json.dumps(self.address + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            f"  level = {json.dumps(self.log_level)}",
            "[metrics]",
            '  address = ""',
            "",
        ])

    def start(self, timeout: float = 30.0) -> Self:
        binary = need("containerd")
        need("ctr")
        need_root("containerd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [binary, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=client_env(), cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"containerd exited with {self.process.returncode}\n" + _tail(self.log_path)
                    )
                if os.path.exists(self.address) and self.ctr("version", timeout=10).returncode == 0:
                    return self
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"containerd not up after {timeout}s\n" + _tail(self.log_path)
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def ctr(
        self, *args: str, timeout: float = 300.0, check: bool = False, namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCK [-n NAMESPACE] ARGS...``; output as text."""
        binary = need("ctr")
        ns = ["-n", namespace] if namespace else []
        return _run([binary, "-a", self.address, *ns, *args], timeout=timeout, check=check)

    def stop(self, grace: float = 15.0) -> int | None:
        code = _stop_process(self.process, grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        return code



# ---------------------------------------------------------------------------
# Docker Engine
# ---------------------------------------------------------------------------


class Dockerd(LoggedProcess):
    """
    ``dockerd`` (vfs storage, no iptables, no bridge) with data root, exec
    root, pid file, trust key and daemon config under ``workdir``, listening
    on a unix socket only, on a private ``Containerd``. The docker CLI runs
    with its own ``--config`` dir (so ``docker login`` credentials stay
    there). ``extra_args`` go to dockerd (e.g. ``--registry-mirror URL``);
    ``daemon_config`` is merged into its JSON config file.
    Construct, ``start()`` (returns self), ``docker(...)``, ``stop()``.
    """

    def __init__(
        self,
        workdir: Path,
        extra_args: Sequence[str] = (),
        daemon_config: Mapping[str, Any] | None = None,
        debug: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)
        self.daemon_config = dict(daemon_config or {})
        self.debug = debug
        self.data_root = self.workdir / "data"
        self.pidfile = self.workdir / "dockerd.pid"
        self.config_path = self.workdir / "daemon.json"
        self.cli_config = self.workdir / "cli"
        self.log_path = self.workdir / "dockerd.log"
        self.socket_dir, self._own_socket_dir = _socket_dir(self.workdir)
        # The exec root holds sockets too (metrics.sock).
        self.exec_root = self.socket_dir / "exec"
        self.socket = str(self.socket_dir / "docker.sock")
        self.host = f"unix://{self.socket}"
        self.containerd = Containerd(self.workdir / "containerd")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def command(self, binary: str) -> list[str]:
        return [
            binary,
            "--config-file", str(self.config_path),
            "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--storage-driver=vfs",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "--containerd", self.containerd.address,
            "-H", self.host,
            *(["--debug"] if self.debug else []),
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> Self:
        binary = need("dockerd")
        need("docker")
        need_root("dockerd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cli_config.mkdir(parents=True, exist_ok=True)
        # An empty CLI config: no credential helper, so `docker login` stores
        # the credentials in cli/config.json and nowhere else.
        (self.cli_config / "config.json").write_text("{}\n")
        config = {"deprecated-key-path": str(self.workdir / "key.json"), **self.daemon_config}
        self.config_path.write_text(json.dumps(config, indent=2))
        try:
            self.containerd.start()
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
            self.process = subprocess.Popen(
                self.command(binary), stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, env=client_env(), cwd=self.workdir,
            )
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"dockerd exited with {self.process.returncode}\n" + _tail(self.log_path)
                    )
                if os.path.exists(self.socket) and self.docker("info", timeout=15).returncode == 0:
                    return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd not up after {timeout}s\n" + _tail(self.log_path))
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def docker(
        self, *args: str, input: str | None = None, timeout: float = 300.0, check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """``docker --config CLI_DIR -H unix://SOCK ARGS...``; output as text."""
        binary = need("docker")
        return _run(
            [binary, "--config", str(self.cli_config), "-H", self.host, *args],
            input=input, timeout=timeout, check=check,
        )

    def login(self, registry: str, username: str, password: str) -> subprocess.CompletedProcess[str]:
        """``docker login REGISTRY -u USERNAME --password-stdin``."""
        return self.docker("login", registry, "-u", username, "--password-stdin", input=password + "\n")

    def image_refs(self) -> list[str]:
        """Every ``REPOSITORY:TAG`` the daemon holds."""
        out = self.docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def stop(self, grace: float = 20.0) -> int | None:
        code = _stop_process(self.process, grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.containerd.stop()
        if self._own_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        return code



# ---------------------------------------------------------------------------
# podman
# ---------------------------------------------------------------------------


#: podman refuses a --runroot longer than this.
_PODMAN_MAX_RUNROOT = 50
#: The /tmp symlinks made for long runroots; removed when the interpreter exits.
_PODMAN_LINKS: set[Path] = set()


@atexit.register
def _remove_podman_links() -> None:
    for link in _PODMAN_LINKS:
        with contextlib.suppress(OSError):
            link.unlink()


def _short_path(path: Path) -> Path:
    """
    ``path``, or when it is too long for podman's --runroot, a symlink to it
    in /tmp whose name is derived from it (the same for every call: podman
    remembers its runroot in its database and refuses another one later).
    """
    if len(str(path)) <= _PODMAN_MAX_RUNROOT:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    link = Path(tempfile.gettempdir()) / f"cb-podman-{digest}"
    if not link.is_symlink() or os.readlink(link) != str(path):
        link.unlink(missing_ok=True)
        link.symlink_to(path, target_is_directory=True)
    _PODMAN_LINKS.add(link)
    return link


def podman(
    *args: str,
    root: Path,
    runroot: Path,
    storage_driver: str = "vfs",
    timeout: float = 300.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """
    ``podman ARGS...`` with its image store in ``root`` and run state in
    ``runroot`` (its tmp dir and network config dir beside ``runroot``), so
    the machine's own storage is never touched. podman refuses a runroot
    path longer than 50 characters: a longer one is reached through a
    symlink /tmp/cb-podman-<hash>. ``vfs`` by default: no
    overlay mounts are left behind for the tmp dir's cleanup to trip on.
    """
    binary = need("podman")
    root = Path(root)
    runroot = Path(runroot)
    tmpdir = runroot.parent / (runroot.name + "-tmp")
    netdir = runroot.parent / (runroot.name + "-net")
    for d in (root, runroot, tmpdir, netdir):
        d.mkdir(parents=True, exist_ok=True)
    runroot = _short_path(runroot)
    auth_file = runroot / "auth.json"
    if not auth_file.exists():
        auth_file.write_text('{"auths": {}}\n')
    return _run(
        [
            binary,
            "--root", str(root),
            "--runroot", str(runroot),
            "--tmpdir", str(tmpdir),
            "--network-config-dir", str(netdir),
            "--storage-driver", storage_driver,
            "--events-backend", "none",
            "--cgroup-manager", "cgroupfs",
            *args,
        ],
        timeout=timeout, check=check,
        # No registries.conf short-name prompts, no auth file of the machine.
        env={"REGISTRY_AUTH_FILE": str(runroot / "auth.json")},
    )


__all__ = ["CONTAINERD_DISABLED_PLUGINS", "Containerd", "Dockerd", "client_env", "need_root", "podman"]
