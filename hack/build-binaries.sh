#!/usr/bin/env bash
# Builds the local cluster's binaries from Go modules with the ordinary go client
# and caches them outside the clone, keyed by version:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator/bin/<name>-<version>/<name>
# A component whose cached binary exists is not rebuilt, so a warm run is a no-op.
# Prints the bin directory of each component as NAME=DIR lines on stdout's last lines.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator"
bin="$cache/bin"
mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:--mod=mod}"
export CGO_ENABLED=0
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

log() { printf '[build-binaries] %s\n' "$*" >&2; }

# have NAME VERSION: the cached binary exists and is executable.
have() { [ -x "$bin/$1-$2/$1" ]; }

# install_into NAME VERSION CMD...: run CMD with $out set to a temp dir, then move
# the result into the cache atomically so a killed build never leaves half a binary.
install_into() {
  local name="$1" version="$2"; shift 2
  local tmp; tmp="$(mktemp -d "$bin/.tmp-$name-XXXXXX")"
  local start=$SECONDS
  out="$tmp" "$@"
  mkdir -p "$bin/$name-$version"
  mv -f "$tmp/$name" "$bin/$name-$version/$name"
  rm -rf "$tmp"
  log "built $name $version in $((SECONDS - start))s"
}

k8s_ldflags() {
  local minor; minor="$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  local p=k8s.io/component-base/version
  local c=k8s.io/client-go/pkg/version
  local flags="-s -w"
  for pkg in $p $c; do
    flags="$flags -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags="$flags -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
  done
  echo "$flags"
}

build_k8s() {
  (cd "$here/k8s" && go build -trimpath -ldflags "$(k8s_ldflags)" -o "$out/$name" "k8s.io/kubernetes/cmd/$name")
}
# kubelet and kube-proxy run only with the real node (LocalCluster(node="real")).
for name in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  if ! have "$name" "$KUBERNETES_VERSION"; then
    log "building $name $KUBERNETES_VERSION (cold builds take tens of minutes on 2 cores)"
    install_into "$name" "$KUBERNETES_VERSION" build_k8s
  fi
done

name=etcd
build_etcd() { (cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out/etcd" .); }
if ! have etcd "$ETCD_VERSION"; then
  log "building etcd $ETCD_VERSION"
  install_into etcd "$ETCD_VERSION" build_etcd
fi

name=minio
build_minio() {
  local p=github.com/minio/minio/cmd
  GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X $p.Version=${MINIO_RELEASE#RELEASE.} -X $p.ReleaseTag=$MINIO_RELEASE -X $p.CommitID=$MINIO_VERSION" \
    "github.com/minio/minio@$MINIO_VERSION"
}
if ! have minio "$MINIO_VERSION"; then
  log "building minio $MINIO_VERSION"
  install_into minio "$MINIO_VERSION" build_minio
fi

name=helm
# helm's default Kubernetes version for `helm template`/`lint` comes from ldflags too
# (its own Makefile sets them); without them it assumes v1.20. The cache key carries it.
kube_minor="$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
HELM_KEY="$HELM_VERSION-kube1.$kube_minor"
build_helm() {
  local flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  flags="$flags -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    flags="$flags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kube_minor"
  done
  GOBIN="$out" go install -trimpath -ldflags "$flags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}
if ! have helm "$HELM_KEY"; then
  log "building helm $HELM_VERSION (default Kubernetes 1.$kube_minor)"
  install_into helm "$HELM_KEY" build_helm
fi

name=coredns
# CoreDNS (cluster DNS of the real node). Its main package is the module root; the version
# string comes from coremain.CoreVersion, a constant, so no ldflags are needed.
build_coredns() { GOBIN="$out" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"; }
if ! have coredns "$COREDNS_VERSION"; then
  log "building coredns $COREDNS_VERSION"
  install_into coredns "$COREDNS_VERSION" build_coredns
fi

name=kueue
# Kueue (DESIGN.md section 5): started on demand by hack/localcluster/kueue.py. Its go.mod asks
# for go 1.25, which the installed toolchain serves; GitCommit is the module's version as no git
# checkout exists in the module cache.
build_kueue() {
  local p=sigs.k8s.io/kueue/pkg/version
  GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X $p.GitVersion=$KUEUE_VERSION -X $p.GitCommit=$KUEUE_VERSION -X $p.BuildDate=$build_date" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
}
if ! have kueue "$KUEUE_VERSION"; then
  log "building kueue $KUEUE_VERSION"
  install_into kueue "$KUEUE_VERSION" build_kueue
fi

for pair in kube-apiserver:$KUBERNETES_VERSION kube-controller-manager:$KUBERNETES_VERSION \
            kube-scheduler:$KUBERNETES_VERSION kubectl:$KUBERNETES_VERSION kubelet:$KUBERNETES_VERSION \
            kube-proxy:$KUBERNETES_VERSION etcd:$ETCD_VERSION \
            minio:$MINIO_VERSION helm:$HELM_KEY kueue:$KUEUE_VERSION coredns:$COREDNS_VERSION; do
  echo "${pair%%:*}=$bin/${pair%%:*}-${pair#*:}/${pair%%:*}"
done
