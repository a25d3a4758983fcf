"""The real node of the local cluster: containerd + runc + CNI, the kubelet and kube-proxy.

What :class:`localcluster.LocalCluster` (``node="real"``) uses to run one real node on
this machine; facts and workarounds from ``notes/real-node.md``:

- packages: containerd, runc, the CNI plugins and iptables from Debian (:func:`ensure_packages`
  installs the missing ones with apt-get as root);
- files under ``<cluster dir>/node/``: containerd's config (own state and socket, its root
  kept under the cache, :func:`containerd_root`;
  ``restrict_oom_score_adj``, runc with ``SystemdCgroup = false``, pod network namespaces
  runc's state under the node dir), the CNI conflist (bridge ``cni0`` + host-local
  10.244.0.0/24 + portmap), the kubelet config (cgroupfs, ``failSwapOn: false``,
  ``oomScoreAdj: 0``, webhook authn/authz, serving cert from the cluster CA, fixed ports
  10250/10248); the sysctls and missing :data:`HOST_PATHS` recorded before start go to
  ``<cluster dir>/node-host.json``;
- the argv of containerd, the kubelet and kube-proxy (iptables mode,
  ``--conntrack-max-per-core 0``, fixed ports 10249/10256);
- cluster DNS: CoreDNS as a host process on ``<node address>:53`` (:func:`write_corefile`,
  :func:`coredns_argv`): its ``kubernetes`` plugin answers ``cluster.local`` from the API
  server (Services, headless Services' pod hostnames such as a group's
  ``<job-name>-0.<service>``), everything else goes to the host's resolvers; the kubelet
  gives pods ``clusterDNS: [<node address>]`` (the address pods already reach MinIO and the
  API server at, so no kube-dns Service is needed);
- teardown (:func:`kill_pod_processes` and :func:`cleanup`): the pods' processes
  (every process in the ``kubepods`` cgroups), mounts under the cluster dir, the ``cni0``
  bridge, its veths and the pods' network namespaces, the ``KUBE-*`` iptables chains and the ``CNI-*`` chains of this
  network (podman's own CNI chains are left alone), the ``kubepods`` cgroups, the
  sysctls the kubelet and kube-proxy changed, and the :data:`HOST_PATHS` they created.

The ports are fixed, so one real node runs per machine: :func:`check_ports` fails at once
when one is taken. No GPUs: the node's ``nvidia.com/gpu`` capacity is patched into its
status (no device plugin runs).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: Debian packages of the node's runtime (command that shows each is installed).
APT_PACKAGES = {"containerd": "containerd", "runc": "runc", "containernetworking-plugins": "/usr/lib/cni/bridge",
                "iptables": "iptables"}
CNI_BIN_DIR = "/usr/lib/cni"
POD_CIDR = "10.244.0.0/24"
BRIDGE = "cni0"
NETWORK_NAME = "qlora-local"
#: fixed ports: kubelet API, kubelet healthz, kube-proxy metrics, kube-proxy healthz, cluster DNS.
PORTS = {"kubelet": 10250, "kubelet-healthz": 10248, "kube-proxy-metrics": 10249, "kube-proxy-healthz": 10256,
         "dns": 53}
#: the cluster's DNS domain (the kubelet's ``clusterDomain``, CoreDNS's ``kubernetes`` zone).
CLUSTER_DOMAIN = "cluster.local"
#: what CoreDNS's ``kubernetes`` plugin reads (the rules of CoreDNS's own deployment manifest,
#: ``system:coredns``): bound to the ``system:coredns`` client of the local PKI at start.
COREDNS_RBAC = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
     "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                "verbs": ["list", "watch"]},
               {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}]},
]
#: sysctls the kubelet (setupKernelTunables), kube-proxy and the bridge plugin may change;
#: recorded before start, restored by :func:`cleanup` where they differ.
#: net.ipv4.ip_forward is recorded but not restored: podman on this machine needs it too.
SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
           "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.conf.all.route_localnet",
           "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
           "net.netfilter.nf_conntrack_max", "net.ipv4.ip_forward")
NOT_RESTORED = ("net.ipv4.ip_forward",)
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: host paths the kubelet and containerd 1.6 use whatever their config says (the kubelet's
#: device-plugin socket dir and /var/log/containers links, the shims' sockets); those that
#: did not exist before the node first started are removed by :func:`cleanup`.
HOST_PATHS = ("/run/containerd", "/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/var/lib/cni")
#: libcni's result cache (containerd 1.6 has no setting for it): files ``<network>-<sandbox>-<ifname>``.
CNI_CACHE = Path("/var/lib/cni/results")
#: where containerd 1.6's CRI pins the pods' network namespaces (``cni-<uuid>``).
NETNS_DIR = Path("/run/netns")
KUBEPODS = "kubepods"


class NodeSetupError(RuntimeError):
    """The real node cannot run here (a port taken, not root, a package missing); says which."""


# ----------------------------------------------------------------- preconditions
def check_ports() -> None:
    """Raise :class:`NodeSetupError` naming the fixed port(s) already in use (another kubelet?)."""
    from localcluster import procs

    taken = [f"{name} {port}" for name, port in PORTS.items() if not procs.port_is_free(port, "0.0.0.0")]
    if taken:
        raise NodeSetupError(f"the real node needs fixed ports that are in use: {', '.join(taken)} "
                             "(only one real node can run per machine: stop the other one, "
                             "e.g. python -m localcluster down --dir <its dir>)")


def ensure_packages(log=print) -> None:
    """Install the missing runtime packages (:data:`APT_PACKAGES`) with apt-get.

    Raises:
        NodeSetupError: not root, no apt-get, or apt-get failed (the message names the packages).
    """
    if os.geteuid() != 0:
        raise NodeSetupError("the real node runs containerd and the kubelet as root: run as root")
    missing = [pkg for pkg, probe in APT_PACKAGES.items()
               if not (Path(probe).exists() if probe.startswith("/") else shutil.which(probe))]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise NodeSetupError(f"missing packages {', '.join(missing)} and no apt-get to install them")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NodeSetupError(f"apt-get install {' '.join(missing)} failed:\n{proc.stderr[-3000:]}")


def node_ip() -> str:
    """This machine's primary IPv4 address (the source of its default route); pods reach it.

    Raises:
        NodeSetupError: no default route (no address pods could reach).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the route's source
        except OSError as exc:
            raise NodeSetupError(f"no IPv4 route to find the node address: {exc}") from exc
        address = s.getsockname()[0]
    if address.startswith("127."):
        raise NodeSetupError("the machine has only a loopback address: pods could not reach the API server")
    return address


# ----------------------------------------------------------------- files
def node_dir(cluster_dir: Path) -> Path:
    """``<cluster dir>/node``: everything the real node writes."""
    return cluster_dir / "node"


def containerd_root() -> Path:
    """containerd's root (content store, snapshots, metadata): kept across clusters under
    ``${XDG_CACHE_HOME:-~/.cache}/qlora-operator/containerd/root`` so an imported image (a 6 GB
    trainer) is imported once per machine; the containers are removed at every start and stop
    (:func:`remove_containers`), so only images stay. One real node per machine uses it."""
    from localcluster.binaries import cache_dir

    return cache_dir().parent / "containerd" / "root"


def containerd_socket(cluster_dir: Path) -> Path:
    """The node's containerd socket (``ctr --address``)."""
    return node_dir(cluster_dir) / "containerd" / "containerd.sock"


def write_files(cluster_dir: Path, *, node_name: str, address: str, pause_image: str, ca_cert: Path,
                serving_cert: Path, serving_key: Path, max_pods: int) -> dict[str, Path]:
    """Write containerd's config, the CNI conflist and the kubelet config; return their paths
    (keys ``containerd``, ``kubelet``). The pod dirs under ``<cluster dir>/node`` are wiped first."""
    base = node_dir(cluster_dir)
    if base.exists():
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
    ctd = base / "containerd"
    for sub in ("state", "opt", "runc"):
        (ctd / sub).mkdir(parents=True, exist_ok=True)
    containerd_root().mkdir(parents=True, exist_ok=True)
    cni_conf = base / "cni" / "net.d"
    cni_conf.mkdir(parents=True)
    runc = shutil.which("runc") or "/usr/sbin/runc"
    (ctd / "config.toml").write_text(f"""# written by hack/localcluster/realnode.py
version = 2
root = "{containerd_root()}"
state = "{ctd / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{containerd_socket(cluster_dir)}"
[ttrpc]
  address = "{ctd / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{ctd / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{ctd / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
""")
    conflist = {"cniVersion": "0.4.0", "name": NETWORK_NAME, "plugins": [
        {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                  "dataDir": str(base / "cni" / "ipam")}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    (cni_conf / "10-qlora-local.conflist").write_text(json.dumps(conflist, indent=2))
    kubelet = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": "0.0.0.0", "port": PORTS["kubelet"], "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": PORTS["kubelet-healthz"],
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(ca_cert)}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving_cert), "tlsPrivateKeyFile": str(serving_key),
        "containerRuntimeEndpoint": f"unix://{containerd_socket(cluster_dir)}",
        "cgroupDriver": "cgroupfs", "failSwapOn": False, "oomScoreAdj": 0,
        "podLogsDir": str(base / "pod-logs"), "maxPods": max_pods,
        "resolvConf": "/etc/resolv.conf", "serializeImagePulls": False,
        "clusterDNS": [address], "clusterDomain": CLUSTER_DOMAIN,
        # a shared development disk: never evict or garbage-collect the imported images
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "nodeStatusReportFrequency": "10s", "syncFrequency": "10s",
    }
    (base / "kubelet").mkdir()
    (base / "kubelet-config.yaml").write_text(json.dumps(kubelet, indent=2))
    return {"containerd": ctd / "config.toml", "kubelet": base / "kubelet-config.yaml"}


def write_corefile(cluster_dir: Path, *, address: str, kubeconfig: Path, ready_port: int) -> Path:
    """Write CoreDNS's Corefile to ``<node dir>/Corefile`` and return its path.

    CoreDNS serves ``address``:53 (UDP and TCP): ``cluster.local`` and the reverse zones from
    the API server through ``kubeconfig`` (``pods insecure``: ``a-b-c-d.<ns>.pod`` names, as
    kubeadm's default Corefile), everything else forwarded to the host's ``/etc/resolv.conf``;
    ``ready`` on ``127.0.0.1:ready_port`` answers 200 once the plugin has synced.
    """
    path = node_dir(cluster_dir) / "Corefile"
    path.write_text(f"""# written by hack/localcluster/realnode.py
.:{PORTS['dns']} {{
    bind {address}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    forward . /etc/resolv.conf
    cache 5
}}
""")
    return path


def coredns_argv(binary: Path, corefile: Path) -> list[str]:
    """CoreDNS with the node's Corefile."""
    return [str(binary), "-conf", str(corefile)]


def containerd_argv(cluster_dir: Path) -> list[str]:
    """containerd with the node's config."""
    return [shutil.which("containerd") or "containerd", "--config",
            str(node_dir(cluster_dir) / "containerd" / "config.toml")]


def kubelet_argv(binary: Path, cluster_dir: Path, kubeconfig: Path, node_name: str, address: str) -> list[str]:
    """The kubelet registering ``node_name`` with InternalIP ``address``."""
    base = node_dir(cluster_dir)
    return [str(binary), f"--config={base / 'kubelet-config.yaml'}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={base / 'kubelet'}", f"--hostname-override={node_name}", f"--node-ip={address}",
            "--v=1"]


def kube_proxy_argv(binary: Path, kubeconfig: Path, node_name: str) -> list[str]:
    """kube-proxy in iptables mode; conntrack and route_localnet sysctls left alone."""
    return [str(binary), f"--kubeconfig={kubeconfig}", f"--hostname-override={node_name}",
            "--proxy-mode=iptables", f"--cluster-cidr={POD_CIDR}", "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
            "--iptables-localhost-nodeports=false",
            f"--metrics-bind-address=127.0.0.1:{PORTS['kube-proxy-metrics']}",
            f"--healthz-bind-address=127.0.0.1:{PORTS['kube-proxy-healthz']}", "--v=1"]


# ----------------------------------------------------------------- sysctls
def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    """Current values of :data:`SYSCTLS` (those this kernel has)."""
    values = {}
    for name in SYSCTLS:
        try:
            values[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            continue
    return values


def _record_path(cluster_dir: Path) -> Path:
    return cluster_dir / "node-host.json"


def record_host(cluster_dir: Path) -> dict:
    """Save the host state the node changes to ``<cluster dir>/node-host.json``:
    ``{"sysctls": read_sysctls(), "created": [HOST_PATHS missing now]}``. An existing record is
    kept (a restart after a crash must not record the kubelet's values as the originals)."""
    path = _record_path(cluster_dir)
    if path.exists():
        return json.loads(path.read_text())
    record = {"sysctls": read_sysctls(), "created": [p for p in HOST_PATHS if not os.path.lexists(p)]}
    path.write_text(json.dumps(record, indent=2))
    return record


def restore_host(cluster_dir: Path) -> dict[str, tuple[str, str]]:
    """Write back the recorded sysctls that changed and remove the host paths the node created;
    return ``{sysctl: (was, restored)}``. The record is removed afterwards."""
    path = _record_path(cluster_dir)
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    for created in record.get("created", []):
        shutil.rmtree(created, ignore_errors=True)
    changed = {}
    for name, value in record["sysctls"].items():
        if name in NOT_RESTORED:
            continue
        current = _sysctl_path(name).read_text().strip()
        if current != value:
            _sysctl_path(name).write_text(value + "\n")
            changed[name] = (current, value)
    path.unlink()
    return changed


# ----------------------------------------------------------------- teardown
def kubepods_dirs() -> list[Path]:
    """Every ``kubepods`` cgroup directory (each v1 hierarchy and the unified one)."""
    found = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        candidate = hierarchy / KUBEPODS
        if candidate.is_dir():
            found.append(candidate)
    if (CGROUP_ROOT / KUBEPODS).is_dir():  # pure cgroup v2
        found.append(CGROUP_ROOT / KUBEPODS)
    return found


def _cgroup_pids(root: Path) -> set[int]:
    pids: set[int] = set()
    for procs_file in root.rglob("cgroup.procs"):
        try:
            pids.update(int(p) for p in procs_file.read_text().split())
        except OSError:
            continue
    return pids


def pod_pids() -> set[int]:
    """Pids of every process in a ``kubepods`` cgroup (the pods' containers and pause)."""
    pids: set[int] = set()
    for root in kubepods_dirs():
        pids |= _cgroup_pids(root)
    return pids


def kill_pod_processes(timeout_s: float = 10.0) -> set[int]:
    """SIGKILL every pod process (run after the kubelet stopped); return those still alive."""
    deadline = time.monotonic() + timeout_s
    pids = pod_pids()
    while pids and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)
        pids = pod_pids()
    return pids


def remove_containers(socket_path: Path) -> list[str]:
    """Delete every task and container in containerd's ``k8s.io`` namespace (the pods'; run
    while containerd is up, after :func:`kill_pod_processes` or before the kubelet starts), so
    the kept root holds images only. Returns the container IDs still listed."""
    from localcluster.nodeimages import ctr_argv

    def listed() -> list[str]:
        proc = subprocess.run(ctr_argv(socket_path, "containers", "ls", "-q"), capture_output=True, text=True)
        return proc.stdout.split() if proc.returncode == 0 else []

    for cid in listed():
        subprocess.run(ctr_argv(socket_path, "tasks", "kill", "--signal", "SIGKILL", cid), capture_output=True)
        subprocess.run(ctr_argv(socket_path, "tasks", "delete", "--force", cid), capture_output=True)
        subprocess.run(ctr_argv(socket_path, "containers", "delete", cid), capture_output=True)
    return listed()


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(directory: Path) -> list[str]:
    """Mount points (this mount namespace) at or below ``directory``, deepest first."""
    prefix = str(directory.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def unmount_under(directory: Path) -> list[str]:
    """Unmount everything below ``directory`` (lazily where busy); return what is still mounted."""
    for _ in range(3):
        points = mounts_under(directory)
        if not points:
            return []
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
    return mounts_under(directory)


def bridge_links() -> list[str]:
    """``cni0`` (when present) and the interfaces enslaved to it (the pods' host-side veths)."""
    proc = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True)
    links = json.loads(proc.stdout or "[]")
    return [link["ifname"] for link in links if link["ifname"] == BRIDGE or link.get("master") == BRIDGE]


def _live_netns() -> set[int]:
    inodes = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                inodes.add(os.stat(entry / "ns" / "net").st_ino)
            except OSError:
                continue
    return inodes


def remove_pod_netns() -> list[str]:
    """Unmount and delete the CRI's ``/run/netns/cni-*`` namespaces no process is in (those of
    the pods just killed; podman's are named ``netns-*`` and are not touched); return those left."""
    if not NETNS_DIR.is_dir():
        return []
    live = _live_netns()
    for entry in NETNS_DIR.glob("cni-*"):
        try:
            if os.stat(entry).st_ino in live:
                continue
        except OSError:
            continue
        subprocess.run(["umount", str(entry)], capture_output=True)
        try:
            entry.unlink()
        except OSError:
            pass
    return [str(e) for e in NETNS_DIR.glob("cni-*") if os.stat(e).st_ino not in live]


def remove_links() -> list[str]:
    """Delete the pods' veths and the ``cni0`` bridge; return the names still present."""
    for name in sorted(bridge_links(), key=lambda n: n == BRIDGE):
        subprocess.run(["ip", "link", "delete", name], capture_output=True)
    return bridge_links()


def _ours(chain: str, rule: str) -> bool:
    return chain.startswith("KUBE-") or (chain.startswith("CNI-") and f'name: \\"{NETWORK_NAME}\\"' in rule)


def node_chains() -> dict[str, list[str]]:
    """``"<iptables binary> <table>"`` -> the node's chains there: every ``KUBE-*`` chain and the
    ``CNI-*`` chains a rule commented with this network's name jumps to."""
    found: dict[str, list[str]] = {}
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary) is None:
            continue
        for table in ("filter", "nat", "mangle", "raw"):
            proc = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True)
            if proc.returncode != 0:
                continue
            chains = set()
            for line in proc.stdout.splitlines():
                words = line.split()
                if words[:1] == ["-N"] and words[1].startswith("KUBE-"):
                    chains.add(words[1])
                if "-j" in words:
                    target = words[words.index("-j") + 1]
                    if _ours(target, line):
                        chains.add(target)
            if chains:
                found[f"{binary} {table}"] = sorted(chains)
    return found


def remove_iptables() -> dict[str, list[str]]:
    """Delete the rules jumping to the node's chains, then the chains; return :func:`node_chains` after."""
    for key, chains in node_chains().items():
        binary, table = key.split()
        ipt = [binary, "-w", "-t", table]
        rules = subprocess.run(ipt + ["-S"], capture_output=True, text=True).stdout.splitlines()
        for line in rules:
            words = shlex.split(line)
            if words[:1] == ["-A"] and "-j" in words and words[words.index("-j") + 1] in chains \
                    and words[1] not in chains:
                subprocess.run(ipt + ["-D", *words[1:]], capture_output=True)
        for chain in chains:
            subprocess.run(ipt + ["-F", chain], capture_output=True)
        for chain in chains:
            subprocess.run(ipt + ["-X", chain], capture_output=True)
    return node_chains()


def remove_cgroups() -> list[str]:
    """Remove the ``kubepods`` cgroup trees (deepest first); return the directories left."""
    for root in kubepods_dirs():
        for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                path.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass
    return [str(p) for p in kubepods_dirs()]


def remove_container_log_links(cluster_dir: Path) -> None:
    """Remove the kubelet's ``/var/log/containers`` links into this cluster's pod logs."""
    logs = Path("/var/log/containers")
    target = str(node_dir(cluster_dir) / "pod-logs")
    for link in logs.glob("*.log") if logs.is_dir() else ():
        if link.is_symlink() and os.readlink(link).startswith(target):
            link.unlink()


def remove_cni_cache() -> None:
    """Delete libcni's cached results of this network's sandboxes (and their loopback entries)."""
    if not CNI_CACHE.is_dir():
        return
    sandboxes = {f.name[len(NETWORK_NAME) + 1:].rsplit("-", 1)[0] for f in CNI_CACHE.glob(f"{NETWORK_NAME}-*")}
    for entry in CNI_CACHE.iterdir():
        if entry.name.startswith(f"{NETWORK_NAME}-") or any(f"-{s}-" in entry.name for s in sandboxes):
            entry.unlink(missing_ok=True)


def cleanup(cluster_dir: Path) -> list[str]:
    """Remove what the node left on the machine once its processes are gone (see the module
    docstring); return descriptions of what could not be removed (normally none)."""
    left: list[str] = []
    alive = kill_pod_processes()
    if alive:
        left.append(f"pod processes {sorted(alive)}")
    still_mounted = unmount_under(cluster_dir)
    if still_mounted:
        left.append(f"mounts {still_mounted}")
    netns = remove_pod_netns()
    if netns:
        left.append(f"network namespaces {netns}")
    links = remove_links()
    if links:
        left.append(f"network devices {links}")
    chains = remove_iptables()
    if chains:
        left.append(f"iptables chains {chains}")
    groups = remove_cgroups()
    if groups:
        left.append(f"cgroups {groups}")
    remove_container_log_links(cluster_dir)
    remove_cni_cache()
    restore_host(cluster_dir)
    return left
