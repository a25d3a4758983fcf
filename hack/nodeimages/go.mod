// Static programs for the real node's small images (hack/localcluster/nodeimages.py):
// the pod sandbox's pause process and a probe the real-node tests run in pods.
// Standard library only, built with CGO_ENABLED=0 into FROM scratch images.
module qlora.dev/hack/nodeimages

go 1.24.0
