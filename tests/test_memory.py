"""
How cargobay has malloc treat the buffers blob bodies pass through: see
L{cargobay.server_tap._reuse_freed_memory}.
"""

import platform
import subprocess
import sys

import pytest

# Reads 256 MiB from a socket as the upstream side of a download does
# (reads of up to 1 MiB, a few megabytes of them queued for the hashing and
# writing threads), and prints the page faults that took.
_RECEIVE = """
import resource, socket, sys, threading
if sys.argv[1] == "reuse":
    from cargobay.server_tap import _reuse_freed_memory
    assert _reuse_freed_memory()
a, b = socket.socketpair()
chunk = b"x" * (1 << 20)
def send():
    for _ in range(256):
        a.sendall(chunk)
    a.close()
threading.Thread(target=send).start()
queued = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
while data := b.recv(1 << 20):
    queued.append(data)
    if len(queued) > 8:
        queued.pop(0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _RECEIVE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(3) is glibc's")
def test_received_bytes_land_in_reused_memory():
    # By default every 1 MiB read is a fresh mmap: its pages are faulted in
    # (cleared by the kernel) for each read, most of the 65,536 pages the
    # 256 MiB fill.  Reused, only the heap's first growth faults.
    reused, default = _faults("reuse"), _faults("default")
    assert reused < 8192, (reused, default)
    assert reused * 3 < default, (reused, default)
