"""One pod on the local node agent: its volumes, processes and reported status.

A :class:`PodWorker` thread owns one pod incarnation (uid). It sets up the volumes,
runs init containers one after the other and then every container as a local process
(each in its own process group), restarts containers as ``restartPolicy`` says
(back-off 1 s doubling to 30 s), reports the pod's status as a kubelet would, and on
deletion sends SIGTERM, then SIGKILL after the grace period, and finally deletes the
pod with grace period 0. See :mod:`localcluster.node_agent` for the whole contract.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException
from qlora_trainer import contract

from localcluster import podfiles
from localcluster.kubeapi import error_message, now_rfc3339
from localcluster.nodecontext import ApiLookup, NodeContext
from localcluster.podenv import (
    ConfigError,
    PathMapper,
    TransientError,
    container_env,
    expand,
    resolve_cluster_names,
)
from localcluster.podstatus import POD_IP, Container, merge_conditions, pod_conditions, pod_phase
from localcluster.volumes import MountError, TokenFile, refresh_token, setup_volumes

log = logging.getLogger("localcluster.node_agent")

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048


@dataclass
class PodWorker:
    """Runs and reports one pod; ``update``/``mark_deleted`` feed it watch events."""

    ctx: NodeContext
    pod: dict[str, Any]
    finished: bool = False
    deleted: bool = False
    wake: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = podfiles.pod_dir(self.ctx.pods_dir, self.ns, self.name, self.uid)
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.inits = [Container(c, True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c, False) for c in spec["containers"]]
        for c in self.containers:
            c.wait("PodInitializing" if self.inits else "ContainerCreating")
        self.start_time = time.time()
        self.volumes: dict[str, Path] | None = None
        self.tokens: list[TokenFile] = []
        self.volume_retry_at = 0.0
        self.volume_failures = 0
        self.init_done = not self.inits
        self.pod_reason = ""
        self.pod_message = ""
        self.terminating = False
        self._term_started = 0.0
        self.delete_sent = False
        self._last_report = ""
        self._last_mount_event = ""
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.ns}/{self.name}", daemon=True)

    # ------------------------------------------------------------------ feeding
    def start(self) -> None:
        """Start the worker thread."""
        self.thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod arrived from the watch."""
        with self.lock:
            if int(pod["metadata"]["resourceVersion"]) >= int(self.pod["metadata"]["resourceVersion"]):
                self.pod = pod
        if self.finished and pod["metadata"].get("deletionTimestamp") and not self.delete_sent:
            self.delete_sent = True
            self.ctx.executor.submit(self._finalize)
        self.wake.set()

    def mark_deleted(self) -> None:
        """The pod is gone from the API (force deletion or after our final delete)."""
        self.deleted = True
        self.wake.set()
        if self.finished:
            self.ctx.executor.submit(self._cleanup)

    # ------------------------------------------------------------------ main loop
    def _run(self) -> None:
        try:
            if not self._adopt():
                self._loop()
        except Exception:  # noqa: BLE001 - a broken pod must not take the agent down
            log.exception("pod %s/%s: worker failed", self.ns, self.name)
            self._kill_all(0)
        finally:
            self.finished = True
            pod = self.pod
            if self.deleted:
                self._cleanup()
            elif pod["metadata"].get("deletionTimestamp") and not self.delete_sent and not self.ctx.stopping.is_set():
                self.delete_sent = True
                self._finalize()

    def _adopt(self) -> bool:
        """Handle a pod this agent did not start (an earlier agent did). True when nothing is left to run."""
        status = self.pod.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            return True
        seen = (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
        if not any("running" in s.get("state", {}) or "terminated" in s.get("state", {}) or s.get("lastState")
                   for s in seen):
            return False
        for c in self.inits + self.containers:
            c.state = "terminated"
            c.terminated = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                            "message": "the local node agent restarted and lost this container",
                            "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()}
        self.init_done = True
        self.pod_reason = "NodeAgentRestarted"
        self._report()
        return True

    def _loop(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        while True:
            if self.ctx.stopping.is_set():
                self._kill_all(2.0)
                return
            if self.deleted:
                self._kill_all(0.0)
                return
            pod = self.pod
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate()
                return
            now = time.time()
            if self.volumes is None:
                self._setup_volumes(now)
            else:
                self._check_deadline(now)
                self._step_all(now)
                self._refresh_tokens(now)
            phase = self._report()
            if phase in ("Succeeded", "Failed"):
                return
            self.wake.wait(self._poll_interval(now))
            self.wake.clear()

    def _poll_interval(self, now: float) -> float:
        if any(c.state == "running" for c in self.inits + self.containers):
            return 0.2
        pending = [c.next_attempt for c in self.inits + self.containers if c.state == "waiting"]
        pending.append(self.volume_retry_at)
        return max(0.05, min(1.0, min(pending) - now))

    # ------------------------------------------------------------------ volumes
    def _setup_volumes(self, now: float) -> None:
        if now < self.volume_retry_at:
            return
        lookup = ApiLookup(self.ctx.api)
        try:
            self.volumes, self.tokens = setup_volumes(self._pod_view(), self.dir / "volumes", lookup,
                                                      self.ctx.allocatable)
            self.volume_failures = 0
            return
        except MountError as exc:
            message = str(exc)
        except TransientError as exc:
            self.volume_failures += 1
            self.volume_retry_at = now + 0.5
            if self.volume_failures < 20:
                return
            message = f"MountVolume.SetUp failed: {exc}"
        self.volume_retry_at = now + 2.0
        if message != self._last_mount_event:
            self._last_mount_event = message
            self.ctx.event(self.pod, "Warning", "FailedMount", message)

    def _refresh_tokens(self, now: float) -> None:
        for token in self.tokens:
            if token.due(now):
                try:
                    refresh_token(self._pod_view(), token, ApiLookup(self.ctx.api))
                except (TransientError, MountError) as exc:
                    log.warning("pod %s/%s: token refresh failed: %s", self.ns, self.name, exc)

    def _pod_view(self) -> dict[str, Any]:
        """The pod as the downward API sees it (pod and host IP filled in)."""
        pod = copy.deepcopy(self.pod)
        status = pod.setdefault("status", {})
        status["podIP"] = status["hostIP"] = POD_IP
        status["podIPs"] = status["hostIPs"] = [{"ip": POD_IP}]
        return pod

    # ------------------------------------------------------------------ containers
    def _check_deadline(self, now: float) -> None:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None and not self.pod_reason and now - self.start_time > deadline:
            self.pod_reason = "DeadlineExceeded"
            self.pod_message = "Pod was active on the node longer than the specified deadline"
            self.ctx.event(self.pod, "Normal", "DeadlineExceeded", self.pod_message)
            self.terminating = True
            self._term_started = now
            self._kill_all(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def _step_all(self, now: float) -> None:
        while not self.init_done:
            current = next((c for c in self.inits if not (c.state == "terminated"
                                                          and c.terminated["exitCode"] == 0)), None)
            if current is None:
                self.init_done = True
                for c in self.containers:
                    c.wait("ContainerCreating")
                break
            self._step(current, now)
            if current.state != "terminated" or current.terminated["exitCode"] != 0:
                return
        for c in self.containers:
            self._step(c, now)

    def _emit(self, c: Container, kind: str, reason: str, message: str) -> None:
        if c.last_event != (reason, message):
            c.last_event = (reason, message)
            self.ctx.event(self.pod, kind, reason, message, f"spec.{'initContainers' if c.init else 'containers'}{{{c.name}}}")

    def _step(self, c: Container, now: float) -> None:
        if self.terminating or self.pod_reason:
            return
        if c.state == "running":
            code = c.proc.poll()
            if code is not None:
                self._finish(c, code, now)
            return
        if c.state == "terminated":
            return
        image = c.spec.get("image", "")
        if now < c.next_attempt:
            if c.waiting_reason == "ErrImagePull" and now - c.pull_failed_at >= 1.0:
                c.wait("ImagePullBackOff", f'Back-off pulling image "{image}"')
                self._emit(c, "Normal", "BackOff", f'Back-off pulling image "{image}"')
            return
        if self.ctx.unpullable(image):
            c.pull_failures += 1
            c.pull_failed_at = now
            c.next_attempt = now + min(2 ** c.pull_failures, 30)
            message = (f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
                       f"not found (the local node agent treats this image as unpullable)")
            c.wait("ErrImagePull", message)
            self._emit(c, "Warning", "Failed", f"Failed to pull image \"{image}\": {message}")
            return
        try:
            env, mapper = self._environment(c)
        except ConfigError as exc:
            c.wait("CreateContainerConfigError", str(exc))
            c.next_attempt = now + 2.0
            self._emit(c, "Warning", "Failed", f"Error: {exc}")
            return
        except TransientError as exc:
            c.transient_failures += 1
            c.next_attempt = now + 0.5
            if c.transient_failures >= 20:
                c.wait("CreateContainerConfigError", str(exc))
            return
        c.transient_failures = 0
        self._launch(c, env, mapper, now)

    def _mounts(self, c: Container) -> dict[str, str]:
        assert self.volumes is not None
        mapping: dict[str, str] = {}
        for mount in c.spec.get("volumeMounts") or []:
            host = self.volumes.get(mount["name"])
            if host is None:
                raise ConfigError(f"volume {mount['name']!r} of mount {mount['mountPath']!r} is not defined")
            sub = mount.get("subPath") or mount.get("subPathExpr") or ""
            target = host / sub if sub else host
            if sub and not target.exists():
                target.mkdir(parents=True, exist_ok=True)
            mapping[mount["mountPath"]] = str(target)
        mapping[c.spec.get("terminationMessagePath") or "/dev/termination-log"] = str(self._term_file(c))
        return mapping

    def _term_file(self, c: Container) -> Path:
        return self.dir / f"{c.name}.termination"

    def _environment(self, c: Container) -> tuple[dict[str, str], PathMapper]:
        lookup = ApiLookup(self.ctx.api)
        spec_env = container_env(self._pod_view(), c.spec, lookup, self.ctx.allocatable)
        # Cluster DNS stand-in: values that are exactly a Service's or a pod's cluster name become
        # the loopback address (downward-API values are the pod's own facts: left alone).
        downward = {e["name"] for e in c.spec.get("env") or []
                    if "fieldRef" in (e.get("valueFrom") or {}) or "resourceFieldRef" in (e.get("valueFrom") or {})}
        named = resolve_cluster_names({k: v for k, v in spec_env.items() if k not in downward}, self.ns, lookup,
                                      POD_IP)
        spec_env.update(named)
        mounts = self._mounts(c)
        mapper = PathMapper.of(mounts)
        env = dict(self.ctx.base_env)
        port = self.ctx.service_port
        hostname = self.pod["spec"].get("hostname") or self.name
        env.update({"HOSTNAME": hostname, "TMPDIR": str(self.dir / "tmp"),
                    "KUBERNETES_SERVICE_HOST": self.ctx.service_host, "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port,
                    "KUBERNETES_PORT": f"tcp://{self.ctx.service_host}:{port}"})
        env.update({k: mapper.rewrite(v) for k, v in spec_env.items()})
        sa_dir = mapper.host_path(SA_MOUNT)
        if sa_dir is not None and any(m["mountPath"].rstrip("/") == SA_MOUNT for m in c.spec.get("volumeMounts") or []):
            env[contract.ENV_SA_TOKEN_DIR] = sa_dir
        env[contract.ENV_TERMINATION_MESSAGE_PATH] = str(self._term_file(c))
        return env, mapper

    def _launch(self, c: Container, env: dict[str, str], mapper: PathMapper, now: float) -> None:
        argv = [mapper.rewrite(expand(a, env)) for a in (c.spec.get("command") or []) + (c.spec.get("args") or [])]
        term_file = self._term_file(c)
        term_file.write_bytes(b"")
        cwd = self._working_dir(c, mapper)
        c.killed_by_us = False
        c.started_at = now
        if not c.spec.get("command"):
            self._start_error(c, "the local node agent cannot run an image's entrypoint: set the container's command",
                              now)
            return
        try:
            with open(self.dir / f"{c.name}.log", "ab") as out:
                c.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            detail = (f'exec: "{argv[0]}": executable file not found in $PATH'
                      if isinstance(exc, FileNotFoundError) else f"exec: {exc}")
            self._start_error(c, f"failed to create containerd task: failed to create shim task: "
                                 f"OCI runtime create failed: unable to start container process: {detail}", now)
            return
        c.state = "running"
        c.terminated = None
        self._emit(c, "Normal", "Started", f"Started container {c.name}")

    def _working_dir(self, c: Container, mapper: PathMapper) -> str:
        work = c.spec.get("workingDir")
        if not work:
            default = self.dir / "work"
            default.mkdir(exist_ok=True)
            return str(default)
        host = mapper.host_path(work)
        if host is None:
            host = str(self.dir / "work" / work.lstrip("/"))  # the container's own filesystem
        Path(host).mkdir(parents=True, exist_ok=True)
        return host

    def _start_error(self, c: Container, message: str, now: float) -> None:
        c.proc = None
        c.state = "terminated"
        c.terminated = {"exitCode": 128, "reason": "StartError", "message": message,
                        "startedAt": now_rfc3339(at=0), "finishedAt": now_rfc3339(at=now),
                        "containerID": f"local://{self.uid[:8]}-{c.name}-{c.restart_count}"}
        self._emit(c, "Warning", "Failed", f"Error: {message}")
        self._maybe_restart(c, 128, now)

    def _finish(self, c: Container, code: int, now: float) -> None:
        assert c.proc is not None
        pid = c.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)  # the container is over: so are the processes it left
        except (ProcessLookupError, PermissionError):
            pass
        exit_code = code if code >= 0 else 128 - code
        if exit_code == 0:
            reason = "Completed"
        elif exit_code == 137 and not c.killed_by_us:
            reason = "OOMKilled"
        else:
            reason = "Error"
        c.terminated = {"exitCode": exit_code, "reason": reason, "startedAt": now_rfc3339(at=c.started_at),
                        "finishedAt": now_rfc3339(at=now), "containerID": f"local://{pid}"}
        message = self._termination_message(c, exit_code)
        if message:
            c.terminated["message"] = message
        c.proc = None
        c.state = "terminated"
        self._maybe_restart(c, exit_code, now)

    def _termination_message(self, c: Container, exit_code: int) -> str:
        try:
            with open(self._term_file(c), "rb") as f:
                message = f.read(TERMINATION_MESSAGE_LIMIT).decode(errors="replace")
        except OSError:
            message = ""
        if not message and exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                text = (self.dir / f"{c.name}.log").read_bytes()[-64 * 1024:].decode(errors="replace")
            except OSError:
                text = ""
            message = "\n".join(text.splitlines()[-FALLBACK_LOG_LINES:])
            message = message.encode()[-FALLBACK_LOG_BYTES:].decode(errors="ignore")
        return message

    def _maybe_restart(self, c: Container, exit_code: int, now: float) -> None:
        if self.terminating:
            return
        if c.init:
            restart = exit_code != 0 and self.restart_policy != "Never"
        else:
            restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)
        if not restart:
            return
        backoff = min(2 ** c.restart_count, 30)
        c.last_terminated = c.terminated
        c.terminated = None
        c.restart_count += 1
        c.next_attempt = now + backoff
        message = f"back-off {backoff}s restarting failed container={c.name} pod={self.name}_{self.ns}({self.uid})"
        c.wait("CrashLoopBackOff", message)
        self._emit(c, "Warning", "BackOff", "Back-off restarting failed container " + c.name)

    # ------------------------------------------------------------------ stopping
    def _signal(self, c: Container, sig: int) -> None:
        if c.proc is not None:
            c.killed_by_us = True
            try:
                os.killpg(c.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill_all(self, grace_s: float) -> None:
        """SIGTERM every running container, SIGKILL after ``grace_s``; record their ends."""
        running = [c for c in self.inits + self.containers if c.state == "running"]
        for c in running:
            self._signal(c, signal.SIGTERM)
        deadline = time.time() + grace_s
        while any(c.proc is not None and c.proc.poll() is None for c in running):
            if time.time() >= deadline or self.deleted:
                for c in running:
                    self._signal(c, signal.SIGKILL)
                deadline = float("inf")
            grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
            if self.terminating and grace is not None and deadline != float("inf"):
                deadline = min(deadline, self._term_started + float(grace))
            self.wake.wait(0.05)
            self.wake.clear()
        for c in running:
            if c.proc is not None:
                self._finish(c, c.proc.wait(), time.time())

    def _terminate(self) -> None:
        """The pod was deleted gracefully: stop its containers, report, delete it for good."""
        self.terminating = True
        self._term_started = time.time()
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        for c in self.inits + self.containers:
            if c.state == "running":
                self._emit(c, "Normal", "Killing", f"Stopping container {c.name}")
        self._kill_all(float(grace))
        for c in self.inits + self.containers:
            if c.state == "waiting" and c.last_terminated:
                c.state, c.terminated, c.last_terminated = "terminated", c.last_terminated, None
            elif c.state == "waiting" and (not c.init or not self.init_done):
                c.state = "terminated"
                c.terminated = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                "message": "The container could not be located when the pod was terminated",
                                "startedAt": now_rfc3339(at=0), "finishedAt": now_rfc3339()}
        self.init_done = True
        if not self.deleted and not self.ctx.stopping.is_set():
            self._report(final=True)
            self.delete_sent = True
            self._delete_now()

    def _delete_now(self) -> None:
        try:
            self.ctx.api.delete(f"/api/v1/namespaces/{self.ns}/pods/{self.name}",
                                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", self.ns, self.name, error_message(exc))
                self.delete_sent = False
        except Exception as exc:  # noqa: BLE001
            log.warning("pod %s/%s: final delete failed: %s", self.ns, self.name, exc)
            self.delete_sent = False

    def _finalize(self) -> None:
        """A finished pod got a deletion timestamp: remove its volumes and delete it with grace 0."""
        self._cleanup()
        self._delete_now()

    def _cleanup(self) -> None:
        for sub in ("volumes", "tmp", "work"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    def shutdown(self) -> None:
        """The agent stops: kill this pod's processes (no API writes)."""
        self.wake.set()

    # ------------------------------------------------------------------ status
    def _status(self) -> dict[str, Any]:
        phase = pod_phase(self.inits, self.containers, init_done=self.init_done, restart_policy=self.restart_policy,
                          terminating=self.terminating, failed=bool(self.pod_reason))
        conditions = pod_conditions(self.inits, self.containers, phase, init_done=self.init_done,
                                    volumes_ready=self.volumes is not None)
        status: dict[str, Any] = {
            "phase": phase, "conditions": conditions,
            "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}], "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
            "startTime": now_rfc3339(at=self.start_time),
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        if self.pod_reason:
            status["reason"] = self.pod_reason
            status["message"] = self.pod_message
        return status

    def _report(self, final: bool = False) -> str:
        """Send the status when it changed; returns the phase. Retries on conflicts."""
        status = self._status()
        encoded = json.dumps(status, sort_keys=True)
        if encoded == self._last_report:
            return status["phase"]
        for _ in range(10):
            with self.lock:
                pod = self.pod
            body = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
                    "status": dict(status, conditions=merge_conditions(pod, status["conditions"]))}
            try:
                answer = self.ctx.api.patch(f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status", body)
            except ApiException as exc:
                if exc.status == 409:
                    self._refetch()
                    continue
                if exc.status == 404:
                    self.deleted = True
                    return status["phase"]
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.name, error_message(exc))
                if 400 <= exc.status < 500:  # refused (validation): retrying the same status cannot help
                    self._last_report = encoded
                    return status["phase"]
                return status["phase"] if final else "Unknown"
            except Exception as exc:  # noqa: BLE001
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.name, exc)
                return "Unknown"
            self._last_report = encoded
            self.update(answer)
            return status["phase"]
        return "Unknown"

    def _refetch(self) -> None:
        try:
            pod = self.ctx.api.get(f"/api/v1/namespaces/{self.ns}/pods/{self.name}")
        except ApiException as exc:
            if exc.status == 404:
                self.deleted = True
            return
        if pod["metadata"]["uid"] == self.uid:
            with self.lock:
                self.pod = pod
