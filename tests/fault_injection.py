"""`python fault_injection.py FAULT STEP [overrides]`: qlora.train with a fault injected at a training step.

FAULT is one of
  sigkill-in-save  SIGKILL while checkpoint-STEP is being written (after transformers' files, before the rename)
  sigterm          SIGTERM at the start of step STEP
  sigterm-twice    SIGTERM twice at the start of step STEP
  sigterm-rank-1   SIGTERM at the start of step STEP, in the process of rank 1 only (under accelerate launch)
  sigkill-rank-1   SIGKILL at the start of step STEP, in the process of rank 1 only
  sigterm-in-start-up     SIGTERM while the quantized model loads, before training (STEP is not used)
  sigterm-in-final-save   SIGTERM while the final adapter is written, after its weights (STEP is not used)
Run as a subprocess by the tests, exactly like `python -m qlora.train`, so a hard kill kills only it. Launched with an
FSDP config on a machine without GPUs, it trains with FSDP on the CPU (tests/fsdp_on_cpu.py).
With QLORA_TEST_TOKENIZED_LOG=PATH set, every process also appends its rank to PATH for each example it tokenizes
itself (an example read back from the datasets cache is not tokenized again, so it is not counted).
"""

import os
import signal
import sys

import peft
import torch
from accelerate.utils import parse_flag_from_env
from transformers import TrainerCallback

import qlora.data.tokenization
import qlora.pipeline
import qlora.stages.checkpoints
from fsdp_on_cpu import allow_fsdp_on_cpu
from qlora.train import main


class SignalAtStep(TrainerCallback):
    def __init__(self, step: int, times: int, signum: int = signal.SIGTERM):
        self.step, self.times, self.signum = step, times, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def inject(fault: str, step: int) -> None:
    if fault == "sigkill-in-save":
        fsync_tree = qlora.stages.checkpoints._fsync_tree

        def kill_while_saving(folder):
            if folder.name == f"checkpoint-{step}":
                os.kill(os.getpid(), signal.SIGKILL)
            fsync_tree(folder)

        qlora.stages.checkpoints._fsync_tree = kill_while_saving
        return
    if fault == "sigterm-in-start-up":
        load_quantized_model = qlora.pipeline.load_quantized_model

        def signalled_while_loading(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return load_quantized_model(*args, **kwargs)

        qlora.pipeline.load_quantized_model = signalled_while_loading
        return
    if fault == "sigterm-in-final-save":
        save_pretrained = peft.PeftModel.save_pretrained

        def signalled_while_saving(model, folder, *args, **kwargs):
            save_pretrained(model, folder, *args, **kwargs)
            if str(folder).endswith("adapter.partial"):
                os.kill(os.getpid(), signal.SIGTERM)

        peft.PeftModel.save_pretrained = signalled_while_saving
        return
    build_trainer = qlora.pipeline.build_trainer
    if fault.endswith("-rank-1") and os.environ.get("RANK") != "1":
        return
    callback = SignalAtStep(step, times=2 if fault == "sigterm-twice" else 1,
                            signum=signal.SIGKILL if fault.startswith("sigkill") else signal.SIGTERM)
    # build_trainer(config, model, tokenizer, train, run_dir, validation, callbacks, resuming)
    qlora.pipeline.build_trainer = lambda *args: build_trainer(*args[:6], [*args[6], callback], *args[7:])


def count_tokenized_examples(path: str) -> None:
    tokenize_example = qlora.data.tokenization.tokenize_example

    def counted(example, **kwargs):
        with open(path, "a") as log:
            log.write(os.environ.get("RANK", "0") + "\n")
        return tokenize_example(example, **kwargs)

    qlora.data.tokenization.tokenize_example = counted


if __name__ == "__main__":
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not torch.cuda.is_available():
        allow_fsdp_on_cpu()
    fault, step = sys.argv[1], int(sys.argv[2])
    inject(fault, step)
    if os.environ.get("QLORA_TEST_TOKENIZED_LOG"):
        count_tokenized_examples(os.environ["QLORA_TEST_TOKENIZED_LOG"])
    sys.argv[1:] = sys.argv[3:]
    main()
