"""One reconcile of one QLoRAJob, and the scheduler that runs them.

:func:`reconcile` is level-based: it reads the QLoRAJob, its Jobs, the current run's
Pods (and the Job's Events when no pod exists), asks the pure modules what should
be (:mod:`plan`, :mod:`render`, :mod:`status`), and makes it so through :mod:`kube`.
Running it twice, or after a crash at any point, converges to the same state:
children have deterministic names and are created with create-or-adopt.

:class:`Reconciler` runs reconciles on the event loop without blocking it (a thread
per call, at most ``max_concurrent_reconciles`` at once), one at a time per
QLoRAJob, coalescing bursts of triggers (watch events of the QLoRAJob, its Jobs and
Pods), and re-checks unfinished jobs every ``resync_seconds`` (stall, image-pull,
unschedulable and quota timeouts have no watch event of their own). kopf's timers
would add a finalizer to every QLoRAJob, which this operator never does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qlora_operator import fitcheck
from qlora_operator import kube as k
from qlora_operator import plan as planning
from qlora_operator import render
from qlora_operator.api import QLoRAJobSpec, parse_spec
from qlora_operator.settings import OperatorSettings
from qlora_operator.objects import job_result, utcnow
from qlora_operator.status import EventSpec, Observed, compute_status
from qlora_trainer import contract

log = logging.getLogger("qlora_operator.reconcile")

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
RETRY_DELAY = 5.0


@dataclass
class Outcome:
    """What a reconcile found (for handlers, metrics and the scheduler)."""

    phase: str | None = None
    terminal: bool = False
    invalid: str | None = None  # InvalidSpec message: the handler raises kopf.PermanentError
    retry: str | None = None  # transient trouble: retry after ``delay``
    delay: float = RETRY_DELAY
    gone: bool = False
    action: str = ""
    progress: Mapping[str, Any] | None = None  # status.progress as last read (the trainer's report)
    completion_time: str | None = None  # status.completionTime of the current run


def _emit(api: k.Kube, body: Mapping[str, Any], events: list[EventSpec]) -> None:
    for ev in events:
        try:
            api.create_event(body, ev.type, ev.reason, ev.message)
        except k.NamespaceTerminating:
            return  # nothing can be posted there any more, and nobody will read it
        except k.ApiError as err:  # an Event is best effort: never fail the reconcile for it
            log.warning("could not post event %s on %s: %s", ev.reason, body["metadata"]["name"], err)
        log.info(
            "event %s %s: %s", ev.type, ev.reason, ev.message,
            extra={"object": f"{body['metadata']['namespace']}/{body['metadata']['name']}"},
        )


def _patch_status(api: k.Kube, body: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    if not patch:
        return body
    meta = body["metadata"]
    updated = api.patch_qlorajob_status(meta["namespace"], meta["name"], patch)
    return updated or body


def _ensure(
    api: k.Kube, body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int, *, with_job: bool,
    group: render.GroupAttempt | None = None, why: str = "",
) -> dict[str, Any] | None:
    """Create-or-adopt the children of ``run``; returns the Job (when ``with_job``).

    ``group``: the run's place in a chain of group restarts (recorded on its Job); ``why``:
    appended to the JobCreated event.
    """
    uid = body["metadata"]["uid"]
    job = None
    for manifest in render.render_children(body, spec, settings, run, group):
        if manifest["kind"] == "Job" and not with_job:
            continue
        obj, what = api.create_or_adopt(manifest, uid)
        if what != "exists":
            log.info(
                "%s %s %s", what, manifest["kind"], manifest["metadata"]["name"],
                extra={"object": f"{body['metadata']['namespace']}/{body['metadata']['name']}"},
            )
        if manifest["kind"] == "Job":
            job = obj
            if what == "created":
                text = f"created Job {manifest['metadata']['name']} for run {run}" + (f": {why}" if why else "")
                _emit(api, body, [EventSpec("Normal", "JobCreated", text)])
    return job


def _fit_check(
    api: k.Kube, body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int
) -> fitcheck.FitCheck | None:
    """Create-or-adopt run ``run``'s CPU-only fit-check Job and read it; None when
    ``spec.resources.gpuMemoryGiB`` is unset (no check asked for).

    The run's other children (the ConfigMap holding the trainer config, the ServiceAccount)
    are ensured first: the fit-check pod mounts them. It reads only the model's
    ``config.json`` with the job's own credentials (the operator reads no Secret).
    """
    if spec.resources.gpu_memory_gib is None:
        return None
    meta = body["metadata"]
    _ensure(api, body, spec, settings, run, with_job=False)
    manifest = render.render_fitcheck_job(body, spec, settings, run)
    job, what = api.create_or_adopt(manifest, meta["uid"])
    if what == "created":
        res = spec.resources
        text = (
            f"created Job {manifest['metadata']['name']} for run {run}: reading only the model's config.json to check "
            f"that training fits {res.nodes * res.gpus} GPU(s) of {res.gpu_memory_gib:g} GiB before requesting any"
        )
        _emit(api, body, [EventSpec("Normal", "FitCheckStarted", text)])
    return fitcheck.read(job, api.list_fitcheck_pods(meta["namespace"], meta["name"], run))


def _fit_check_why(fit: fitcheck.FitCheck | None) -> str:
    """The JobCreated event's tail for a run whose fit check passed."""
    if fit is None:
        return ""
    took = f" in {fit.seconds:.1f}s" if fit.seconds is not None else ""
    return f"fit check {fit.job_name} passed{took}: {fit.message}"


def _retire_service(api: k.Kube, namespace: str, name: str, jobs: list[dict[str, Any]], run: int) -> None:
    """Delete the headless Service of run ``run - 1`` (nodes > 1) when run ``run`` starts.

    Only a running group needs its Service; one left behind (an operator crash) goes with
    the QLoRAJob (owner reference).
    """
    for old in jobs:
        old_run = render.run_of(old)
        if old_run == run - 1 and render.job_nodes(old) > 1:
            if api.delete("v1", "Service", namespace, render.service_name(name, old_run)):
                log.info("deleted Service %s of run %s", render.service_name(name, old_run), old_run,
                         extra={"object": f"{namespace}/{name}"})


def _sync_job(api: k.Kube, job: Mapping[str, Any], spec: QLoRAJobSpec | None) -> Mapping[str, Any]:
    """Push the fields that may change during a run onto the Job: suspend, activeDeadlineSeconds."""
    if spec is None or job_result(job)[0] is not None:
        return job
    meta = job["metadata"]
    jspec = job.get("spec") or {}
    ann = meta.get("annotations") or {}
    user_flag = ann.get(render.ANN_USER_SUSPENDED) == "true"
    queued = bool(spec.scheduling.queue_name)
    patch: dict[str, Any] = {}
    want = spec.run_policy.suspend
    if want and not jspec.get("suspend"):
        patch = {"spec": {"suspend": True}, "metadata": {"annotations": {render.ANN_USER_SUSPENDED: "true"}}}
    elif want and not user_flag:
        patch = {"metadata": {"annotations": {render.ANN_USER_SUSPENDED: "true"}}}
    elif not want and user_flag:
        # Resume. A Kueue-managed Job goes back to Kueue, which suspends it again until admitted.
        patch = {"spec": {"suspend": False}, "metadata": {"annotations": {render.ANN_USER_SUSPENDED: None}}}
    elif not want and jspec.get("suspend") and not queued and "qlora.dev/stopped" not in ann:
        patch = {"spec": {"suspend": False}}
    deadline = spec.run_policy.active_deadline_seconds
    if deadline is not None and jspec.get("activeDeadlineSeconds") != deadline:
        patch.setdefault("spec", {})["activeDeadlineSeconds"] = deadline
    if not patch:
        return job
    try:
        return api.patch_job(meta["namespace"], meta["name"], patch)
    except k.Invalid as err:
        log.warning("cannot update Job %s: %s", meta["name"], err)
        return job


def reconcile(
    api: k.Kube, settings: OperatorSettings, namespace: str, name: str, *, ensure: bool = False,
    now: Callable[[], datetime] = utcnow,
) -> Outcome:
    """Bring one QLoRAJob's children and status in line with what the cluster shows.

    ``ensure``: also re-create missing non-Job children of an active run (spec handlers).

    Raises:
        kube.ApiError: transient API trouble (the caller retries).
    """
    body = api.get_qlorajob(namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return Outcome(gone=True)
    uid = body["metadata"]["uid"]
    spec, invalid = planning.validate(body.get("spec"), settings, name)
    jobs = [j for j in api.list_jobs(namespace, name) if planning.owned(j, uid)]
    run, job = planning.current_run(body.get("status"), jobs)
    recorded = render.recorded_spec(job)
    if recorded is None and run > 0 and job is None:
        recorded = render.recorded_spec(api.get_config_map(namespace, render.config_map_name(name, run)))
    the_plan = planning.decide(body, spec, invalid, jobs, recorded)
    log.debug("plan %s run %s", the_plan.action, the_plan.run, extra={"object": f"{namespace}/{name}"})

    def observed(run_no: int, job_obj: Mapping[str, Any] | None, pods: list, events: list, **kw: Any) -> Observed:
        use = spec
        if recorded is not None and the_plan.action == "observe":
            try:
                use = parse_spec(dict(recorded))
            except Exception:  # noqa: BLE001 - a recorded spec from an older schema
                use = spec
        return Observed(
            run=run_no or None,
            job_name=render.job_name(name, run_no) if run_no else None,
            job=job_obj,
            pods=pods,
            job_events=events,
            suspend_requested=bool(spec and spec.run_policy.suspend),
            queued=bool(use and use.scheduling.queue_name),
            local_queue=use.scheduling.queue_name if use else "",
            backoff_limit=use.run_policy.backoff_limit if use else 3,
            active_deadline_seconds=use.run_policy.active_deadline_seconds if use else None,
            image=render.trainer_image(use, settings) if use else "",
            secret_name=(use.storage.credentials_secret_ref.name if use and use.storage.credentials_secret_ref else None),
            **kw,
        )

    if the_plan.action == "invalid":
        result = compute_status(body, observed(the_plan.run, the_plan.job, [], [], invalid_spec=the_plan.invalid), now(), settings)
        body = _patch_status(api, body, result.patch)
        _emit(api, body, result.events)
        return Outcome(phase=result.phase, terminal=True, invalid=the_plan.invalid, action="invalid", **_seen(body))

    if spec is None and the_plan.action != "observe":  # plan.decide never asks for that; be explicit anyway
        raise RuntimeError(f"plan {the_plan.action} for an invalid spec of {namespace}/{name}")
    if the_plan.action == "start-next":
        fields = ", ".join(the_plan.changed_fields[:8])
        result = compute_status(body, observed(the_plan.run, None, [], []), now(), settings)
        body = _patch_status(api, body, result.patch)  # record run N+1 first: a crash then re-creates, never duplicates
        prefix = f"{spec.output.uri.rstrip('/')}/{contract.run_dir(the_plan.run)}/"
        message = f"spec changed ({fields}): starting run {the_plan.run} from step 0 under {prefix}"
        _emit(api, body, [EventSpec("Normal", "RunStarted", message)])
        run = the_plan.run
        _retire_service(api, namespace, name, jobs, run)
        fit = _fit_check(api, body, spec, settings, run)
        if fit is not None and fit.state != "fits":
            return _fit_check_outcome(api, body, observed(run, None, [], [], fit_check=fit), settings, now)
        job = _ensure(api, body, spec, settings, run, with_job=True, why=_fit_check_why(fit))
    elif the_plan.action == "create":
        run = the_plan.run
        if (body.get("status") or {}).get("run") != run:
            result = compute_status(body, observed(run, None, [], []), now(), settings)
            body = _patch_status(api, body, result.patch)
            _emit(api, body, result.events)
        fit = _fit_check(api, body, spec, settings, run)
        if fit is not None and fit.state != "fits":
            return _fit_check_outcome(api, body, observed(run, None, [], [], fit_check=fit), settings, now)
        job = _ensure(api, body, spec, settings, run, with_job=True, why=_fit_check_why(fit))
    else:
        run, job = the_plan.run, the_plan.job
        active = job is not None and not planning.run_finished(body.get("status"), run, job)
        if ensure and active and spec is not None:
            run_spec = spec
            if recorded is not None:
                try:
                    run_spec = parse_spec(dict(recorded))
                except Exception:  # noqa: BLE001
                    run_spec = spec
            _ensure(api, body, run_spec, settings, run, with_job=False)
        if job is not None and active:
            job = _sync_job(api, job, spec)

    for old_job in jobs:
        # A suspended Job of an earlier run never finishes on its own: a later run replaced it.
        old_run = render.run_of(old_job) or 0
        if old_run < run and job_result(old_job)[0] is None and (old_job.get("spec") or {}).get("suspend"):
            if api.delete("batch/v1", "Job", namespace, old_job["metadata"]["name"]):
                log.info("deleted suspended Job %s of run %s: run %s replaced it", old_job["metadata"]["name"],
                         old_run, run, extra={"object": f"{namespace}/{name}"})

    pods = api.list_pods(namespace, name, run) if job is not None else []
    events: list[dict[str, Any]] = []
    if job is not None and job_result(job)[0] is None and not (job.get("spec") or {}).get("suspend"):
        live = sum(1 for p in pods if p.get("status", {}).get("phase") in ("Pending", "Running"))
        if live < render.job_nodes(job):  # a pod is missing: the Job controller may be refused (quota)
            events = api.list_job_events(namespace, job)
    workload = None
    if job is not None and ((job.get("metadata") or {}).get("labels") or {}).get(render.KUEUE_QUEUE_LABEL):
        workload = api.get_workload(namespace, job)  # Kueue's view of a queued run: status.queue
    result = compute_status(
        body, observed(run, job, pods, events, spec_rejected=the_plan.spec_rejected, workload=workload), now(), settings
    )
    body = _patch_status(api, body, result.patch)
    if result.restart is not None:
        # The group of several nodes failed and every pod of it stopped: the next run restarts it
        # (Job first: its annotations carry the count, so a crash before the status patch is harmless).
        _emit(api, body, result.events)
        restart = result.restart
        run_spec = spec
        if run_spec is None and recorded is not None:
            run_spec = parse_spec(dict(recorded))
        if run_spec is None:
            raise RuntimeError(f"no spec to restart run {run} of {namespace}/{name} with")
        job = _ensure(api, body, run_spec, settings, restart.run, with_job=True, group=restart.group, why=restart.why)
        _retire_service(api, namespace, name, jobs, restart.run)
        result = compute_status(body, observed(restart.run, job, [], []), now(), settings)
        body = _patch_status(api, body, result.patch)
    if result.stop_reason and job is not None:
        meta = job["metadata"]
        if not (job.get("spec") or {}).get("suspend"):
            api.patch_job(
                namespace, meta["name"],
                {"spec": {"suspend": True}, "metadata": {"annotations": {"qlora.dev/stopped": result.stop_reason}}},
            )
    for pod in result.delete_pods:
        api.delete_pod(namespace, pod)
    _emit(api, body, result.events)
    return Outcome(phase=result.phase, terminal=result.terminal, action=the_plan.action, **_seen(body))


def _fit_check_outcome(
    api: k.Kube, body: dict[str, Any], obs: Observed, settings: OperatorSettings, now: Callable[[], datetime]
) -> Outcome:
    """Status while the fit check runs (Pending) or after it refused the run (Failed, no GPU Job)."""
    result = compute_status(body, obs, now(), settings)
    body = _patch_status(api, body, result.patch)
    _emit(api, body, result.events)
    return Outcome(phase=result.phase, terminal=result.terminal, action="fit-check", **_seen(body))


def _seen(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the metrics read from the QLoRAJob as the reconcile leaves it."""
    status = body.get("status") or {}
    progress = status.get("progress")
    return {
        "progress": dict(progress) if isinstance(progress, Mapping) else None,
        "completion_time": status.get("completionTime"),
    }


Key = tuple[str, str]


class Reconciler:
    """Runs :func:`reconcile` off the event loop: serialized per QLoRAJob, coalesced, bounded."""

    def __init__(
        self, api: k.Kube, settings: OperatorSettings, *,
        observe: Callable[[Key, str, float, Outcome | None, BaseException | None], None] | None = None,
    ) -> None:
        """``observe(key, trigger, seconds, outcome, error)`` is called after every reconcile."""
        self.api = api
        self.settings = settings
        self._observe = observe
        self._locks: dict[Key, asyncio.Lock] = {}
        self._queued: set[Key] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sem: asyncio.Semaphore | None = None
        self._resync_sem: asyncio.Semaphore | None = None
        self.phases: dict[Key, str | None] = {}
        self._active: set[Key] = set()
        self._stop = asyncio.Event()

    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def trigger(self, namespace: str, name: str, delay: float = 0.0, *, resync: bool = False) -> None:
        """Schedule a reconcile (no-op when one is already waiting for this QLoRAJob).

        ``resync``: the periodic re-check; it runs in its own lane (half the concurrency) so
        that a new QLoRAJob's reconcile never queues behind the re-checks of every unfinished
        one (bench/operator_scale.py: with 1,050 suspended jobs and the 15 s resync, a new
        job's p99 apply->Job was 3.7 s in one shared lane).
        """
        key = (namespace, name)
        if key in self._queued:
            return
        self._queued.add(key)
        loop = asyncio.get_running_loop()

        def start() -> None:
            task = loop.create_task(
                self._run(key, ensure=False, trigger="resync" if resync else "watch", resync=resync)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if delay > 0:
            loop.call_later(delay, start)
        else:
            start()

    def forget(self, namespace: str, name: str) -> None:
        """The QLoRAJob is gone."""
        key = (namespace, name)
        self.phases.pop(key, None)
        self._active.discard(key)
        if key not in self._queued:
            self._locks.pop(key, None)

    async def reconcile_now(self, namespace: str, name: str, *, ensure: bool = True, trigger: str = "handler") -> Outcome:
        """Reconcile now (waiting for a running one) and return the outcome (for kopf handlers)."""
        return await self._run((namespace, name), ensure=ensure, trigger=trigger, queued=False)

    async def _run(self, key: Key, *, ensure: bool, trigger: str, queued: bool = True, resync: bool = False) -> Outcome:
        async with self._lock(key):
            if queued:
                self._queued.discard(key)
            if self._sem is None:
                self._sem = asyncio.Semaphore(self.settings.max_concurrent_reconciles)
                self._resync_sem = asyncio.Semaphore(max(1, self.settings.max_concurrent_reconciles // 2))
            lane = self._resync_sem if resync and self._resync_sem is not None else self._sem
            async with lane:
                started = time.monotonic()
                outcome: Outcome | None = None
                error: BaseException | None = None
                try:
                    outcome = await asyncio.to_thread(
                        reconcile, self.api, self.settings, key[0], key[1], ensure=ensure
                    )
                except k.NamespaceTerminating:
                    outcome = Outcome(gone=True, action="namespace-terminating")
                except k.ApiError as err:
                    error = err
                    outcome = Outcome(retry=str(err), delay=RETRY_DELAY)
                except Exception as err:  # a bug: log it, retry later, keep the operator alive
                    log.exception("reconcile of %s/%s failed", *key)
                    error = err
                    outcome = Outcome(retry=f"{type(err).__name__}: {err}", delay=RETRY_DELAY * 3)
                finally:
                    if self._observe is not None:
                        self._observe(key, trigger, time.monotonic() - started, outcome, error)
        if outcome.gone:
            self.forget(*key)
        else:
            self.phases[key] = outcome.phase
            if outcome.terminal and outcome.retry is None:
                self._active.discard(key)
            else:
                self._active.add(key)
        if outcome.retry is not None:
            log.warning("reconcile of %s/%s will be retried in %ss: %s", key[0], key[1], outcome.delay, outcome.retry)
            if queued:
                self.trigger(*key, delay=outcome.delay)
        return outcome

    async def resync_forever(self) -> None:
        """Re-check unfinished QLoRAJobs every ``resync_seconds`` (timeouts without watch events)."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.resync_seconds)
            except asyncio.TimeoutError:
                pass
            for key in list(self._active):
                self.trigger(*key, resync=True)

    def stop(self) -> None:
        """End :meth:`resync_forever`."""
        self._stop.set()
