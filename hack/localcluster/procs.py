"""Process and port helpers: start detached process groups, stop them, find leftovers.

Every process the local cluster starts carries the environment variable
``QLORA_LOCALCLUSTER=<cluster id>`` (children inherit it), so :func:`marked_pids`
finds whatever a crash or a kill left behind, whoever its parent is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

MARKER_ENV = "QLORA_LOCALCLUSTER"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that are free on ``host`` right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (IPv4 and IPv6), from /proc/net."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``port`` and a server could bind it (SO_REUSEADDR)."""
    if port in listening_ports():
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    or None when there is no such process. Used to tell a pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, started: int | None = None) -> bool:
    """True when ``pid`` runs and is not a zombie (and, given ``started``, is the same process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] in ("Z", "X"):
        return False
    return started is None or int(rest[19]) == started


def spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` in a new session (its own process group), output appended to ``log_path``.

    The child does not die with this process: stop it with :func:`stop_groups`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=cwd, start_new_session=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (no-op otherwise), so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_groups(groups: Iterable[tuple[int, int | None]], grace_s: float = 10.0) -> list[int]:
    """Stop process groups: SIGTERM each, wait up to ``grace_s`` seconds, then SIGKILL.

    ``groups`` holds (pid, start_time) of each group leader (pgid == pid, as started by
    :func:`spawn`); a start_time that does not match means the pid was reused and the
    group is left alone. Returns the leader pids still alive at the end (normally none).
    """
    leaders = [(pid, st) for pid, st in groups if alive(pid, st)]
    for pid, _ in leaders:
        _signal_group(pid, signal.SIGTERM)
    _reap_until_gone([pid for pid, _ in leaders], grace_s)
    for pid, _ in leaders:
        _signal_group(pid, signal.SIGKILL)  # also members that outlived their leader
    _reap_until_gone([pid for pid, _ in leaders], 5.0)
    return [pid for pid, _ in leaders if alive(pid)]


def _reap_until_gone(pids: list[int], timeout_s: float) -> None:
    """Reap ``pids`` until none is alive or ``timeout_s`` seconds have passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in pids:
            _reap(pid)
        if not any(alive(pid) for pid in pids):
            return
        time.sleep(0.05)


def marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose environment has ``QLORA_LOCALCLUSTER=<marker>``."""
    needle = f"{MARKER_ENV}={marker}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0"
        except OSError:
            continue
        if needle in environ and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_marked(marker: str, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL every process carrying the marker; return the pids still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pids = marked_pids(marker)
    while pids and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _reap(pid)
        time.sleep(0.05)
        pids = marked_pids(marker)
    return pids


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
