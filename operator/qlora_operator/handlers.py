"""kopf handlers: thin glue between kopf's watches and :mod:`qlora_operator.reconcile`.

- ``on.create`` / ``on.resume`` / ``on.update(field="spec")`` of QLoRAJobs reconcile at
  once (children ensured). An invalid spec raises :class:`kopf.PermanentError` after
  the Failed/InvalidSpec condition and a Warning Event are written; transient API
  trouble raises :class:`kopf.TemporaryError` (kopf retries; nothing sleeps).
- ``on.event`` of QLoRAJobs, and of batch/v1 Jobs and Pods labelled ``qlora.dev/job``
  (server-side label selectors), trigger a coalesced reconcile of the owning QLoRAJob.
- A resync task re-checks unfinished jobs periodically for the time-based conditions.

No handler requires a finalizer (no ``on.delete``, no timers or daemons): deleting a
QLoRAJob or its namespace is never held up by this operator, and its children go
with it through owner references. kopf keeps its bookkeeping in ``qlora.dev/*``
annotations, posts no Events of its own (the reconciler posts them), and takes its
credentials from :class:`qlora_operator.kube.Kube`, the same as the reconciler.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from qlora_operator import render
from qlora_operator.api import GROUP, PLURAL, VERSION
from qlora_operator.kube import ApiError, Kube, NotFound
from qlora_operator.metrics import Metrics
from qlora_operator.reconcile import Outcome, Reconciler
from qlora_operator.settings import OperatorSettings

log = logging.getLogger("qlora_operator.handlers")


@dataclass
class Runtime:
    """What the handlers share (kopf's ``memo.runtime``)."""

    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    reconciler: Reconciler | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def _runtime(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if runtime is None:  # embedded use without the CLI: defaults from the environment
        settings = OperatorSettings.load()
        runtime = Runtime(settings=settings, kube=Kube(), metrics=Metrics.for_settings(settings))
        memo.runtime = runtime
    return runtime


def _reconciler(memo: Any) -> Reconciler:
    runtime = _runtime(memo)
    if runtime.reconciler is None:
        metrics = runtime.metrics

        def observe(
            key: tuple[str, str], trigger: str, seconds: float, outcome: Outcome | None, error: BaseException | None
        ) -> None:
            metrics.observe(trigger, seconds, outcome, error)
            metrics.observe_job(key[0], key[1], outcome)  # training metrics from the status just read
            if runtime.reconciler is not None:
                metrics.set_phases(runtime.reconciler.phases)

        runtime.reconciler = Reconciler(runtime.kube, runtime.settings, observe=observe)
    return runtime.reconciler


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf uses the reconciler's credentials (kubeconfig, in-cluster, or a token directory)."""
    return kopf.ConnectionInfo(**_runtime(memo).kube.connection_info())


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Configure kopf (no finalizers, annotations under qlora.dev, no kopf Events) and start the resync."""
    runtime = _runtime(memo)
    settings.persistence.finalizer = "qlora.dev/never-added"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="qlora.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="qlora.dev", key="last-handled-configuration"
    )
    settings.posting.enabled = False
    settings.scanning.disabled = True  # least privilege: no list/watch of CRDs and namespaces
    settings.watching.label_selectors["batch/v1", "jobs"] = render.LABEL_JOB
    settings.watching.label_selectors["v1", "pods"] = render.LABEL_JOB
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    try:
        await asyncio.to_thread(runtime.kube.request, "GET", f"/apis/{GROUP}/{VERSION}")
    except NotFound:
        raise kopf.PermanentError(
            f"the {GROUP}/{VERSION} API is not served: install the QLoRAJob CRD (crds/) first"
        ) from None
    except ApiError as err:
        raise kopf.TemporaryError(f"cannot reach the API server: {err}", delay=5) from err
    reconciler = _reconciler(memo)
    runtime.tasks.append(asyncio.create_task(reconciler.resync_forever(), name="qlora-resync"))
    runtime.metrics.serve(runtime.settings.metrics_port)
    logger.info(
        "qlora-operator started: %s, trainer image %s",
        "all namespaces" if runtime.settings.clusterwide else ", ".join(runtime.settings.namespaces),
        runtime.settings.trainer_image,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the resync task and the metrics server."""
    runtime = _runtime(memo)
    if runtime.reconciler is not None:
        runtime.reconciler.stop()
    for task in runtime.tasks:
        task.cancel()
    runtime.metrics.shutdown()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def ensure_run(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Create (or adopt) the current run's children and translate its status."""
    outcome = await _reconciler(memo).reconcile_now(namespace, name, ensure=True)
    if outcome.invalid:
        raise kopf.PermanentError(outcome.invalid)
    if outcome.retry:
        raise kopf.TemporaryError(outcome.retry, delay=outcome.delay)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def qlorajob_event(event: kopf.RawEvent, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Any change of a QLoRAJob (progress reports included): re-check it."""
    if event.get("type") == "DELETED":
        _reconciler(memo).forget(namespace, name)
        _runtime(memo).metrics.forget_job(namespace, name)
        return
    _reconciler(memo).trigger(namespace, name)


def _owner(body: kopf.Body) -> str | None:
    ann = body.get("metadata", {}).get("annotations") or {}
    if ann.get(render.ANN_JOB):
        return ann[render.ANN_JOB]
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "QLoRAJob":
            return ref.get("name")
    return None


@kopf.on.event("batch/v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT})
async def job_event(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A trainer Job changed: re-check its QLoRAJob."""
    owner = _owner(body)
    if owner:
        _reconciler(memo).trigger(namespace, owner, delay=0.2)


@kopf.on.event("v1", "pods", labels={render.LABEL_JOB: kopf.PRESENT})
async def pod_event(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A trainer pod changed: re-check its QLoRAJob."""
    owner = _owner(body)
    if owner:
        _reconciler(memo).trigger(namespace, owner, delay=0.2)
