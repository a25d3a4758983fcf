"""GPU memory calibration sweep for qlora_trainer.estimate (one H200, one process).

Builds a random-weight Mistral-7B-shaped model (vocab 32000), loads it 4-bit once with the
product's own loader (qlora_trainer.model.load_base_4bit), then for each variant wraps LoRA,
trains a few optimizer steps with the product's SFTConfig (packing, padding-free), and records
peak allocated/reserved GPU memory. Prints one JSON line per variant.
"""
import gc, json, os, sys, time
import torch

sys.path.insert(0, "trainer")
from qlora_trainer.config import LoraSettings, QuantizationConfig, TrainingConfig
from qlora_trainer import model as qm

GIB = 2**30
MODEL = os.environ.get("CALIB_MODEL", "/tmp/m7b-v32k")
VOCAB = int(os.environ.get("CALIB_VOCAB", "32000"))


def build():
    if os.path.exists(os.path.join(MODEL, "config.json")):
        return
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM
    tok = AutoTokenizer.from_pretrained(".whl/tok")
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=1e6, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    t = time.time()
    with torch.device("cuda"):
        m = MistralForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(MODEL, max_shard_size="5GB")
    tok.save_pretrained(MODEL)
    del m
    gc.collect(); torch.cuda.empty_cache()
    print(json.dumps({"built": MODEL, "s": round(time.time() - t, 1)}), flush=True)


VARIANTS = [
    # name, targets, r, dropout, mb, seq, gc, optim
    ("qkvo-mb4-s512-gc-adamw", ["q_proj", "k_proj", "v_proj", "o_proj"], 16, 0.05, 4, 512, True, "adamw_torch_fused"),
    ("all-mb4-s512-gc-paged8", ["all-linear"], 16, 0.05, 4, 512, True, "paged_adamw_8bit"),
    ("all-mb4-s512-gc-adamw", ["all-linear"], 16, 0.05, 4, 512, True, "adamw_torch"),
    ("all-mb1-s512-gc-adamw", ["all-linear"], 16, 0.05, 1, 512, True, "adamw_torch"),
    ("all-mb1-s2048-gc-adamw", ["all-linear"], 16, 0.05, 1, 2048, True, "adamw_torch"),
    ("all-mb2-s4096-gc-adamw", ["all-linear"], 16, 0.05, 2, 4096, True, "adamw_torch"),
    ("all-mb1-s512-nogc-adamw", ["all-linear"], 16, 0.05, 1, 512, False, "adamw_torch"),
    ("all-mb2-s1024-nogc-adamw", ["all-linear"], 16, 0.05, 2, 1024, False, "adamw_torch"),
    ("qkvo-mb4-s512-gc-adamw-nodrop", ["q_proj", "k_proj", "v_proj", "o_proj"], 16, 0.0, 4, 512, True, "adamw_torch"),
    ("all-r64-mb4-s512-gc-adamw", ["all-linear"], 64, 0.05, 4, 512, True, "adamw_torch"),
]


def main():
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    torch.cuda.init()
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16); (x @ x).sum().item(); del x
    free, total = torch.cuda.mem_get_info()
    print(json.dumps({"context_used_gib": round((total - free - torch.cuda.memory_reserved()) / GIB, 3),
                      "total_gib": round(total / GIB, 2)}), flush=True)
    build()
    only = os.environ.get("CALIB_ONLY")
    variants = [v for v in VARIANTS if not only or v[0] in only.split(",")]
    hw = qm.Hardware.detect()
    dtype = torch.bfloat16
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.pad_token = tok.eos_token
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    base = qm.load_base_4bit(MODEL, QuantizationConfig(doubleQuant=True, computeDtype="bfloat16"), dtype, hw,
                             gradient_checkpointing=True)
    free, total = torch.cuda.mem_get_info()
    print(json.dumps({"load_s": round(time.time() - t, 1), "weights_alloc_gib": round(torch.cuda.memory_allocated() / GIB, 4),
                      "load_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 4),
                      "dtypes": sorted({str(p.dtype) for p in base.parameters()}),
                      "embed_dtype": str(base.get_input_embeddings().weight.dtype)}), flush=True)
    g = torch.Generator().manual_seed(0)
    for name, targets, r, dropout, mb, seq, gc_on, optim in variants:
        try:
            if gc_on:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_disable()
            steps = 3
            ids = torch.randint(3, VOCAB - 1, (mb * steps, seq), generator=g).tolist()
            ds = Dataset.from_dict({"input_ids": ids})
            cfg = TrainingConfig.model_validate({
                "model": {"uri": f"file://{MODEL}"}, "dataset": {"uri": "file:///tmp/none.jsonl"},
                "output": {"uri": "file:///tmp/calib-out"},
                "lora": {"r": r, "alpha": 2 * r, "dropout": dropout, "targetModules": targets},
                "training": {"maxSteps": steps, "microBatchSize": mb, "gradientAccumulationSteps": 1,
                             "maxSeqLength": seq, "gradientCheckpointing": gc_on, "optimizer": optim,
                             "checkpointEverySteps": 1000000, "evalEverySteps": 1000000, "precision": "bf16"},
            })
            peft = get_peft_model(base, qm.lora_config(cfg.lora))
            qm.adapter_to_float32(peft)
            args = qm.sft_config(cfg, "/tmp/calib-run", hw, dtype, with_eval=False)
            args.save_strategy = "no"
            trainer = SFTTrainer(model=peft, args=args, train_dataset=ds, processing_class=tok)
            qm.adapter_to_float32(trainer.model)
            gc.collect(); torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            trainer.train()
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            rec = {"variant": name, "mb": mb, "seq": seq, "gc": gc_on, "r": r, "dropout": dropout, "optim": optim,
                   "targets": targets, "before_train_gib": round(before / GIB, 4),
                   "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 4),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 4),
                   "used_by_process_gib": round((total - free) / GIB, 3),
                   "trainable": sum(p.numel() for p in peft.parameters() if p.requires_grad),
                   "s": round(time.time() - t, 1)}
            print(json.dumps(rec), flush=True)
        except Exception as err:  # keep going
            print(json.dumps({"variant": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}), flush=True)
        finally:
            try:
                del trainer
            except NameError:
                pass
            try:
                base = peft.unload()
                del peft
            except Exception as err:
                print(json.dumps({"unload_error": str(err)[:200]}), flush=True)
            gc.collect(); torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
