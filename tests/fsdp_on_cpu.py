"""`python fsdp_on_cpu.py [overrides]` under `accelerate launch` with an FSDP config: qlora.train with torch's FSDP
(version 1) on CPU processes joined over gloo, for the tests on machines without GPUs.

accelerate applies FSDP to GPU-like devices only (CPU processes otherwise train as plain data parallel) and names
the CPU `cpu:0`, which FSDP takes for another device than its CPU modules'. Here accelerate's state is switched to
FSDP on `cpu` once it is created; wrapping with peft's auto-wrap policy, training, gathering the adapter and
checkpoints are then accelerate's, transformers' and qlora's own code. Launch with --fsdp_sync_module_states false
--fsdp_cpu_ram_efficient_loading false: both broadcast the weights from a GPU.
"""

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu() -> None:
    create = AcceleratorState.__init__

    def create_with_fsdp(self, *args, **kwargs):
        create(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")  # None when an existing state is only looked up
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin, self.device = DistributedType.FSDP, plugin, torch.device("cpu")

    AcceleratorState.__init__ = create_with_fsdp


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    from qlora.train import main

    main()
