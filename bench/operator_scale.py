"""``python bench/operator_scale.py``: N QLoRAJobs applied at once to the local cluster (issue 18 item 7).

What it measures, on the real control plane (etcd, kube-apiserver, controller-manager,
scheduler built by ``make binaries``; no node: every QLoRAJob is ``runPolicy.suspend:
true``, so the operator creates each run's children and its Job and no pod ever runs):

- time from the first create to the N-th Job (a watch on Jobs records when each appears);
- apply->Job latency per QLoRAJob (create answered -> its Job ADDED on the watch), p50/p99
  for the burst, and for a trickle of ``--trickle`` more created one by one once the burst
  is absorbed (the steady state);
- the operator's RSS (peak, VmHWM) and CPU seconds (user+system, /proc);
- API requests per job made by the operator, counted from the API server's audit log
  (Metadata level; requests whose user agent is not the bench's);
- duplicates: Jobs beyond one per QLoRAJob (must be 0).

Targets (issue 18): <= 60 s to 1,000 Jobs on the 2-core dev machine, p99 <= 1 s once the
burst is absorbed, RSS <= 200 MiB. Prints a Markdown table; ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

from localcluster import LocalCluster  # noqa: E402

GROUP_PATH = "/apis/qlora.dev/v1alpha1"
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
"""


class AuditedCluster(LocalCluster):
    """The local cluster with the API server's audit log on (Metadata level, JSON lines)."""

    def __init__(self, directory: Path, **kwargs):
        super().__init__(directory, **kwargs)
        self.audit_log = Path(directory) / "audit.log"
        self.audit_policy = Path(directory) / "audit-policy.yaml"

    def _apiserver_argv(self, binary: Path) -> list[str]:
        self.audit_policy.parent.mkdir(parents=True, exist_ok=True)
        self.audit_policy.write_text(AUDIT_POLICY)
        return [*super()._apiserver_argv(binary), f"--audit-policy-file={self.audit_policy}",
                f"--audit-log-path={self.audit_log}", "--audit-log-format=json", "--audit-log-maxsize=0"]


def qlorajob(namespace: str, name: str) -> dict:
    """A minimal valid QLoRAJob that starts suspended (its Job is created, no pod runs)."""
    return {
        "apiVersion": "qlora.dev/v1alpha1", "kind": "QLoRAJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/fake/"},
            "dataset": {"uri": "s3://data/fake/ok.jsonl"},
            "output": {"uri": f"s3://artifacts/{namespace}/{name}/"},
            "storage": {"endpoint": "http://127.0.0.1:9"},
            "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi"},
            "runPolicy": {"suspend": True},
        },
    }


class JobWatch(threading.Thread):
    """Watches Jobs of one namespace; records when each Job name was first ADDED."""

    def __init__(self, api, namespace: str):
        super().__init__(daemon=True)
        self.api, self.namespace = api, namespace
        self.seen: dict[str, float] = {}
        self.owner: dict[str, str] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        rv = self.api.get(path)["metadata"]["resourceVersion"]
        self.ready.set()
        while not self.stop.is_set():
            try:
                for event in self.api.watch(path, rv, timeout_s=60):
                    self._record(event)
                    rv = event["object"]["metadata"].get("resourceVersion", rv)
                    if self.stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - the cluster stopped under the watch at the end
                if self.stop.is_set():
                    return
                raise

    def _record(self, event: dict) -> None:
        obj = event["object"]
        name = obj["metadata"].get("name")  # a BOOKMARK has none
        if event["type"] == "ADDED" and name and name not in self.seen:
            self.seen[name] = time.monotonic()
            self.owner[name] = (obj["metadata"].get("ownerReferences") or [{}])[0].get("name", "")


class ProcSampler(threading.Thread):
    """Samples a process's RSS (and keeps its peak, VmHWM) and CPU seconds every 0.5 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.rss_mib = self.hwm_mib = self.cpu_s = 0.0
        self.stop = threading.Event()

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
        self.rss_mib = int(fields.get("VmRSS", 0)) / 1024
        self.hwm_mib = max(self.hwm_mib, int(fields.get("VmHWM", 0)) / 1024)
        ticks = os.sysconf("SC_CLK_TCK")
        self.cpu_s = (int(stat[11]) + int(stat[12])) / ticks  # utime, stime

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def operator_requests(audit_log: Path, since: str) -> dict[str, int]:
    """Requests by verb in the audit log from ``since`` (RFC 3339) made by the operator: as the
    cluster admin (controllers, the scheduler and service accounts have ``system:`` identities)
    with a user agent that is neither kubectl's nor the bench's (urllib3 through
    ``localcluster.kubeapi``): the kubernetes client's (OpenAPI-Generator) and kopf's (aiohttp)."""
    counts: dict[str, int] = {}
    with audit_log.open() as f:
        for line in f:
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete" or event.get("requestReceivedTimestamp", "") < since:
                continue
            agent = event.get("userAgent") or ""
            user = (event.get("user") or {}).get("username", "")
            if user.startswith("system:") or agent.startswith(("kubectl", "python-urllib3")):
                continue
            verb = event.get("verb", "?")
            counts[verb] = counts.get(verb, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="QLoRAJobs in the burst")
    parser.add_argument("--trickle", type=int, default=50, help="QLoRAJobs created one by one after the burst")
    parser.add_argument("--clients", type=int, default=16, help="concurrent create requests of the burst")
    parser.add_argument("--concurrency", type=int, default=None, help="operator max_concurrent_reconciles")
    parser.add_argument("--resync", type=float, default=None, help="operator resync_seconds (default: its own, 15)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the Jobs")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    namespace = "scale"
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        cluster = AuditedCluster(Path(tmp) / "cluster", s3=False)
        cluster.start()
        operator = sampler = watch = None
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            cluster.kubectl("wait", "--for=condition=Established", "crd/qlorajobs.qlora.dev", "--timeout=60s")
            cluster.kubectl("create", "namespace", namespace)
            api = cluster.api()
            env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "QLORA_OPERATOR_METRICS_PORT": "0",
                   "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
            if args.concurrency:
                env["QLORA_OPERATOR_MAX_CONCURRENT_RECONCILES"] = str(args.concurrency)
            if args.resync:
                env["QLORA_OPERATOR_RESYNC_SECONDS"] = str(args.resync)
            log_path = Path(tmp) / "operator.log"
            with log_path.open("w") as log:
                operator = subprocess.Popen(
                    [sys.executable, "-m", "qlora_operator", "run", "--namespace", namespace, "--standalone"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            deadline = time.monotonic() + 60
            while "qlora-operator started" not in log_path.read_text(errors="replace"):
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"operator did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            sampler = ProcSampler(operator.pid)
            sampler.sample()
            cpu_idle, rss_idle = sampler.cpu_s, sampler.rss_mib
            sampler.start()
            watch = JobWatch(api, namespace)
            watch.start()
            watch.ready.wait(30)
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())

            created: dict[str, float] = {}
            path = f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs"

            def create(name: str) -> None:
                api.create(path, qlorajob(namespace, name))
                created[name] = time.monotonic()

            names = [f"burst-{i:04d}" for i in range(args.jobs)]
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(create, names))
            applied = time.monotonic() - t0
            end = time.monotonic() + args.timeout
            while sum(1 for n in names if f"{n}-train" in watch.seen) < len(names):
                if time.monotonic() > end:
                    raise SystemExit(f"only {len(watch.seen)} of {len(names)} Jobs after {args.timeout}s")
                time.sleep(0.1)
            to_all = max(watch.seen[f"{n}-train"] for n in names) - t0
            burst = [watch.seen[f"{n}-train"] - created[n] for n in names]
            cpu_burst = sampler.cpu_s - cpu_idle

            # "Once the burst is absorbed": the operator has worked off the burst's follow-up
            # reconciles (status patches, the Job controller's updates) when its CPU is flat.
            settle_start = time.monotonic()
            last = sampler.cpu_s
            while time.monotonic() - settle_start < 120:
                time.sleep(2)
                sampler.sample()
                if sampler.cpu_s - last < 0.1:
                    break
                last = sampler.cpu_s
            settled = time.monotonic() - settle_start
            trickle_names = [f"trickle-{i:03d}" for i in range(args.trickle)]
            for name in trickle_names:
                create(name)
                wait_end = time.monotonic() + 30
                while f"{name}-train" not in watch.seen and time.monotonic() < wait_end:
                    time.sleep(0.005)
                time.sleep(0.2)
            trickle = [watch.seen[f"{n}-train"] - created[n] for n in trickle_names if f"{n}-train" in watch.seen]
            time.sleep(3)  # let the last status patches land before counting requests
            sampler.sample()

            jobs = api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]
            per_owner: dict[str, int] = {}
            for job in jobs:
                owner = (job["metadata"].get("ownerReferences") or [{}])[0].get("name", "")
                per_owner[owner] = per_owner.get(owner, 0) + 1
            duplicates = sum(count - 1 for count in per_owner.values() if count > 1)
            total = len(names) + len(trickle_names)
            requests = operator_requests(cluster.audit_log, since)
            result = {
                "jobs": args.jobs, "trickle": args.trickle, "clients": args.clients,
                "concurrency": args.concurrency or "default", "resync_seconds": args.resync or "default",
                "cpus": os.cpu_count(),
                "burst_apply_s": round(applied, 2),
                "time_to_all_jobs_s": round(to_all, 2),
                "burst_latency_p50_s": round(percentile(burst, 50), 3),
                "burst_latency_p99_s": round(percentile(burst, 99), 3),
                "trickle_latency_p50_s": round(percentile(trickle, 50), 3),
                "trickle_latency_p99_s": round(percentile(trickle, 99), 3),
                "trickle_seen": len(trickle),
                "settle_s": round(settled, 1),
                "operator_rss_idle_mib": round(rss_idle, 1),
                "operator_rss_peak_mib": round(sampler.hwm_mib, 1),
                "operator_cpu_burst_s": round(cpu_burst, 1),
                "operator_cpu_total_s": round(sampler.cpu_s - cpu_idle, 1),
                "api_requests": sum(requests.values()),
                "api_requests_per_job": round(sum(requests.values()) / total, 2),
                "api_requests_by_verb": requests,
                "jobs_created": len(jobs),
                "duplicates": duplicates,
                "mean_burst_latency_s": round(statistics.fmean(burst), 3),
            }
        finally:
            for thread in (sampler, watch):
                if thread is not None:
                    thread.stop.set()
            if operator is not None and operator.poll() is None:
                operator.terminate()
                try:
                    operator.wait(15)
                except subprocess.TimeoutExpired:
                    operator.kill()
            cluster.stop()

    rows = [
        ("QLoRAJobs in the burst (created by clients)", f"{result['jobs']} ({result['clients']})"),
        ("burst created in", f"{result['burst_apply_s']} s"),
        ("first create -> last Job", f"{result['time_to_all_jobs_s']} s"),
        ("apply -> Job, burst p50 / p99", f"{result['burst_latency_p50_s']} s / {result['burst_latency_p99_s']} s"),
        ("burst absorbed (operator CPU flat) after the last Job", f"{result['settle_s']} s"),
        (f"apply -> Job, {result['trickle_seen']} one by one after that, p50 / p99",
         f"{result['trickle_latency_p50_s']} s / {result['trickle_latency_p99_s']} s"),
        ("operator RSS idle / peak", f"{result['operator_rss_idle_mib']} / {result['operator_rss_peak_mib']} MiB"),
        ("operator CPU (burst / all)", f"{result['operator_cpu_burst_s']} / {result['operator_cpu_total_s']} s"),
        ("operator API requests per job", f"{result['api_requests_per_job']} ({result['api_requests_by_verb']})"),
        ("Jobs / duplicates", f"{result['jobs_created']} / {result['duplicates']}"),
    ]
    print(f"| operator scale ({result['cpus']} CPUs, max_concurrent_reconciles {result['concurrency']}, "
          f"resync_seconds {result['resync_seconds']}) | |")
    print("|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
