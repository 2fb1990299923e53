"""Loading stages on the tiny model: real bitsandbytes layers, frozen base, trainable LoRA."""

import sys

import bitsandbytes as bnb
import bitsandbytes.cextension
import pytest
import torch

from qlora.config import QuantizationConfig
from qlora.errors import QLoRAError
from qlora.stages.adapters import attach_lora
from qlora.stages.model import build_bnb_config, check_device_support, load_quantized_model, load_tokenizer
from qlora.stages.model import prepare_for_kbit_training

CPU = torch.device("cpu")


def test_nf4_double_quant_layers(tiny_config):
    config = tiny_config()
    model = load_quantized_model(config.model, config.quantization, CPU)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization
    assert q_proj.weight.dtype == torch.uint8
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in full precision


def test_int8_layers(tiny_config):
    config = tiny_config("quantization=int8")
    model = load_quantized_model(config.model, config.quantization, CPU)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_bnb_config_for_4bit(method):
    bnb_config = build_bnb_config(QuantizationConfig(method=method, double_quant=False, compute_dtype="float16"))
    assert bnb_config.load_in_4bit and bnb_config.bnb_4bit_quant_type == method
    assert not bnb_config.bnb_4bit_use_double_quant
    assert bnb_config.bnb_4bit_compute_dtype == torch.float16


def test_no_quantization():
    assert build_bnb_config(QuantizationConfig(method="none", double_quant=False)) is None


def test_only_lora_parameters_train(tiny_config):
    config = tiny_config("lora.r=4")
    model = load_quantized_model(config.model, config.quantization, CPU)
    model = attach_lora(prepare_for_kbit_training(model, gradient_checkpointing=True), config.lora)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # all-linear: every projection of every layer, not the output head
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers
    assert model.peft_config["default"].r == 4
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4


def _lora_gradients(config, inference_first: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = load_quantized_model(config.model, config.quantization, CPU)
    model = attach_lora(prepare_for_kbit_training(model, gradient_checkpointing=False), config.lora)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    if inference_first:  # what the held-out check before training does
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_inference_before_training_leaves_the_gradients_unchanged(tiny_config):
    # bitsandbytes repacks 4-bit weights for CPU inference (with AVX512-BF16) at the first eval-mode forward
    # pass; its inference matmul has no backward, so the gradients of earlier layers' adapters went wrong
    config = tiny_config()
    after_inference = _lora_gradients(config, inference_first=True)
    plain = _lora_gradients(config, inference_first=False)
    assert after_inference.keys() == plain.keys()
    for name, grad in plain.items():
        assert torch.allclose(after_inference[name], grad), name
    # on any CPU: loading switches the repacking off
    layers = [m for m in load_quantized_model(config.model, config.quantization, CPU).modules()
              if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_missing_hub_model_is_a_clear_error(tiny_config):
    config = tiny_config("model.name_or_path=no-such-org/no-such-model")
    with pytest.raises(Exception, match="model.name_or_path=no-such-org/no-such-model"):
        load_tokenizer(config.model)


def test_bf16_on_a_gpu_without_bf16_is_an_early_error(tiny_config, monkeypatch):
    config = tiny_config("quantization.compute_dtype=bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    with pytest.raises(QLoRAError, match="Tesla T4 has no bfloat16 support.*quantization.compute_dtype=float16"):
        check_device_support(config.model, config.quantization, torch.device("cuda"))


def test_bitsandbytes_without_a_usable_backend_is_an_early_error(tiny_config, monkeypatch):
    config = tiny_config()
    monkeypatch.setattr(bnb.cextension, "lib", bnb.cextension.ErrorHandlerMockBNBNativeLibrary("no libcudart"))
    with pytest.raises(QLoRAError, match="no usable backend for the cuda device.*quantization=none"):
        check_device_support(config.model, config.quantization, torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(QLoRAError, match="needs bitsandbytes, which cannot be imported"):
        check_device_support(config.model, config.quantization, CPU)
    check_device_support(config.model, QuantizationConfig(method="none", double_quant=False), CPU)  # no bnb needed


def test_model_without_gradient_checkpointing_is_an_early_error(tiny_config, monkeypatch):
    config = tiny_config()
    model = load_quantized_model(config.model, config.quantization, CPU)
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    with pytest.raises(QLoRAError, match="does not support gradient checkpointing.*gradient_checkpointing=false"):
        prepare_for_kbit_training(model, gradient_checkpointing=True)
