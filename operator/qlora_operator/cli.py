"""``qlora-operator``: run the operator (kopf underneath), or render a job's children.

Settings come from ``QLORA_OPERATOR_*`` environment variables; flags override them.
Logs are JSON lines by default (``--log-format text`` for people).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from qlora_operator.settings import OperatorSettings, SettingsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kubernetes operator for QLoRA fine-tuning jobs.")


@app.callback()
def main() -> None:
    """Kubernetes operator for QLoRAJobs (qlora.dev/v1alpha1)."""


def _configure_logging(fmt: str, verbose: bool) -> None:
    import kopf

    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if fmt == "json" else kopf.LogFormat.FULL,
        log_prefix=fmt != "json",
        log_refkey="object",
    )
    for noisy in ("urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # kopf logs every watch-event handler call; our reconciler logs what it does.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


@app.command()
def run(
    namespace: list[str] = typer.Option([], "--namespace", "-n", help="Namespace to watch (repeatable)."),
    all_namespaces: bool = typer.Option(False, "--all-namespaces", "-A", help="Watch every namespace."),
    standalone: bool = typer.Option(
        True, "--standalone/--peering",
        help="Without kopf peering (default; several replicas use --leader-election instead) or with it.",
    ),
    leader_election: Optional[bool] = typer.Option(
        None, "--leader-election/--no-leader-election",
        help="Reconcile only while holding the leader Lease (several replicas; qlora_operator.leader).",
    ),
    peering_name: Optional[str] = typer.Option(None, help="kopf peering object name (with --peering)."),
    trainer_image: Optional[str] = typer.Option(None, help="Default trainer image."),
    trainer_command: Optional[str] = typer.Option(None, help="Trainer command (JSON list or shell words)."),
    stalled_timeout: Optional[float] = typer.Option(None, help="Seconds without progress before Stalled."),
    image_pull_grace: Optional[float] = typer.Option(None, help="Seconds of image-pull failures before Failed."),
    container_config_grace: Optional[float] = typer.Option(
        None, help="Seconds a pod may wait for a missing Secret before Failed."
    ),
    unschedulable_timeout: Optional[float] = typer.Option(
        None, help="Seconds Unschedulable/QuotaExceeded before Failed."
    ),
    max_gpus_per_job: Optional[int] = typer.Option(None, help="Largest spec.resources.gpus accepted."),
    gpu_resource_name: Optional[str] = typer.Option(None, help="Default GPU extended resource name."),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus port (0 disables)."),
    resync_seconds: Optional[float] = typer.Option(None, help="Re-check interval of unfinished jobs."),
    log_format: Optional[str] = typer.Option(None, help="json (default) or text."),
    liveness: Optional[str] = typer.Option(None, help="Liveness endpoint, e.g. http://0.0.0.0:8081/healthz."),
    kubeconfig: Optional[str] = typer.Option(None, help="Kubeconfig file (default: in-cluster, then $KUBECONFIG)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs."),
) -> None:
    """Run the operator until interrupted."""
    if namespace and all_namespaces:
        raise typer.BadParameter("use either --namespace or --all-namespaces, not both")
    try:
        settings = OperatorSettings.load(
            namespaces=namespace or None,
            all_namespaces=True if all_namespaces else None,
            trainer_image=trainer_image,
            trainer_command=trainer_command,
            stalled_timeout_seconds=stalled_timeout,
            image_pull_grace_seconds=image_pull_grace,
            container_config_grace_seconds=container_config_grace,
            unschedulable_timeout_seconds=unschedulable_timeout,
            max_gpus_per_job=max_gpus_per_job,
            gpu_resource_name=gpu_resource_name,
            metrics_port=metrics_port,
            resync_seconds=resync_seconds,
            log_format=log_format,
            leader_election=leader_election,
        )
    except SettingsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    _configure_logging(settings.log_format, verbose)

    import kopf

    from qlora_operator import handlers  # noqa: F401 - registers the handlers
    from qlora_operator.kube import Kube
    from qlora_operator.metrics import Metrics

    kube = Kube(kubeconfig=kubeconfig)
    logging.getLogger("qlora_operator").info("settings: %s", settings.model_dump_json())
    elector = _lead(settings, kube, liveness) if settings.leader_election else None
    runtime = handlers.Runtime(settings=settings, kube=kube, metrics=Metrics.for_settings(settings))
    try:
        kopf.run(
            standalone=standalone,
            peering_name=peering_name,
            clusterwide=settings.clusterwide,
            namespaces=() if settings.clusterwide else list(settings.namespaces),
            liveness_endpoint=liveness,
            memo=kopf.Memo(runtime=runtime),
        )
    finally:
        if elector is not None:
            elector.release()  # a clean stop hands over at once


def _lead(settings: OperatorSettings, kube: object, liveness: Optional[str]):
    """Block until this replica holds the leader Lease (serving ``liveness`` as a standby
    meanwhile), then keep renewing it; a lost Lease ends the process at once (exit 1)."""
    import os

    from qlora_operator.leader import LeaderElector, StandbyHealth

    namespace = settings.leader_election_namespace or os.environ.get("POD_NAMESPACE", "")
    if not namespace:
        typer.echo("leader election needs leader_election_namespace (env QLORA_OPERATOR_LEADER_ELECTION_NAMESPACE) "
                   "or POD_NAMESPACE", err=True)
        raise typer.Exit(2)
    elector = LeaderElector(
        kube.api, settings.leader_election_name, namespace,  # type: ignore[attr-defined]
        lease_seconds=settings.leader_election_lease_seconds,
        renew_deadline_seconds=settings.leader_election_renew_deadline_seconds,
        retry_seconds=settings.leader_election_retry_seconds,
    )
    health = StandbyHealth(liveness) if liveness else None
    try:
        elector.acquire()
    finally:
        if health is not None:
            health.close()

    def lost() -> None:
        logging.getLogger("qlora_operator").error("exiting: another replica may lead now")
        logging.shutdown()
        os._exit(1)  # never act beside a new leader; the kubelet restarts this pod as a standby

    elector.keep_renewing(lost)
    return elector


@app.command()
def render(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="QLoRAJob manifest (YAML or JSON)."),
    run_number: int = typer.Option(1, "--run", help="Run number to render."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Namespace when the manifest has none."),
    output: str = typer.Option("yaml", "--output", "-o", help="yaml or json."),
) -> None:
    """Print the children the operator would create for a QLoRAJob (no cluster needed)."""
    import yaml

    from qlora_operator import plan, render as rendering

    body = yaml.safe_load(file.read_text())
    meta = body.setdefault("metadata", {})
    meta.setdefault("namespace", namespace or "default")
    meta.setdefault("uid", "00000000-0000-0000-0000-000000000000")
    meta.setdefault("generation", 1)
    settings = OperatorSettings.load()
    spec, invalid = plan.validate(body.get("spec"), settings)
    if spec is None:
        typer.echo(f"invalid QLoRAJob {meta.get('name')}: {invalid}", err=True)
        raise typer.Exit(2)
    children = rendering.render_children(body, spec, settings, run_number)
    if output == "json":
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": children}, indent=2))
    else:
        typer.echo(yaml.safe_dump_all(children, sort_keys=False), nl=False)


if __name__ == "__main__":  # python -m qlora_operator.cli
    sys.exit(app())
