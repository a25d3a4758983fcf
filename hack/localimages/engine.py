"""The container engine: podman (Debian's package), set up the way this machine kind needs.

- :func:`ensure_tools` installs ``podman``, ``buildah``, ``runc``, ``debootstrap`` and the CNI plugins
  with ``apt-get`` when one is missing (as root on Debian; elsewhere it names the command).
- :func:`podman_env` points podman at ``<cache>/containers.conf``
  (``CONTAINERS_CONF``): runc as the runtime (crun refuses the cgroup v1 hybrid layout)
  and default ulimits no higher than this process's hard limits (podman's default
  ``nofile=1048576`` fails with "setrlimit RLIMIT_NOFILE: Operation not permitted" where
  the VM lacks CAP_SYS_RESOURCE).
- :func:`podman` runs one podman command with that environment and raises
  :class:`EngineError` with its output when it fails.

Images live in podman's own storage; ``hack/localimages`` only keeps stamp files.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

#: Debian packages that give a working rootful podman build/run here (notes/real-node.md).
APT_PACKAGES = ("podman", "buildah", "runc", "debootstrap", "containernetworking-plugins", "iptables")
#: Commands that must be on PATH (the package that brings each).
REQUIRED_TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
#: ulimits of every container (podman's own default nofile is 1048576); lowered to the
#: hard limit where that is less. 20000 is what notes/real-node.md measured to work: the
#: hard nproc limit itself is refused by runc ("error setting rlimit type 6").
_ULIMIT_CAP = 20000


class EngineError(RuntimeError):
    """podman (or installing it) failed; the message holds the command and its output."""


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/qlora-operator/images`` (created)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "qlora-operator" / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_tools() -> list[str]:
    """Names of the required commands that are not on PATH."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def ensure_tools(log=print) -> None:
    """Install the container tools with apt-get when one is missing.

    Raises:
        EngineError: a tool is missing and cannot be installed here (not root, no
            apt-get), or apt-get failed; the message names what to install.
    """
    missing = missing_tools()
    if not missing:
        return
    wanted = " ".join(APT_PACKAGES)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError(f"missing {', '.join(missing)}: install them (Debian: apt-get install -y {wanted})")
    log(f"installing {wanted} with apt-get (missing: {', '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *APT_PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)
        _run(install, env=env)
    still = missing_tools()
    if still:
        raise EngineError(f"apt-get installed {wanted} but {', '.join(still)} is still not on PATH")


def _limit(which: int) -> int:
    hard = resource.getrlimit(which)[1]
    return _ULIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, _ULIMIT_CAP)


def containers_conf_text() -> str:
    """The ``containers.conf`` podman runs with here (see the module docstring)."""
    nofile, nproc = _limit(resource.RLIMIT_NOFILE), _limit(resource.RLIMIT_NPROC)
    return (
        "# Written by hack/localimages (notes/real-node.md): runc, ulimits within the hard limits.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "\n[engine]\n"
        'runtime = "runc"\n'
    )


def podman_env() -> dict[str, str]:
    """``os.environ`` plus ``CONTAINERS_CONF`` pointing at the file this module writes."""
    conf = cache_dir() / "containers.conf"
    text = containers_conf_text()
    if not conf.is_file() or conf.read_text() != text:
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(conf)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, input: bytes | None = None,
         stream: bool = False) -> str:
    """Run ``cmd``; return its stdout (text). ``stream``: let output go to the terminal."""
    if stream:
        proc = subprocess.run(list(cmd), env=env, input=input)
        if proc.returncode != 0:
            raise EngineError(f"{' '.join(cmd)} exited {proc.returncode} (its output is above)")
        return ""
    proc = subprocess.run(list(cmd), env=env, input=input, capture_output=True)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace")[-6000:]
        raise EngineError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out}")
    return proc.stdout.decode(errors="replace")


def podman(*args: str, stream: bool = False, input: bytes | None = None) -> str:
    """Run ``podman ARGS`` with :func:`podman_env`; return stdout (see :func:`_run`)."""
    return _run(["podman", *args], env=podman_env(), input=input, stream=stream)


def image_id(ref: str) -> str | None:
    """The full ID of the local image ``ref``, or ``None`` when it is not in podman's storage."""
    proc = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref],
                          env=podman_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def image_size(ref: str) -> int:
    """Size in bytes of the local image ``ref`` (what ``podman images`` shows)."""
    return int(json.loads(podman("image", "inspect", ref))[0]["Size"])


def can_run() -> str | None:
    """``None`` when podman is installed and answers ``podman info``; else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (make images installs it with apt-get)"
    proc = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                          env=podman_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        return f"podman info failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    return None
