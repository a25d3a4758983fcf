"""Pod status as a kubelet computes it: container states, phase and conditions (pure code).

:class:`Container` holds one container's runtime state; :func:`pod_phase` follows the
kubelet's ``getPhase`` rules; :func:`pod_conditions` gives PodReadyToStartContainers,
Initialized, ContainersReady and Ready; :func:`merge_conditions` keeps conditions others
own (PodScheduled, DisruptionTarget...) when ours are written.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localcluster.kubeapi import now_rfc3339

OUR_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
POD_IP = "127.0.0.1"


@dataclass
class Container:
    """Runtime state of one container of the pod (init or regular)."""

    spec: dict[str, Any]
    init: bool
    state: str = "waiting"
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    restart_count: int = 0
    next_attempt: float = 0.0
    pull_failures: int = 0
    pull_failed_at: float = 0.0
    transient_failures: int = 0
    killed_by_us: bool = False
    last_event: tuple[str, str] = ("", "")

    @property
    def name(self) -> str:
        """The container's name."""
        return self.spec["name"]

    def wait(self, reason: str, message: str = "") -> None:
        """Put the container in the waiting state."""
        self.state, self.waiting_reason, self.waiting_message = "waiting", reason, message

    def status(self) -> dict[str, Any]:
        """The container's entry of ``containerStatuses``."""
        if self.state == "running":
            state = {"running": {"startedAt": now_rfc3339(at=self.started_at)}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated}
        else:
            state = {"waiting": {"reason": self.waiting_reason}}
            if self.waiting_message:
                state["waiting"]["message"] = self.waiting_message
        out = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "",
               "ready": self.state == "running" and not self.init, "started": self.state == "running",
               "restartCount": self.restart_count, "state": state,
               "lastState": {"terminated": self.last_terminated} if self.last_terminated else {}}
        container_id = f"local://{self.proc.pid}" if self.proc is not None else (self.terminated or {}).get("containerID")
        if container_id:
            out["containerID"] = container_id
        return out



def _succeeded(c: Container) -> bool:
    return c.state == "terminated" and c.terminated["exitCode"] == 0


def pod_phase(inits: Sequence[Container], containers: Sequence[Container], *, init_done: bool,
              restart_policy: str, terminating: bool, failed: bool) -> str:
    """The pod phase (kubelet ``getPhase``); ``failed`` forces Failed (e.g. DeadlineExceeded)."""
    if failed:
        return "Failed"
    if not init_done:
        init_failed = any(c.state == "terminated" and c.terminated["exitCode"] != 0 for c in inits)
        return "Failed" if init_failed and restart_policy == "Never" else "Pending"
    waiting = running = stopped = succeeded = 0
    for c in containers:
        if c.state == "running":
            running += 1
        elif c.state == "terminated":
            stopped += 1
            succeeded += _succeeded(c)
        elif c.last_terminated:
            stopped += 1
        else:
            waiting += 1
    if waiting and not terminating:
        return "Pending"
    if running:
        return "Running"
    if terminating or restart_policy == "Never":
        return "Succeeded" if stopped == succeeded else "Failed"
    if restart_policy == "OnFailure" and stopped == succeeded:
        return "Succeeded"
    return "Running"


def pod_conditions(inits: Sequence[Container], containers: Sequence[Container], phase: str, *,
                   init_done: bool, volumes_ready: bool) -> list[dict[str, Any]]:
    """Our four pod conditions (without timestamps: :func:`merge_conditions` adds them)."""
    terminal = phase in ("Succeeded", "Failed")
    pending_init = [c.name for c in inits if not _succeeded(c)]
    unready = [c.name for c in containers if c.state != "running"]

    def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
        if not ok and reason:
            out["reason"] = reason
        if not ok and message:
            out["message"] = message
        return out

    ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
    ready_message = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
    ready = not unready and not terminal
    return [
        cond("PodReadyToStartContainers", volumes_ready and not terminal),
        cond("Initialized", init_done or (terminal and not pending_init), "ContainersNotInitialized",
             f"containers with incomplete status: [{' '.join(pending_init)}]"),
        cond("ContainersReady", ready, ready_reason, ready_message),
        cond("Ready", ready, ready_reason, ready_message),
    ]


def merge_conditions(pod: Mapping[str, Any], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pod's conditions with ours replaced; lastTransitionTime kept while a status holds."""
    current = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    now = now_rfc3339()
    merged = [c for c in current.values() if c["type"] not in OUR_CONDITIONS]
    for cond in ours:
        old = current.get(cond["type"])
        cond = dict(cond, lastProbeTime=None)
        cond["lastTransitionTime"] = old["lastTransitionTime"] if old and old.get("status") == cond["status"] \
            and old.get("lastTransitionTime") else now
        merged.append(cond)
    return merged
