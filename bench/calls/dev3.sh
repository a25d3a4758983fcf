# call 3: issue 22 quality on the GPU (embedded SmolLM2-135M), then the Llama-3-8B row (issue 19 item 4)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python -m pip install -q --no-index --find-links .whl bitsandbytes trl datasets liger-kernel pydantic pydantic-settings || exit 1
gunzip -kf .whl/tok/tokenizer.json.gz
export PYTHONPATH=$PWD/.gpu/wt/pk
M=$PWD/out/models/smollm2-135m-instruct
date -u
for s in 24 60 240; do
  timeout 100 python .gpu/wt/bench/quality.py --device cuda --model-dir $M --steps $s --skip-merge --out /tmp/q$s > /tmp/q$s.log 2>&1
  echo "quality steps $s rc $?"; tail -12 /tmp/q$s.log
done
date -u
python .gpu/wt/bench/bench_qlora.py --shape llama3-8b --tokenizer .whl/tok --data fixed \
  --variants reference,product --steps 10 --warmup 3 --max-train-s 20 --deadline $((390 - SECONDS)) --model-dir out/llama --out /tmp/bl > /tmp/bl.log 2>&1
tail -30 /tmp/bl.log
cp /tmp/bl.log /tmp/q*.log $OUT/ 2>/dev/null
tar czf $OUT/c3.tgz /tmp/q*/results.* /tmp/bl/results.* /tmp/bl/runs /tmp/bl/logs 2>/dev/null
date -u
