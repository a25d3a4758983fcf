"""Leader election between operator replicas: one ``coordination.k8s.io/v1`` Lease.

Why a Lease and not kopf's peering: with kopf peering every replica watches and only the
one of *highest* priority acts; replicas of one Deployment share a priority, and two
operators of equal priority all freeze ("the cluster becomes not served", kopf's
docs/peering.rst), so a Deployment with ``replicas: 2`` would need distinct priorities
per pod, which a ReplicaSet cannot give. Peering also needs the KopfPeering CRDs and its
takeover waits for the peer's lifetime to lapse. A Lease is what kube-controller-manager,
kube-scheduler, Kueue and controller-runtime operators use: any number of identical
replicas, the first to take the Lease leads, the others wait; takeover is bounded by the
Lease duration (a crashed leader) or immediate (a leader that stops cleanly releases it).

The election is ``kubernetes.leaderelection`` (the official client's port of client-go's
leaderelection) with its ``LeaseLock``, on the operator's own API client. A standby does
not start kopf at all: it watches nothing and writes nothing until it leads. A leader
that fails to renew within ``renew_deadline_seconds`` exits at once (as client-go's
``OnStoppedLeading`` conventionally does), so two replicas never act together for
longer than the clock skew allows; Kubernetes restarts it as a standby.

Exactly one Job per run holds regardless: the Job's name is deterministic per run
(``render.job_name``), so a second create answers 409 and is adopted, not duplicated.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlparse

log = logging.getLogger("qlora_operator.leader")


def default_identity() -> str:
    """``<pod or host name>_<8 hex>``: unique per process, readable in ``kubectl get lease``."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass
class LeaderElector:
    """Takes, keeps and releases the Lease ``namespace/name`` for ``identity``.

    Times are seconds: a standby takes over a crashed leader's Lease ``lease_seconds``
    after it last saw the Lease change; the leader gives up (``on_lost``) when it could not
    renew for ``renew_deadline_seconds``; every try is ``retry_seconds`` apart. Constraints
    (from client-go): ``lease_seconds > renew_deadline_seconds > 1.2 * retry_seconds``,
    each at least 1.
    """

    api_client: Any
    name: str
    namespace: str
    identity: str = field(default_factory=default_identity)
    lease_seconds: int = 15
    renew_deadline_seconds: int = 10
    retry_seconds: int = 2

    def __post_init__(self) -> None:
        from kubernetes import client
        from kubernetes.leaderelection import electionconfig, leaderelection
        from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

        if not (self.lease_seconds > self.renew_deadline_seconds > 1.2 * self.retry_seconds and self.retry_seconds >= 1):
            raise ValueError(
                "leader election: need lease_seconds > renew_deadline_seconds > 1.2 * retry_seconds >= 1.2 "
                f"(got {self.lease_seconds}, {self.renew_deadline_seconds}, {self.retry_seconds})"
            )
        self._coordination = client.CoordinationV1Api(self.api_client)
        lock = LeaseLock(self.name, self.namespace, self.identity)
        lock.api_instance = self._coordination  # the operator's credentials, not the global default client
        config = electionconfig.Config(
            lock, self.lease_seconds, self.renew_deadline_seconds, self.retry_seconds,
            onstarted_leading=lambda: None, onstopped_leading=lambda: None,
        )
        self._election = leaderelection.LeaderElection(config)
        self._stop = threading.Event()
        logging.getLogger("leaderelection").setLevel(logging.WARNING)  # it logs every retry at INFO

    def acquire(self) -> float:
        """Block until this process holds the Lease; returns the seconds it waited."""
        started = time.monotonic()
        log.info("waiting for leader lease %s/%s as %s", self.namespace, self.name, self.identity)
        self._election.acquire()
        waited = time.monotonic() - started
        log.info("acquired leader lease %s/%s as %s after %.1fs", self.namespace, self.name, self.identity, waited)
        return waited

    def keep_renewing(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew the Lease in a daemon thread; ``on_lost()`` runs there if a renewal deadline
        passes (not after :meth:`release`)."""

        def loop() -> None:
            self._election.renew_loop(self._stop)
            if not self._stop.is_set():
                log.error("lost leader lease %s/%s: could not renew within %ss",
                          self.namespace, self.name, self.renew_deadline_seconds)
                on_lost()

        thread = threading.Thread(target=loop, name="leader-lease", daemon=True)
        thread.start()
        return thread

    def release(self) -> bool:
        """Stop renewing and hand the Lease back (empty holder), so a standby takes over at
        its next try instead of after ``lease_seconds``. True when it was ours and is released.

        Errors are logged, never raised: a Lease left held simply expires.
        """
        from kubernetes.client.exceptions import ApiException

        self._stop.set()
        try:
            lease = self._coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return False
            lease.spec.holder_identity = None
            lease.spec.acquire_time = None
            lease.spec.renew_time = None
            self._coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as err:
            log.warning("could not release leader lease %s/%s: %s", self.namespace, self.name, err.reason)
            return False
        log.info("released leader lease %s/%s", self.namespace, self.name)
        return True


class StandbyHealth:
    """Answers ``GET <path>`` with 200 on the liveness endpoint while a standby waits, so the
    kubelet neither restarts it nor holds a rolling update for it; :meth:`close` frees the
    port before kopf binds it. ``endpoint``: ``http://HOST:PORT/PATH`` (kopf's form)."""

    def __init__(self, endpoint: str) -> None:
        url = urlparse(endpoint)
        path = url.path or "/"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                ok = self.path.split("?")[0] == path
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"standby": true}' if ok else b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), Handler)
        threading.Thread(target=self._server.serve_forever, name="standby-health", daemon=True).start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()


__all__ = ["LeaderElector", "StandbyHealth", "default_identity"]
