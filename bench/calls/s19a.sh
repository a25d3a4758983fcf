# issue 19 items 2-3 (selective checkpointing, allocator): Mistral-7B shape, fixed then variable length, one call.
# Variants: reference (4 x 4), product = default spec (guide's 4 x 4; autoMicroBatch, checkpointLayers auto,
# expandable segments), product-all = checkpointLayers all (every layer checkpointed), product-allX = all + PyTorch's
# default allocator (= the product before this branch), unsloth (16 x 1). Run from a copy of the branch in .gpu/s19.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python -m pip install -q --no-index --find-links .whl bitsandbytes trl datasets liger-kernel pydantic pydantic-settings || exit 1
python -m pip install -q --no-index --no-deps --no-compile --target /tmp/us-site .whl/unsloth/*.whl || exit 1
gunzip -kf .whl/tok/tokenizer.json.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
B=.gpu/s19/bench/bench_qlora.py
V1='all={"training":{"checkpointLayers":"all"}}'
V2='allX={"training":{"checkpointLayers":"all"},"benchAllocConf":"expandable_segments:False"}'
COMMON="--shape mistral-7b --tokenizer .whl/tok --unsloth-site /tmp/us-site --steps 17 --warmup 3 --max-train-s 25 --model-dir $PWD/out/mistral"
python $B $COMMON --data fixed --variants reference,product,product-all,unsloth,product-allX \
  --product-variant "$V1" --product-variant "$V2" --deadline $((320 - SECONDS)) --out /tmp/bm > /tmp/bm.log 2>&1
tail -22 /tmp/bm.log
cp /tmp/bm.log $OUT/
tar czf $OUT/a-fixed.tgz /tmp/bm/results.* /tmp/bm/runs /tmp/bm/logs 2>/dev/null
date -u
python $B $COMMON --data variable --variants reference,product,product-all,unsloth,product-allX \
  --product-variant "$V1" --product-variant "$V2" --deadline $((575 - SECONDS)) --out /tmp/bv > /tmp/bv.log 2>&1
tail -22 /tmp/bv.log
cp /tmp/bv.log $OUT/
tar czf $OUT/a-var.tgz /tmp/bv/results.* /tmp/bv/runs /tmp/bv/logs 2>/dev/null
date -u
