"""performance.lm_head_gradient_in_forward: TRL's fused LM head with the hidden states' gradient computed in the
forward pass gives TRL's log-probabilities, metrics and gradients."""

import json
import logging
from pathlib import Path

import pytest
import torch
import trl.trainer.utils
from trl.kernels import ChunkedLogProbFunction

from qlora.stages.lm_head import LogProbsWithGradient

OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks the fused head for


def _run(function, hidden, weight, targets, upstream, chunk_size=64, outputs=OUTPUTS):
    hidden = hidden.clone().requires_grad_()
    logprobs, entropy, _, _, is_top1 = function.apply(hidden, weight, None, targets, 1.0, chunk_size, None, 1.0,
                                                      outputs)
    (logprobs * upstream).sum().backward()  # any loss of the log-probabilities: upstream is its gradient there
    return logprobs.detach(), entropy.detach(), is_top1, hidden.grad


def _inputs(tokens=1200, vocab=500, hidden_size=32):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(tokens, hidden_size, generator=generator), torch.randn(vocab, hidden_size, generator=generator),
            torch.randint(0, vocab, (tokens,), generator=generator), torch.randn(tokens, generator=generator))


def test_log_probs_metrics_and_gradients_are_trls():
    """1,200 tokens in tiles of 524 (TRL's 4,096 x 64 elements over a vocabulary of 500): three tiles, the last
    short; an upstream gradient that differs per token, as DPO's does."""
    hidden, weight, targets, upstream = _inputs()
    projections = []
    mm = torch.mm
    torch.mm = lambda a, b, out=None: projections.append(b.shape) or mm(a, b, out=out)
    try:
        ours = _run(LogProbsWithGradient, hidden, weight, targets, upstream)
    finally:
        torch.mm = mm
    assert projections == [(32, 500)] * 3  # each tile projected once, onto the whole vocabulary
    trls = _run(ChunkedLogProbFunction, hidden, weight, targets, upstream)
    for mine, expected in zip(ours, trls):
        if expected.dtype == torch.bool:
            assert torch.equal(mine, expected)
        else:
            assert torch.allclose(mine, expected, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    assert ours[-1].abs().sum() > 0


def test_what_it_cannot_compute_ahead_is_trls_own_function():
    """A trained head (its weight needs a gradient), or no gradients at all (the DPO reference, evaluation): TRL's
    function runs, with its gradient of the weight."""
    hidden, weight, targets, upstream = _inputs(tokens=40)
    trained = weight.clone().requires_grad_()
    _run(LogProbsWithGradient, hidden, trained, targets, upstream)
    ours = trained.grad.clone()
    trained.grad = None
    _run(ChunkedLogProbFunction, hidden, trained, targets, upstream)
    assert torch.allclose(ours, trained.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        found = LogProbsWithGradient.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, OUTPUTS)
        expected = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, OUTPUTS)
    assert torch.allclose(found[0], expected[0])


def test_a_loss_that_differentiates_the_entropy_is_refused_with_the_switch_to_turn_off():
    hidden, weight, targets, _ = _inputs(tokens=40)
    logprobs, entropy, *_ = LogProbsWithGradient.apply(hidden.requires_grad_(), weight, None, targets, 1.0, 64,
                                                       None, 1.0, OUTPUTS)
    with pytest.raises(RuntimeError, match="performance.lm_head_gradient_in_forward=false"):
        (logprobs.sum() + entropy.sum()).backward()


def test_training_with_the_switch_gives_the_losses_without_it(tiny_config, caplog):
    """The tiny recipe, six steps with and without the switch: the same losses; TRL's function is its own again
    after training."""
    from qlora.pipeline import run_training

    losses = {}
    for switch in ("true", "false"):
        with caplog.at_level(logging.INFO):
            summary = run_training(tiny_config(f"performance.lm_head_gradient_in_forward={switch}",
                                               "training.max_steps=6", "training.logging_steps=1",
                                               "eval.exact_match_samples=0", "training.overwrite_output_dir=true"))
        losses[switch] = [row["loss"] for row in map(json.loads, open(Path(summary.run_dir) / "metrics.jsonl"))
                          if "loss" in row]
        assert trl.trainer.utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert "the LM head's gradient is computed in the forward pass" in caplog.text
    assert len(losses["true"]) == 6 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_a_trl_without_the_kernels_it_takes_trains_with_its_own_head(monkeypatch, caplog):
    from trl.kernels import chunked_logprob

    from qlora.stages.lm_head import LMHeadGradientInForward

    monkeypatch.delattr(chunked_logprob, "_backward_kernel")
    with caplog.at_level(logging.WARNING):
        LMHeadGradientInForward().on_train_begin(None, None, None)
    assert trl.trainer.utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert "lacks trl.kernels.chunked_logprob._backward_kernel; its own LM head runs" in caplog.text


def test_restore_puts_back_only_what_it_replaced(monkeypatch):
    """A TRL without the function's name keeps it unset: restore writes TRL's function back only where it was
    replaced."""
    from qlora.stages.lm_head import LMHeadGradientInForward, LogProbsWithGradient

    callback = LMHeadGradientInForward()
    callback.on_train_begin(None, None, None)
    assert trl.trainer.utils._ChunkedLogProbFunction is LogProbsWithGradient
    callback.restore()
    assert trl.trainer.utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    monkeypatch.delattr(trl.trainer.utils, "_ChunkedLogProbFunction")
    callback = LMHeadGradientInForward()
    callback.on_train_begin(None, None, None)
    callback.restore()
    assert not hasattr(trl.trainer.utils, "_ChunkedLogProbFunction")
