# issue 19 items 2-3, variable length, Mistral-7B shape, on the machine s19c.sh left warm: reference, product default
# spec (checkpointLayers auto), unsloth, product-all (checkpointLayers all). Run from a copy of the branch in .gpu/s19.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python -m pip install -q --no-index --find-links .whl bitsandbytes trl datasets liger-kernel pydantic pydantic-settings || exit 1
[ -d /tmp/us-site ] || python -m pip install -q --no-index --no-deps --no-compile --target /tmp/us-site .whl/unsloth/*.whl || exit 1
gunzip -kf .whl/tok/tokenizer.json.gz
date -u
B=.gpu/s19/bench/bench_qlora.py
V1='all={"training":{"checkpointLayers":"all"}}'
python $B --shape mistral-7b --tokenizer .whl/tok --unsloth-site /tmp/us-site --data variable \
  --variants reference,product,unsloth,product-all --product-variant "$V1" \
  --steps 17 --warmup 3 --max-train-s 20 --deadline $((300 - SECONDS)) --model-dir $PWD/out/mistral --out /tmp/bv > /tmp/bv.log 2>&1
tail -20 /tmp/bv.log
cp /tmp/bv.log $OUT/
tar czf $OUT/d-var.tgz /tmp/bv/results.* /tmp/bv/runs /tmp/bv/logs 2>/dev/null
date -u
