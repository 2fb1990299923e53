"""Host time of one LoRA layer call, peft's layers against performance.fused_lora, on the CPU.

    python scripts/benchmarks/lora_layer_overhead.py

The shipped tiny model's first q_proj on a 2-token input, one thread: the arithmetic is negligible, so the time is
what Python and the dispatcher spend per call, the part that bounds a GPU step when the GPU waits for the host.
"""

from __future__ import annotations

import time

import torch

from qlora.compose import compose_config
from qlora.stages.adapters import attach_lora
from qlora.stages.model import load_quantized_model, prepare_for_kbit_training

CALLS = 2000


def main() -> None:
    torch.set_num_threads(1)
    config = compose_config(["lora.dropout=0.05"])
    for fused in (False, True):
        model = load_quantized_model(config.model, config.quantization, torch.device("cpu"))
        model = attach_lora(prepare_for_kbit_training(model, False), config.lora, fused=fused).train()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(1, 2, layer.in_features, requires_grad=True)
        for _ in range(50):
            layer(x).sum().backward()
        start = time.perf_counter()
        for _ in range(CALLS):
            layer(x)
        forward = (time.perf_counter() - start) / CALLS
        start = time.perf_counter()
        for _ in range(CALLS):
            layer(x).sum().backward()
        both = (time.perf_counter() - start) / CALLS
        print(f"{'fused' if fused else 'peft'}: forward {forward * 1e6:.0f} us, forward + backward {both * 1e6:.0f} us")


if __name__ == "__main__":
    main()
