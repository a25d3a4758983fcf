"""A real, local Kubernetes control plane and S3 server for tests and the demo.

DESIGN.md section 5. The pieces:

- :mod:`localcluster.binaries` finds (or builds) the pinned etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, kubectl, MinIO and helm binaries.
- :mod:`localcluster.certs` generates the cluster's PKI.
- :mod:`localcluster.cluster` starts and stops everything (:class:`LocalCluster`).
- :mod:`localcluster.node_agent` is the stand-in for a kubelet: it registers Nodes
  and runs the pods bound to them as local processes.
- ``python -m localcluster up|down|status`` is what ``make cluster-up`` and
  ``make cluster-down`` call.
"""

from localcluster.cluster import ClusterStartError, LocalCluster

__all__ = ["ClusterStartError", "LocalCluster"]
