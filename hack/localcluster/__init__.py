"""A real, local Kubernetes control plane and S3 server for tests and the demo.

DESIGN.md section 5. The pieces:

- :mod:`localcluster.binaries` finds (or builds) the pinned etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy, CoreDNS, MinIO,
  helm and Kueue binaries.
- :mod:`localcluster.certs` generates the cluster's PKI.
- :mod:`localcluster.cluster` starts and stops everything (:class:`LocalCluster`).
- :mod:`localcluster.realnode` is the real node: containerd, runc, CNI, the kubelet,
  kube-proxy and CoreDNS; :mod:`localcluster.nodeimages` builds and imports its small images.
- ``python -m localcluster up|down|status`` is what ``make cluster-up`` and
  ``make cluster-down`` call.
"""

from localcluster.cluster import ClusterStartError, LocalCluster

__all__ = ["ClusterStartError", "LocalCluster"]
