"""A real MLflow tracking server on loopback, for the tracking tests (issue 17 item 2).

The server is the full ``mlflow`` package from PyPI at ``MLFLOW_VERSION`` of
``hack/versions.env``. It is installed once into its own virtual environment, outside the
clone and keyed by version like the cluster binaries::

    ${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator/mlflow-<version>/   (venv; .complete written last)

with ``pip install -c hack/mlflow-constraints.txt mlflow==<version>``: every package of
that venv pinned (a ``pip freeze`` of it; not ``constraints.txt``, whose pins the server's
dependencies contradict). pip's own download cache (``~/.cache/pip``) keeps the wheels.

The version is the newest whose full package PyPI can install, 3.17.2, while the trainer's
client (``mlflow-skinny`` in ``constraints.txt``) is 3.18.0: ``mlflow==3.18.0`` requires
``mlflow-tracing==3.18.0``, which PyPI does not have. They speak MLflow's REST API
(``/api/2.0/mlflow/...``), stable within a major version; :func:`check_pins` refuses a
different major version.

:class:`MlflowServer` runs ``mlflow server`` in its own process group: random free port,
SQLite backend store and a proxied artifact store (``--serve-artifacts``: clients upload
through the server, ``mlflow-artifacts:/`` URIs, no S3 credentials on the client) under
a directory of the caller; :meth:`MlflowServer.start` returns once ``GET /health`` answers
``OK``; :meth:`MlflowServer.stop` stops the whole group (SIGTERM, then SIGKILL).

CLI: ``python hack/localcluster/mlflow_server.py install`` prints the venv's path;
``... serve DIR`` runs a server until interrupted (prints its URL).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``localcluster`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localcluster import procs
from localcluster.binaries import HACK_DIR, read_versions

REPO = HACK_DIR.parent
CONSTRAINTS = REPO / "constraints.txt"
#: Pins of every package of the server venv (``pip freeze`` of it).
SERVER_CONSTRAINTS = HACK_DIR / "mlflow-constraints.txt"
#: Environment of every MLflow process the tests start: no usage telemetry.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


class MlflowServerError(RuntimeError):
    """The server venv could not be installed or the server did not come up; the message has the output."""


def version() -> str:
    """``MLFLOW_VERSION`` of ``hack/versions.env`` (for example ``3.18.0``)."""
    return read_versions()["MLFLOW_VERSION"]


def skinny_pin(constraints: Path = CONSTRAINTS) -> str | None:
    """The ``mlflow-skinny==X`` version of ``constraints.txt`` (``None`` when not pinned)."""
    for line in constraints.read_text().splitlines():
        name, sep, pin = line.strip().partition("==")
        if sep and name.strip().lower().replace("_", "-") == "mlflow-skinny":
            return pin.strip()
    return None


def check_pins() -> None:
    """Raise :class:`MlflowServerError` unless ``MLFLOW_VERSION`` and the mlflow-skinny pin share
    their major version (the REST API the trainer's client speaks to the server)."""
    server, client = version(), skinny_pin()
    if client is None or server.split(".")[0] != client.split(".")[0]:
        raise MlflowServerError(
            f"hack/versions.env MLFLOW_VERSION={server} but constraints.txt pins mlflow-skinny=={client}: "
            "the test server and the trainer's client must share the MLflow major version"
        )


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator`` (shared with the cluster binaries)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlora-operator"


def venv_dir(ver: str | None = None) -> Path:
    """``<cache>/mlflow-<version>``: the server's virtual environment (may not exist yet)."""
    return cache_dir() / f"mlflow-{ver or version()}"


def ensure_venv(ver: str | None = None, timeout_s: float = 1800) -> Path:
    """The server venv for ``ver`` (default :func:`version`), installing it when missing.

    Idempotent and safe to call from concurrent processes (a file lock next to the venv);
    a venv without its ``.complete`` marker (an interrupted install) is removed and redone.
    Returns the venv directory; its ``bin/python -m mlflow`` is the server.

    Raises:
        MlflowServerError: pip failed (the message ends with pip's output) or the pins drifted.
    """
    check_pins()
    ver = ver or version()
    dest = venv_dir(ver)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".mlflow-{ver}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").is_file():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        # A venv is not relocatable (absolute paths in bin/): build it in place, marker last.
        cmds = [
            [sys.executable, "-m", "venv", str(dest)],
            [str(dest / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *(["-c", str(SERVER_CONSTRAINTS)] if SERVER_CONSTRAINTS.is_file() else []),
             f"mlflow=={ver}"],
        ]
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                shutil.rmtree(dest, ignore_errors=True)
                raise MlflowServerError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}"
                                        f"{done.stderr[-6000:]}")
        (dest / ".complete").write_text(f"mlflow=={ver}\n")
    return dest


class MlflowServer:
    """``mlflow server`` on ``127.0.0.1:<free port>`` with its stores under ``directory``.

    ``directory/mlflow.db`` (SQLite backend store), ``directory/artifacts/`` (proxied
    artifact store), ``directory/mlflow-server.log`` (its output). ``url`` is
    ``http://127.0.0.1:<port>``, the ``trackingUri`` of a job.
    """

    def __init__(self, directory: Path, ver: str | None = None, workers: int = 1) -> None:
        self.directory = Path(directory)
        self.version = ver or version()
        self.workers = workers
        self.port = procs.free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.directory / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None
        self._started: int | None = None
        self.startup_seconds: float | None = None

    @property
    def artifacts_dir(self) -> Path:
        """Where the server keeps logged artifacts (``<experiment id>/<run id>/artifacts/...``)."""
        return self.directory / "artifacts"

    def start(self, timeout_s: float = 120) -> MlflowServer:
        """Install the venv if needed, start the server and wait for ``GET /health`` to answer ``OK``.

        Raises:
            MlflowServerError: the venv install failed, the server exited, or no ``OK`` within
                ``timeout_s`` seconds (the message ends with the server's log).
        """
        venv = ensure_venv(self.version)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(exist_ok=True)
        argv = [
            str(venv / "bin" / "python"), "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
            "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts_dir),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(QUIET_ENV, PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}")
        t0 = time.monotonic()
        self.proc = procs.spawn(argv, self.log, env, cwd=self.directory)
        self._started = procs.start_time(self.proc.pid)
        deadline = t0 + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise MlflowServerError(f"mlflow server exited {self.proc.returncode}:\n{procs.tail(self.log, 60)}")
            if time.monotonic() > deadline:
                self.stop()
                raise MlflowServerError(f"mlflow server not healthy after {timeout_s}s:\n{procs.tail(self.log, 60)}")
            time.sleep(0.25)
        self.startup_seconds = round(time.monotonic() - t0, 1)
        return self

    def healthy(self) -> bool:
        """True when ``GET <url>/health`` answers 200 ``OK``."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200 and resp.read().strip() == b"OK"
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Stop the server's process group; returns pids still alive (normally none)."""
        if self.proc is None:
            return []
        left = procs.stop_groups([(self.proc.pid, self._started)], grace_s)
        self.proc = None
        return left

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        print(ensure_venv())
        return 0
    if len(argv) == 2 and argv[0] == "serve":
        server = MlflowServer(Path(argv[1])).start()
        print(server.url, flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        return 0
    print("usage: mlflow_server.py install | serve DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
