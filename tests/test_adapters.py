"""The saved adapter is plain peft: reloaded on a fresh 4-bit base, it gives the trained logits."""

import torch
from peft import PeftModel

from qlora.data import load_sft_dataset
from qlora.stages.adapters import attach_lora
from qlora.stages.artifacts import prepare_run_dir, save_adapter
from qlora.stages.model import load_quantized_model, load_tokenizer, prepare_for_kbit_training
from qlora.stages.trainer import build_trainer

CPU = torch.device("cpu")


def test_reloaded_adapter_gives_the_trained_logits(tiny_config):
    config = tiny_config("training.max_steps=5")
    run_dir = prepare_run_dir(config)
    tokenizer = load_tokenizer(config.model)
    dataset = load_sft_dataset(config.data.path, config.data.format)
    model = load_quantized_model(config.model, config.quantization, CPU)
    model = attach_lora(prepare_for_kbit_training(model, False), config.lora)
    trainer = build_trainer(config, model, tokenizer, dataset, run_dir)
    trainer.train()
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # LoRA B starts at zero: training moved it
    adapter_dir = save_adapter(trainer.model, tokenizer, run_dir)

    batch = tokenizer([dataset[0]["prompt"] + dataset[0]["completion"]], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        trained_logits = model(**batch).logits
        fresh_base = load_quantized_model(config.model, config.quantization, CPU)
        reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir).eval()
        reloaded_logits = reloaded(**batch).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=1e-4, atol=1e-4)
    assert not (adapter_dir.parent / "adapter.partial").exists()
