# call 4: Mistral-7B, fused LoRA / selective checkpointing / default layout (issue 19 items 2-3)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python -m pip install -q --no-index --find-links .whl bitsandbytes trl datasets liger-kernel pydantic pydantic-settings || exit 1
gunzip -kf .whl/tok/tokenizer.json.gz
date -u
V1='off={"training":{"activationOffloading":true}}'
V2='offU={"training":{"activationOffloading":true,"fusedLora":false}}'
V3='offK2={"training":{"activationOffloading":true},"benchNoCheckpointLayers":2}'
python .gpu/wt/bench/bench_qlora.py --shape mistral-7b --tokenizer .whl/tok --data fixed \
  --variants reference,product-offU,product-off,product,product-offK2 \
  --product-variant "$V1" --product-variant "$V2" --product-variant "$V3" \
  --steps 17 --warmup 3 --max-train-s 25 --deadline $((260 - SECONDS)) --model-dir out/mistral --out /tmp/bm > /tmp/bm.log 2>&1
tail -25 /tmp/bm.log
python .gpu/wt/bench/bench_qlora.py --shape mistral-7b --tokenizer .whl/tok --data variable \
  --variants reference,product-off,product-offU \
  --product-variant "$V1" --product-variant "$V2" \
  --steps 17 --warmup 3 --max-train-s 25 --deadline $((410 - SECONDS)) --model-dir out/mistral --out /tmp/bv > /tmp/bv.log 2>&1
tail -25 /tmp/bv.log
cp /tmp/bv.log $OUT/
tar czf $OUT/c4v.tgz /tmp/bv/results.* /tmp/bv/runs /tmp/bv/logs 2>/dev/null
tail -3 /tmp/bm.log
cp /tmp/bm.log $OUT/
tar czf $OUT/c4.tgz /tmp/bm/results.* /tmp/bm/runs /tmp/bm/logs 2>/dev/null
date -u
