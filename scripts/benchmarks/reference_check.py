"""Where DPO's reference pass parts from the trained pass: a diagnostic for one recipe of scripts/benchmark.py.

    python scripts/benchmarks/reference_check.py --model llama2-7b --seq 1024 --batch 2 --variant qlora
    python scripts/benchmarks/reference_check.py --model tiny --seq 32 --variant "qlora:performance.fused_lora=false"

At the first step of a new adapter (lora_B is zero, the learning rate 0) the policy and the reference compute the same
function, so DPO's first loss is log 2 where both passes compute the same values. Every batch here is the same pair
repeated, for two steps: the first step's two passes compare the policy with the reference (which value parts them
first: a decoder layer's input, the backbone's output or the LM head's log-probabilities), and the second step,
which computes the first again (nothing was learned), shows whether a pass computes the same values twice. Last,
the LM head's two functions (TRL's and qlora's LogProbsWithGradient) on the same hidden states.

Values are recorded outside compiled code: each decoder layer's input where the layer is called (its compiled
function wrapped), the backbone's output by a hook on the backbone, the log-probabilities by wrapping the LM head's
function that TRL calls. Writes reference-check-<recipe>.json into --out and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import benchmark  # noqa: E402  (puts scripts/benchmarks and the checkout on the path)
from training_run import add_worker_arguments, random_pairs, record_losses, versions  # noqa: E402

STEPS = 2


class Recorder:
    """Values of each pass, in call order: ("policy" with gradients, "reference" without), per step."""

    def __init__(self):
        self.step = 0
        self.values: dict[tuple[int, str, str], list[torch.Tensor]] = {}

    def add(self, kind: str, value: torch.Tensor) -> None:
        if self.step < STEPS:
            pass_name = "policy" if torch.is_grad_enabled() else "reference"
            self.values.setdefault((self.step, pass_name, kind), []).append(value.detach().clone())

    def get(self, step: int, pass_name: str, kind: str) -> list[torch.Tensor]:
        return self.values.get((step, pass_name, kind), [])


def record_layers(model: torch.nn.Module, recorder: Recorder, layer_type: type) -> int:
    """Each decoder layer's input, recorded where the layer is called, outside its compiled code."""
    layers = [module for module in model.modules() if isinstance(module, layer_type)]
    for layer in layers:
        inner = layer._compiled_call_impl or layer._call_impl

        def recorded(*args, _inner=inner, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            recorder.add("layer_input", hidden)
            return _inner(*args, **kwargs)

        layer._compiled_call_impl = recorded
    return len(layers)


class RecordingHead(TrainerCallback):
    """Wraps the LM head function TRL calls (after qlora's callbacks replaced it) to record log-probabilities and the
    hidden states they came from; counts steps for the recorder."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.head_functions: list[type] = []

    def on_train_begin(self, args, state, control, **kwargs):
        import trl.trainer.utils as trl_utils

        inner = trl_utils._ChunkedLogProbFunction
        self.head_functions.append(inner)
        recorder = self.recorder

        class Recording:
            @staticmethod
            def apply(hidden, *rest):
                out = inner.apply(hidden, *rest)
                recorder.add("head_hidden", hidden)
                recorder.add("head_targets", rest[2])
                recorder.add("logprobs", out[0])
                return out

        trl_utils._ChunkedLogProbFunction = Recording

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.step += 1


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        return {"shapes": [list(a.shape), list(b.shape)]}
    diff = (a.float() - b.float()).abs()
    return {"max_abs": diff.max().item(), "differing": int((a != b).sum().item()), "elements": a.numel()}


def compare_passes(recorder: Recorder, step_a: int, pass_a: str, step_b: int, pass_b: str) -> dict:
    layers_a, layers_b = recorder.get(step_a, pass_a, "layer_input"), recorder.get(step_b, pass_b, "layer_input")
    n = min(len(layers_a), len(layers_b))
    per_layer = [difference(layers_a[i], layers_b[i]) for i in range(n)]
    first = next((i for i, d in enumerate(per_layer) if d.get("differing", 1)), None)
    result = {"layers_compared": n, "first_layer_whose_input_differs": first, "layer_inputs": per_layer}
    for kind in ("head_hidden", "logprobs"):
        a, b = recorder.get(step_a, pass_a, kind), recorder.get(step_b, pass_b, kind)
        if a and b:
            result[kind] = difference(a[0], b[0])
    logprobs_a, logprobs_b = recorder.get(step_a, pass_a, "logprobs"), recorder.get(step_b, pass_b, "logprobs")
    if logprobs_a and logprobs_b and logprobs_a[0].shape == logprobs_b[0].shape:
        result["summed_logprob_difference"] = (logprobs_a[0].double().sum() - logprobs_b[0].double().sum()).item()
    return result


def head_functions_agree(recorder: Recorder, model: torch.nn.Module) -> dict:
    """TRL's function and qlora's LogProbsWithGradient on the policy's recorded hidden states."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from qlora.stages.lm_head import LogProbsWithGradient

    hidden, targets = recorder.get(0, "policy", "head_hidden"), recorder.get(0, "policy", "head_targets")
    if not hidden:
        return {}
    weight = model.get_output_embeddings().weight
    args = (weight, None, targets[0], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE)
    with torch.no_grad():
        trl_logprobs = ChunkedLogProbFunction.apply(hidden[0], *args)[0]
    ours = LogProbsWithGradient.apply(hidden[0].detach().requires_grad_(), *args)[0].detach()
    recorded = recorder.get(0, "policy", "logprobs")[0]
    return {"trl_vs_qlora_head": difference(trl_logprobs, ours),
            "trl_vs_qlora_head_summed": (trl_logprobs.double().sum() - ours.double().sum()).item(),
            "recorded_policy_vs_trl_head": difference(recorded, trl_logprobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    add_worker_arguments(parser)
    parser.add_argument("--recipe-name", dest="recipe", default=None, help="qlora recipe (default: llama7b_dpo)")
    parser.add_argument("--variant", default="qlora", help="plain, qlora or qlora:KEY=VALUE;KEY=VALUE")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--label", default=None, help="names the output (default: the variant)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    args.method, args.steps, args.worker = "dpo", STEPS, args.variant
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.checkpoint = str(benchmark.build_checkpoint(args.model))
    recipe = benchmark.plain_recipe if args.variant == benchmark.PLAIN else benchmark.qlora_recipe

    from transformers import set_seed
    from transformers.modeling_layers import GradientCheckpointingLayer

    set_seed(0)
    build_trainer, model = recipe(args, device)
    pair = random_pairs(args.seq, 1)[0]
    import datasets

    dataset = datasets.Dataset.from_list([pair] * (args.batch * STEPS))  # every batch the same pair
    trainer = build_trainer(dataset)
    recorder = Recorder()
    layers = record_layers(trainer.model, recorder, GradientCheckpointingLayer)
    head = RecordingHead(recorder)
    trainer.add_callback(head)
    losses = record_losses(trainer)
    trainer.train()

    result = {
        "variant": args.variant, "label": args.label or args.variant,
        "inductor_deterministic": bool(getattr(inductor_config, "deterministic", None)),
        "model": args.model, "batch": args.batch, "seq": args.seq, "decoder_layers": layers,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "head_function": [f"{f.__module__}.{f.__qualname__}" for f in head.head_functions],
        "losses": [loss.item() for loss in losses], "log_2": math.log(2),
        "policy_vs_reference_step1": compare_passes(recorder, 0, "policy", 0, "reference"),
        "policy_step1_vs_step2": compare_passes(recorder, 0, "policy", 1, "policy"),
        "reference_step1_vs_step2": compare_passes(recorder, 0, "reference", 1, "reference"),
        "head_functions": head_functions_agree(recorder, trainer.model),
        "versions": versions(),
    }
    name = re.sub(r"[^\w.-]", "_", args.label or args.variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"reference-check-{name}.json").write_text(json.dumps(result, indent=1))
    print(summary(result))


def summary(result: dict) -> str:
    losses = " ".join(f"{x:.4f}" for x in result["losses"])
    lines = [f"== {result['label']} (Inductor deterministic: {result['inductor_deterministic']}): losses {losses} "
             f"(log 2 = {result['log_2']:.4f}); head {result['head_function']}"]
    for key in ("policy_vs_reference_step1", "policy_step1_vs_step2", "reference_step1_vs_step2"):
        comparison = result[key]
        differing = [i for i, d in enumerate(comparison["layer_inputs"]) if d.get("differing", 1)]
        head = {k: comparison[k] for k in ("head_hidden", "logprobs", "summed_logprob_difference") if k in comparison}
        lines.append(f"{key}: {comparison['layers_compared']} layer inputs compared, first differing: "
                     f"{comparison['first_layer_whose_input_differs']}, differing layers {differing[:8]}"
                     f"{'...' if len(differing) > 8 else ''}; {head}")
    lines.append(f"head functions on the policy's hidden states: {result['head_functions']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
