"""Fine-tune with LoRA in a plain DeepSpeed ZeRO-3 loop; the last call saves the checkpoint and exports
the merged model (zero2merged.api.integrations.export_engine), verified, ready to serve.

    deepspeed --num_gpus 8 examples/train_custom_loop.py --base-model meta-llama/Llama-3.2-1B --output-dir out
    # on CPUs (how the tests run it): DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ...

Replace the synthetic batches with yours. The checkpoint lands in OUTPUT_DIR/checkpoint, the merged model
in OUTPUT_DIR/merged.
"""

import argparse

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from zero2merged.api.integrations import export_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()

    deepspeed.init_distributed()
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
    torch.manual_seed(0)  # every rank starts from the same LoRA matrices
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    generator = torch.Generator().manual_seed(dist.get_rank())  # synthetic batches: put yours here
    vocab = model.config.vocab_size
    for _ in range(args.steps):
        ids = torch.randint(4, vocab, (2, 32), generator=generator).to(engine.device)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    report = export_engine(engine, f"{args.output_dir}/checkpoint", f"{args.output_dir}/merged")
    if dist.get_rank() == 0:
        print(report.summary())


if __name__ == "__main__":
    main()
