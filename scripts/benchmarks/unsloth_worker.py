"""scripts/benchmark.py's unsloth recipe, in a process of its own with unsloth's own Python path.

unsloth pins versions of trl and datasets that qlora cannot use, so the benchmark starts this script with
PYTHONPATH set to unsloth's set of packages (../shared/device/README.md says how they are installed) and nothing of
qlora's. unsloth has to be imported before transformers. Its recipe is the one unsloth documents for QLoRA:
FastLanguageModel in 4-bit with bf16 compute, LoRA on the seven projections with unsloth's offloaded gradient
checkpointing, TRL's SFTTrainer with 8-bit AdamW, and gradient accumulation 1 set explicitly (unsloth turns on 2
by itself otherwise). Everything measured is measured as for the other recipes (training_run.measure).
"""

import unsloth  # noqa: F401  (before transformers: unsloth patches it on import)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_run import SHARED_HYPERPARAMETERS, add_worker_arguments, cap_gpu_memory, measure

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unsloth_recipe(args: argparse.Namespace, device: str):
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.checkpoint, max_seq_length=args.seq,
                                                         dtype=torch.bfloat16, load_in_4bit=True,
                                                         local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                             target_modules=LORA_TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=0)

    def build_trainer(dataset):
        sft = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                        gradient_accumulation_steps=1, max_steps=args.steps, **SHARED_HYPERPARAMETERS,
                        optim="adamw_8bit", bf16=True, max_length=args.seq, packing=False,
                        logging_steps=args.steps, save_strategy="no", report_to="none", seed=0, data_seed=0)
        return SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer)

    return build_trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_worker_arguments(parser)
    args = parser.parse_args()
    args.worker = args.worker or "unsloth"
    cap_gpu_memory(args.gpu_memory)
    result = measure(args, unsloth_recipe, "cuda")
    Path(args.result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
