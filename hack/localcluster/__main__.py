"""``python -m localcluster up|down|status`` (what ``make cluster-up``/``cluster-down`` run).

``up`` starts the whole local cluster detached (the processes outlive the command),
writes ``<dir>/kubeconfig``, ``<dir>/s3.env`` and ``<dir>/state.json`` and links
``<dir>/bin/kubectl`` and ``<dir>/bin/helm``. It is idempotent: when the cluster in
``<dir>`` is already up and healthy it says so and changes nothing; a half-dead one is
stopped and started afresh. ``down`` stops everything recorded in the state file and
exits 1 when something survived. ``status`` prints each component's state and exits 1
unless all are healthy. ``up`` starts one real node (containerd, kubelet, kube-proxy,
CoreDNS; root; see ``localcluster.realnode``); ``up --node none`` the API and S3 only;
``import-image REF`` copies a podman image into that node's containerd (skipped when the
same image ID is there).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path

from localcluster.cluster import STATE_FILE, ClusterStartError, LocalCluster
from localcluster.nodeimages import ImageError
from localcluster.realnode import NodeSetupError


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<dir>/.lock`` (two ``up``/``down`` never overlap)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _attach(directory: Path) -> LocalCluster | None:
    try:
        return LocalCluster.attach(directory)
    except FileNotFoundError:
        return None


def _link_bin(cluster: LocalCluster) -> None:
    bin_dir = cluster.directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, target in (("kubectl", cluster.kubectl_path), ("helm", cluster.helm_path)):
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def _summary(cluster: LocalCluster) -> str:
    d = cluster.directory
    return (f"  kubeconfig: {d / 'kubeconfig'}\n  s3 env:     {d / 's3.env'} (S3 at {cluster.s3_endpoint})\n"
            + (f"  node:       {cluster.node_names[0]} ({cluster.gpus_per_node} fake GPUs; real node at "
               f"{cluster.node_ip}, containerd {cluster.containerd_socket})\n" if cluster.node == "real"
               else "  node:       none (pods stay Pending)\n") +
            f"  logs:       {d / 'logs'}\n"
            f"  try:        {d / 'bin' / 'kubectl'} --kubeconfig {d / 'kubeconfig'} get nodes")


def cmd_up(args: argparse.Namespace) -> int:
    """Start the cluster detached unless it already runs healthy."""
    existing = _attach(args.dir)
    if existing is not None:
        health = existing.healthy()
        if existing.node != args.node:
            print(f"local cluster in {existing.directory} runs node={existing.node}, not {args.node}: restarting it",
                  file=sys.stderr)
            existing.stop()
        elif all(health.values()):
            _link_bin(existing)
            print(f"local cluster already up in {existing.directory}\n{_summary(existing)}")
            return 0
        else:
            broken = ", ".join(n for n, ok in health.items() if not ok)
            print(f"local cluster in {existing.directory} is unhealthy ({broken}): restarting it", file=sys.stderr)
            existing.stop()
    cluster = LocalCluster(args.dir, gpus_per_node=args.gpus_per_node, detach=True,
                           timeout_s=args.timeout, node=args.node)
    try:
        cluster.start()
    except (ClusterStartError, NodeSetupError, ImageError) as exc:
        print(f"local cluster failed to start: {exc}", file=sys.stderr)
        return 1
    _link_bin(cluster)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())
    print(f"local cluster up in {cluster.startup_seconds:.1f}s ({timings})\n{_summary(cluster)}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop what ``up`` started; 1 when a process survived."""
    cluster = _attach(args.dir)
    if cluster is None:
        print(f"no local cluster running in {args.dir.absolute()} (no {STATE_FILE})")
        return 0
    leftovers = cluster.stop()
    if leftovers:
        print("processes left behind: " + ", ".join(leftovers), file=sys.stderr)
        return 1
    print(f"local cluster in {cluster.directory} stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print each component's health; 0 when all are healthy."""
    cluster = _attach(args.dir)
    if cluster is None:
        print(f"no local cluster in {args.dir.absolute()}")
        return 1
    health = cluster.healthy()
    for name, ok in health.items():
        print(f"{name:<25} pid {cluster.components[name].pid:<8} {'healthy' if ok else 'DOWN'}")
    print(_summary(cluster))
    return 0 if all(health.values()) else 1


def cmd_import_image(args: argparse.Namespace) -> int:
    """Import a podman image into the real node's containerd; 1 when that fails."""
    cluster = _attach(args.dir)
    if cluster is None or cluster.node != "real":
        print(f"no real-node cluster running in {args.dir.absolute()} (make cluster-up NODE=real)", file=sys.stderr)
        return 1
    try:
        result = cluster.import_image(args.ref)
    except ImageError as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 1
    print(f"{result.ref} {'imported' if result.imported else 'already present'} in {result.seconds:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the sub-command."""
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("up", cmd_up), ("down", cmd_down), ("status", cmd_status),
                     ("import-image", cmd_import_image)):
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("--dir", type=Path, default=Path(".local-cluster"), help="cluster directory")
        p.set_defaults(fn=fn)
        if name == "up":
            p.add_argument("--gpus-per-node", type=int, default=2, help="fake nvidia.com/gpu capacity of the node")
            p.add_argument("--timeout", type=float, default=180.0, help="seconds each component may take to start")
            p.add_argument("--node", choices=("real", "none"), default="real",
                           help="real: one real node, containerd + kubelet (root; default); none: API and S3 only")
        if name == "import-image":
            p.add_argument("ref", help="a podman image, e.g. localhost/qlora-local/probe:TAG")
    args = parser.parse_args(argv)
    if args.command in ("status", "import-image"):
        return args.fn(args)
    with _locked(args.dir):
        return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
