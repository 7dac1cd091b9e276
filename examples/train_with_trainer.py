"""Fine-tune with LoRA under DeepSpeed ZeRO-3 with the Hugging Face Trainer; the merged model is exported
when training ends (zero2merged's MergeOnTrainEnd callback), verified, ready to serve.

    deepspeed --num_gpus 8 examples/train_with_trainer.py --base-model meta-llama/Llama-3.2-1B --output-dir out
    # on CPUs (how the tests run it): DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ... --cpu

Replace the synthetic dataset with yours. The merged model lands in OUTPUT_DIR/merged.
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from zero2merged.api.integrations import MergeOnTrainEnd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="train on CPUs (DS_ACCELERATOR=cpu)")
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )

    generator = torch.Generator().manual_seed(0)  # a synthetic dataset: put yours here
    rows = torch.randint(4, min(len(tokenizer), 32000), (64, 32), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in rows]

    deepspeed_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": "auto"},
    }
    training = TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=deepspeed_config,
        bf16=True,
        use_cpu=args.cpu,
        per_device_train_batch_size=2,
        max_steps=args.steps,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    merge = MergeOnTrainEnd(f"{args.output_dir}/merged")  # the last step is saved, then converted
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[merge])
    trainer.train()
    if trainer.is_world_process_zero():
        print(merge.report.summary())


if __name__ == "__main__":
    main()
