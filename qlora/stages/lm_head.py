"""The LM head's gradient computed in the forward pass: `performance.lm_head_gradient_in_forward`.

TRL's fused LM head (trl.kernels.ChunkedLogProbFunction) computes each token's log-probability in tiles of 4,096
tokens x 32,768 vocabulary entries without the full logits, and in the backward pass computes every tile again to
turn it into the logits' gradient: the vocabulary projection runs three times per step (forward, again, gradient),
each 69 TFLOP for Llama-3-8B's 128k vocabulary at 65,536 tokens (0.09 s at an H200's measured matmul peak, not timed
apart). A token's log-probability depends on its own hidden state only, so its gradient there, d log p(t_i) / d
h_i = W[t_i] - softmax(z_i) W, is known as soon as the token's logits are, whatever the loss does with the
log-probability. Here a tile takes fewer tokens and the whole vocabulary (the same number of elements: the same
memory), TRL's own kernels fold it into the log-probability and turn it into that gradient in place, and one more
projection gives the gradient of the hidden states, kept (in float32, as TRL accumulates it) for the backward pass,
which scales each token's row by the gradient reaching its log-probability: two projections instead of three, as
unsloth's and Liger's losses do.

Only where that holds and TRL's kernels need nothing else: a frozen head without bias in the compute dtype, hidden
states that take gradients, and a loss that differentiates the log-probabilities only (SFT, DPO, ORPO, KTO: the
entropy is a metric). Anything else (the reference pass without gradients, evaluation) is TRL's function itself.
"""

from __future__ import annotations

import logging

import torch
import trl
import trl.trainer.utils
from transformers import TrainerCallback
from trl.kernels import ChunkedLogProbFunction
from trl.kernels import chunked_logprob as trl_kernels

log = logging.getLogger(__name__)


class LogProbsWithGradient(ChunkedLogProbFunction):
    """TRL's ChunkedLogProbFunction, computing d log p / d hidden in the forward pass where it can (module
    docstring); the same arguments and outputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=trl_kernels.OPTIONAL_OUTPUTS):
        device = hidden.device
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else hidden.dtype
        ctx.in_forward = (ctx.needs_input_grad[0] and not ctx.needs_input_grad[1] and bias is None
                          and weight.dtype == compute_dtype)
        if not ctx.in_forward:
            return ChunkedLogProbFunction.forward(ctx, hidden, weight, bias, targets, temperature, chunk_size,
                                                  final_logit_softcapping, logit_scale, outputs)
        ctx.set_materialize_grads(False)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        kernel_args = {"logit_scale": logit_scale, "softcap": final_logit_softcapping or 1.0,
                       "inv_t": 1 / temperature, "HAS_SOFTCAP": final_logit_softcapping is not None}
        flags = {f"HAS_{name.upper()}": name in outputs for name in trl_kernels.OPTIONAL_OUTPUTS}
        stats = {name: torch.zeros(n_tokens, device=device, dtype=torch.float32)
                 for name in ("sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "target_logit")}
        running_max = torch.full((n_tokens,), float("-inf"), device=device, dtype=torch.float32)
        max_before_target = torch.full_like(running_max, float("-inf"))
        ones = torch.ones(n_tokens, device=device, dtype=torch.float32)  # d log p / d log p: the gradient of one
        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32)
        tile_tokens = max(1, trl_kernels.TOKEN_CHUNK_SIZE * chunk_size // vocab)  # TRL's tile size, all the vocabulary
        buffer = torch.empty((min(n_tokens, tile_tokens), vocab), device=device, dtype=compute_dtype)
        triton = trl_kernels._use_triton(device)
        for start in range(0, n_tokens, tile_tokens):
            rows = slice(start, min(start + tile_tokens, n_tokens))
            n = rows.stop - rows.start
            tile = buffer[:n]
            torch.mm(hidden[rows].to(compute_dtype), weight.t(), out=tile)
            fold = trl_kernels._forward_kernel[(n,)] if triton else trl_kernels._forward_tile
            fold(tile, tile.stride(0), targets[rows], running_max[rows], stats["sum_exp"][rows],
                 stats["x_sum_exp"][rows], stats["sq_sum_exp"][rows], stats["z_sum"][rows], max_before_target[rows],
                 stats["target_logit"][rows], 0, vocab, BLOCK_SIZE=trl_kernels._BLOCK_SIZE, **flags, **kernel_args)
            log_z = running_max[rows] + torch.log(stats["sum_exp"][rows])
            to_gradient = trl_kernels._backward_kernel[(n, -(-vocab // trl_kernels._BLOCK_SIZE))] if triton \
                else trl_kernels._backward_tile
            to_gradient(tile, tile.stride(0), targets[rows], log_z, log_z, ones[rows], log_z, 0, vocab,
                        HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=False, BLOCK_SIZE=trl_kernels._BLOCK_SIZE,
                        **kernel_args)
            trl_kernels._addmm_fp32(grad_hidden[rows], tile, weight)

        sum_exp = stats["sum_exp"]
        log_z = running_max + torch.log(sum_exp)
        logprobs = stats["target_logit"] - log_z
        entropy = log_z - stats["x_sum_exp"] / sum_exp if "entropy" in outputs else None
        log_sum_sq_probs = torch.log(stats["sq_sum_exp"]) - 2 * torch.log(sum_exp) \
            if "log_sum_sq_probs" in outputs else None
        mean_logits = stats["z_sum"] / vocab if "mean_logits" in outputs else None
        is_top1 = (stats["target_logit"] >= running_max) & (stats["target_logit"] > max_before_target) \
            if "is_top1" in outputs else None
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq_probs, mean_logits, is_top1) if x is not None))
        return logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *rest):
        if not ctx.in_forward:
            return ChunkedLogProbFunction.backward(ctx, grad_logprobs, grad_entropy, *rest)
        if grad_entropy is not None:
            raise RuntimeError("performance.lm_head_gradient_in_forward computes the gradient of the log-probabilities "
                               "only, and this loss differentiates the entropy too: set "
                               "performance.lm_head_gradient_in_forward=false")
        (grad_hidden,) = ctx.saved_tensors
        if grad_logprobs is None:
            return (None,) * 9
        # in place: the function runs backward once (no float32 copy of tokens x hidden size beside it)
        grad = grad_hidden.mul_(grad_logprobs.float().unsqueeze(-1)).to(ctx.hidden_dtype)
        return grad, None, None, None, None, None, None, None, None


# what LogProbsWithGradient takes from TRL: its fused head's function in trl.trainer.utils and the kernels it folds
# the tiles with (TRL 1.16); a TRL without them trains with its own function
TRL_NAMES = {trl.trainer.utils: ("_ChunkedLogProbFunction",),
             trl_kernels: ("TOKEN_CHUNK_SIZE", "OPTIONAL_OUTPUTS", "_BLOCK_SIZE", "_use_triton", "_addmm_fp32",
                           "_forward_kernel", "_forward_tile", "_backward_kernel", "_backward_tile")}


def missing_trl_names() -> list[str]:
    return [f"{module.__name__}.{name}" for module, names in TRL_NAMES.items() for name in names
            if not hasattr(module, name)]


class LMHeadGradientInForward(TrainerCallback):
    """TRL's fused LM head computes with LogProbsWithGradient from the start of training to its end (TRL's
    trainers call the function through trl.trainer.utils, which is where it is replaced)."""

    def __init__(self):
        self.replaced = False

    def on_train_begin(self, args, state, control, **kwargs):
        missing = missing_trl_names()
        if missing:
            log.warning("performance.lm_head_gradient_in_forward: this TRL (%s) lacks %s; its own LM head runs",
                        trl.__version__, ", ".join(missing))
            return
        trl.trainer.utils._ChunkedLogProbFunction = LogProbsWithGradient
        self.replaced = True
        log.info("performance.lm_head_gradient_in_forward: the LM head's gradient is computed in the forward pass")

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """TRL's own function back where it was replaced (also when training raised: trainer.restoring_on_error)."""
        if self.replaced:
            trl.trainer.utils._ChunkedLogProbFunction = ChunkedLogProbFunction
            self.replaced = False
