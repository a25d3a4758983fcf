"""FSDP-QLoRA smoke on one GPU through the real CLI: a tiny random Llama, torchrun --nproc-per-node 1, parallelism fsdp.
Also a single-process run of the same config for comparison. Prints the events and the results."""
import json, os, subprocess, sys, time
from pathlib import Path
import torch
W = Path("/tmp/fsdp-smoke"); W.mkdir(exist_ok=True)
def build():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(".whl/tok")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(W / "model"); tok.save_pretrained(W / "model")
build()
def cfg(out, par):
    return {"model": {"uri": f"file://{W}/model"},
            "dataset": {"uri": f"file://{os.path.abspath('.whl/data/train.jsonl')}", "evalUri": f"file://{os.path.abspath('.whl/data/eval.jsonl')}", "format": "chat"},
            "lora": {"dropout": 0.0},
            "training": {"maxSteps": 6, "microBatchSize": 2, "gradientAccumulationSteps": 2, "maxSeqLength": 256,
                         "checkpointEverySteps": 3, "evalEverySteps": 1000, "parallelism": par, "learningRate": 1e-3},
            "output": {"uri": f"file://{out}"}}
def run(name, par, torchrun):
    (W / f"{name}.json").write_text(json.dumps(cfg(W / f"out-{name}", par)))
    env = dict(os.environ, QLORA_CACHE_DIR=str(W / f"cache-{name}"), QLORA_TERMINATION_MESSAGE_PATH=str(W / f"{name}.term"))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29711"] if torchrun else []) + ["-m", "qlora_trainer.cli", "--config", str(W / f"{name}.json")]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    ev = [l for l in p.stderr.splitlines() if l.startswith('{"event"')]
    print(f"== {name} rc={p.returncode} {time.time()-t:.0f}s")
    for l in ev:
        if any(k in l for k in ('"train_step"', '"eval_after"', '"eval_before"', '"error"', '"memory_estimate"', '"checkpoint"', '"adapter"')):
            print(l[:400])
    if p.returncode:
        print("\n".join(l for l in p.stderr.splitlines() if not l.startswith("{"))[-4000:])
    term = W / f"{name}.term"
    print(term.read_text()[:1500] if term.exists() else "no term")
    ad = W / f"out-{name}" / "adapter"
    if ad.exists():
        print(sorted(x.name for x in ad.iterdir()))
        from safetensors.torch import load_file
        sd = load_file(ad / "adapter_model.safetensors")
        print("adapter tensors", len(sd), sorted(sd)[:2], {str(v.dtype) for v in sd.values()}, sum(v.numel() for v in sd.values()))
run("single", "auto", False)
run("fsdp1", "fsdp", True)
