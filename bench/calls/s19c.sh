# issue 19 items 2-4 in one call (device time was short): Mistral-7B shape fixed 512 (reference, product default
# spec = checkpointLayers auto + expandable segments, product-all = checkpointLayers all, unsloth, product-allX = all +
# PyTorch's default allocator = the product before this branch), then the Llama-3-8B shape fixed 512 (reference short,
# product default). Run from a copy of the branch in .gpu/s19.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python -m pip install -q --no-index --find-links .whl bitsandbytes trl datasets liger-kernel pydantic pydantic-settings || exit 1
python -m pip install -q --no-index --no-deps --no-compile --target /tmp/us-site .whl/unsloth/*.whl || exit 1
gunzip -kf .whl/tok/tokenizer.json.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
B=.gpu/s19/bench/bench_qlora.py
V1='all={"training":{"checkpointLayers":"all"}}'
V2='allX={"training":{"checkpointLayers":"all"},"benchAllocConf":"expandable_segments:False"}'
python $B --shape mistral-7b --tokenizer .whl/tok --unsloth-site /tmp/us-site --data fixed \
  --variants reference,product,product-all,unsloth,product-allX --product-variant "$V1" --product-variant "$V2" \
  --steps 17 --warmup 3 --max-train-s 25 --deadline $((315 - SECONDS)) --model-dir $PWD/out/mistral --out /tmp/bm > /tmp/bm.log 2>&1
tail -20 /tmp/bm.log
cp /tmp/bm.log $OUT/
tar czf $OUT/c-mistral.tgz /tmp/bm/results.* /tmp/bm/runs /tmp/bm/logs 2>/dev/null
rm -rf $PWD/out/mistral
date -u
python $B --shape llama3-8b --tokenizer .whl/tok --data fixed --variants reference,product,product-all \
  --product-variant "$V1" --steps 10 --warmup 3 --max-train-s 15 --deadline $((588 - SECONDS)) \
  --model-dir $PWD/out/llama --out /tmp/bl > /tmp/bl.log 2>&1
tail -20 /tmp/bl.log
cp /tmp/bl.log $OUT/
tar czf $OUT/c-llama.tgz /tmp/bl/results.* /tmp/bl/runs /tmp/bl/logs 2>/dev/null
date -u
