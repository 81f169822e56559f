"""Is a process alive, and who is this process? The one liveness check of the harness (stale runs, stale claims).

A pid names a process only inside its PID namespace: containers that share a host name do not share
pids, and neither do two machines. So a pid is read as a sign of death only when the claim or run
that carries it was made in this process's own namespace (`pid_namespace`); anywhere else the
heartbeat alone decides. Who owns a claim is a random token per process (`process_token`), not a pid.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists in this PID namespace, also someone else's (signal 0
    checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@functools.cache
def pid_namespace() -> str | None:
    """This process's PID namespace, named uniquely across machines: the kernel's boot id (one per
    machine and boot) and the namespace's inode (one per namespace of that kernel: each container
    has its own). None where it cannot be read (not Linux): then no pid is trusted."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def gone_here(pidns: object, pid: object) -> bool:
    """Whether the process `pid` of PID namespace `pidns` (as a claim or run recorded them) is known to
    be gone: only when that namespace is this process's own, so a pid is never looked up where it
    means another process or none (False: not known, let the heartbeat decide)."""
    here = pid_namespace()
    if here is None or pidns != here:
        return False
    pid = int(pid) if isinstance(pid, str) and pid.isdigit() else pid
    return isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid)


_token: tuple[int, str] | None = None


def process_token() -> str:
    """A random name for this process, unique across machines and namespaces (a forked child gets its
    own): who owns a claim, where a host name and a pid are not enough to tell."""
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), secrets.token_hex(8))
    return _token[1]


__all__ = ["gone_here", "pid_alive", "pid_namespace", "process_token"]
