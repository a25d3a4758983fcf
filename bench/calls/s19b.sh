# issue 19 item 4: Llama-3-8B shape (128,256 vocabulary), fixed length 512: reference (short), product default spec
# (checkpointLayers auto), product-all (checkpointLayers all). Run from a copy of the branch in .gpu/s19.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python -m pip install -q --no-index --find-links .whl bitsandbytes trl datasets liger-kernel pydantic pydantic-settings || exit 1
gunzip -kf .whl/tok/tokenizer.json.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
B=.gpu/s19/bench/bench_qlora.py
V1='all={"training":{"checkpointLayers":"all"}}'
python $B --shape llama3-8b --tokenizer .whl/tok --data fixed --variants reference,product,product-all \
  --product-variant "$V1" --steps 12 --warmup 3 --max-train-s 20 --deadline $((570 - SECONDS)) \
  --model-dir $PWD/out/llama --out /tmp/bl > /tmp/bl.log 2>&1
tail -22 /tmp/bl.log
cp /tmp/bl.log $OUT/
tar czf $OUT/b-llama.tgz /tmp/bl/results.* /tmp/bl/runs /tmp/bl/logs 2>/dev/null
date -u
