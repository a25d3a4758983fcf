#!/bin/sh
# Fetch llama.cpp's Hugging Face -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/gguf,
# LICENSE) from the pinned llama-cpp-python sdist on PyPI (hack/versions.env: version and sha256),
# with pip download (the sdist: --no-binary llama-cpp-python, --no-deps; pip prepares its metadata with
# binary wheels of its build backend, so no compiler is needed), and extract it into
#   ${QLORA_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator/llama.cpp/llama-cpp-python-<version>}
# (what qlora_trainer.export.converter_dir() looks at). Idempotent: a complete copy (.complete) is kept.
# PIP: the pip command (default: python3 -m pip). Used by `make converter` and Dockerfile.trainer.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
. "$here/versions.env"
version=$LLAMA_CPP_PYTHON_VERSION
dest=${QLORA_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator/llama.cpp/llama-cpp-python-$version}
if [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
${PIP:-python3 -m pip} download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$tmp/dl" >&2
sdist="$tmp/dl/llama_cpp_python-$version.tar.gz"
echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c - >&2
top="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$sdist" -C "$tmp" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py/gguf" "$top/LICENSE"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$tmp/$top" "$dest.partial"
echo "llama-cpp-python==$version sha256:$LLAMA_CPP_PYTHON_SHA256" > "$dest.partial/.complete"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "$dest"
