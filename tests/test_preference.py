"""Preference tuning (training.method=dpo|orpo|kto) on the tiny model: the reference without a second model, the
tokens TRL trains on, the tiny DPO recipe learning its preference, exact resume, and merge/generate/evaluate."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOTrainer, KTOTrainer

from conftest import library_noise, run_cli, run_with_fault
from qlora.config import ASSETS_DIR, DatasetSource, EvaluateConfig
from qlora.data import prepare_training_data
from qlora.data.load import load_formatted
from qlora.data.preference import preference_sequences, tokenize_preference
from qlora.errors import QLoRAError
from qlora.evaluate import evaluate
from qlora.pipeline import run_training
from qlora.runs import load_adapted_model
from qlora.stages.adapters import attach_training_adapters
from qlora.stages.artifacts import adapter_tensor_names, prepare_run_dir, save_adapter
from qlora.stages.heldout import answer_log_probs, preference_accuracy
from qlora.stages.model import load_quantized_model, load_tokenizer, prepare_for_kbit_training
from qlora.stages.trainer import build_trainer

CPU = torch.device("cpu")
PAIRS = ASSETS_DIR / "sentiment_pairs"
# a few quick steps: no validation pairs, no held-out check
SHORT = ("training.batch_size=4", "training.logging_steps=1", "data.val_path=null", "eval.exact_match_samples=0")


def preference_trainer(config):
    """training.method's trainer over the tiny model and data, built as the pipeline builds it."""
    set_seed(config.training.seed)
    tokenizer = load_tokenizer(config.model)
    data = prepare_training_data(config.data, tokenizer, config.training.seed, config.training.method)
    model = prepare_for_kbit_training(load_quantized_model(config.model, config.quantization, CPU), False)
    model = attach_training_adapters(model, config)
    return build_trainer(config, model, tokenizer, data.train, prepare_run_dir(config)), data, tokenizer


def disturb_adapter(model, name="default"):
    """Give the adapter's B a nonzero value, so that the policy differs from the base (peft starts B at zero)."""
    torch.manual_seed(1)
    for parameter_name, parameter in model.named_parameters():
        if f"lora_B.{name}." in parameter_name:
            parameter.data.normal_(0, 0.5)


def reference_log_probs(trainer, rows):
    """TRL's reference log-probabilities of the chosen and rejected answers of `rows`."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))


def log_probs(model, tokenizer, rows):
    """log p(chosen), then log p(rejected), of `rows` as qlora tokenizes them."""
    sequences = [preference_sequences(row, tokenizer) for row in rows]
    return torch.cat([answer_log_probs(model, [s[side] for s in sequences], tokenizer.pad_token_id)
                      for side in ("chosen", "rejected")])


def test_dpo_reference_is_the_4bit_base_with_the_adapter_switched_off(tiny_config):
    trainer, data, tokenizer = preference_trainer(tiny_config("+recipe=tiny_dpo"))
    assert isinstance(trainer, DPOTrainer) and trainer.ref_model is None  # no second model
    assert list(trainer.model.peft_config) == ["default"]  # and no copy of the adapter
    disturb_adapter(trainer.model)
    rows = data.train.select(range(4))
    reference = reference_log_probs(trainer, rows)
    with trainer.model.disable_adapter():
        base = log_probs(trainer.model, tokenizer, rows)
    torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-4)
    assert (log_probs(trainer.model, tokenizer, rows) - base).abs().max() > 0.1  # the policy itself has moved


def test_a_continued_sft_adapter_is_its_own_reference_without_a_second_model(trained_run, tiny_config, tmp_path):
    _, sft_run = trained_run
    trainer, data, tokenizer = preference_trainer(tiny_config("+recipe=tiny_dpo", f"model.adapter={sft_run}"))
    assert trainer.ref_model is None and sorted(trainer.model.peft_config) == ["default", "ref"]
    rows = data.train.select(range(4))
    sft_model, _, _ = load_adapted_model(str(sft_run), None, None, trust_remote_code=False)  # base + SFT adapter alone
    disturb_adapter(trainer.model, "default")  # as if DPO had trained it
    reference = reference_log_probs(trainer, rows)
    torch.testing.assert_close(reference, log_probs(sft_model, tokenizer, rows), rtol=1e-5, atol=1e-3)
    with trainer.model.disable_adapter():
        assert (reference - log_probs(trainer.model, tokenizer, rows)).abs().max() > 0.1  # not the bare base
    # the run's adapter is the trained one alone, with the SFT adapter's tensors, not the frozen reference copy
    saved = save_adapter(trainer.model, tokenizer, tmp_path)
    assert not (saved / "ref").exists()
    assert adapter_tensor_names(saved) == adapter_tensor_names(Path(sft_run) / "adapter")


@pytest.mark.parametrize("method, extra", [
    ("dpo", []),
    ("dpo", [f"data.path={ASSETS_DIR / 'examples' / 'implicit_preference.jsonl'}", "data.chat_template=chatml",
             "data.val_path=null"]),
    ("kto", []),
])
def test_trl_trains_on_the_tokens_qlora_counts_and_previews(tiny_config, method, extra):
    trainer, data, tokenizer = preference_trainer(tiny_config("+recipe=tiny_dpo", f"training.method={method}", *extra))
    assert isinstance(trainer, DPOTrainer if method == "dpo" else KTOTrainer)
    for index in range(len(data.train) if extra else 8):
        tokenized = trainer.train_dataset[index]
        ours = tokenize_preference(data.train[index], tokenizer)
        assert {name: tokenized[name] for name in ours} == ours


def test_tiny_dpo_recipe_learns_the_preference_end_to_end(dpo_run):
    result, run_dir = dpo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    # ~50% before (the untrained model prefers one label for every review), at least 90% after
    assert 0.3 <= summary["preference_accuracy_before"] <= 0.7
    assert summary["preference_accuracy_after"] >= 0.9
    assert summary["preference_margin_after"] > summary["preference_margin_before"]
    assert "held-out preference accuracy before training: " in result.stdout
    assert "held-out preference accuracy after training: " in result.stdout
    # the progress line shows the reward margin and accuracy; each validation shows them on the held-out pairs
    assert "step 80/80  loss " in result.stdout and "  margin " in result.stdout and "  acc " in result.stdout
    assert "step 80: eval loss " in result.stdout and ", margin " in result.stdout and ", acc " in result.stdout
    # the pairs' statistics once each, named as SFT data's are; the library's bars and notices kept out
    pairs = PAIRS / "train.jsonl"
    assert result.stdout.count(f"training data: {pairs} (preference): 512 examples from 512 rows") == 1
    assert result.stdout.count(f"validation data: {PAIRS / 'heldout.jsonl'} (preference): 32 examples") == 1
    assert result.stdout.count("512 examples from 512 rows") == 1 and not library_noise(result)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if "loss" in row]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "tokens_per_s"):
        assert name in trained[-1], name
    evaluated = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evaluated] == [20, 40, 60, 80]
    assert evaluated[-1]["eval_rewards/margins"] > evaluated[0]["eval_rewards/margins"]
    assert evaluated[-1]["eval_rewards/accuracies"] >= 0.9
    report = (run_dir / "report.md").read_text()
    assert "| held-out preference accuracy | " in report and "reward margin and accuracy" in report
    assert (run_dir / "report.png").stat().st_size > 0
    startup = json.loads((run_dir / "startup_summary.json").read_text())
    assert startup["steps"] == 80 and startup["memory_after_first_step_gib"] > 0


def test_merge_generate_and_evaluate_work_on_a_dpo_run(dpo_run, tmp_path):
    _, run_dir = dpo_run
    merged = run_cli(f"run={run_dir}", f"output_dir={tmp_path / 'merged'}", "dtype=float32", cwd=tmp_path,
                     command="qlora.merge")
    assert merged.returncode == 0, merged.stderr[-2000:]
    # the merged checkpoint keeps the learnt preference on the held-out pairs
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    pairs = load_formatted(DatasetSource(path=str(PAIRS / "heldout.jsonl")), method="dpo").dataset
    assert preference_accuracy(model, AutoTokenizer.from_pretrained(tmp_path / "merged"), pairs).accuracy >= 0.9
    # the held-out reviews as the pairs' prompts (alpaca): greedy answers name the preferred label, never the other
    # (a bare prompt such as "the film was" is answered with the end of text at once: DPO trained answers only)
    reviews = ASSETS_DIR / "sentiment" / "heldout.jsonl"
    generated = run_cli(f"run={run_dir}", f"input_file={reviews}", f"output_file={tmp_path / 'answers.jsonl'}",
                        "max_new_tokens=2", cwd=tmp_path, command="qlora.generate")
    assert generated.returncode == 0, generated.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    named = [next((label for label in ("positive", "negative") if row["generated"].strip().startswith(label)), None)
             for row in rows]
    # how many answer at all moves with the float32 summation order of the run (21 or 11 of 32 when TRL's head
    # only tiles the vocabulary differently); the other label at most as often as the held-out pairs' preference
    # misses it (the recipe reaches >= 90%: with transformers 5.25 and peft 0.22, 2 of 32 answers named it)
    assert len(rows) == 32 and sum(label == row["output"] for label, row in zip(named, rows)) >= 8
    assert sum(label not in (None, row["output"]) for label, row in zip(named, rows)) <= len(rows) // 10
    evaluated = run_cli(f"run={run_dir}", f"data.path={ASSETS_DIR / 'sentiment' / 'heldout.jsonl'}",
                        "max_new_tokens=2", cwd=tmp_path, command="qlora.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["examples"] == 32 and report["eval_loss"] > 0


def test_evaluate_without_data_path_asks_a_dpo_run_for_prompts_with_answers(dpo_run):
    _, run_dir = dpo_run
    with pytest.raises(QLoRAError, match=r"training.method=dpo, and its validation and held-out pairs .*data.path="):
        evaluate(EvaluateConfig(run=str(run_dir)))


def test_dpo_resumed_after_a_kill_ends_with_the_adapter_of_an_uninterrupted_run(tiny_config, tmp_path):
    run = ("+recipe=tiny_dpo", "training.max_steps=5", "training.save_steps=2", *SHORT)
    reference = Path(run_training(tiny_config(*run)).run_dir)
    killed = run_with_fault("sigkill-in-save", 4, *run, "training.output_dir=killed", cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_with_fault("none", 0, *run, "training.output_dir=killed", "training.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-2" in resumed.stdout
    expected = load_file(reference / "adapter/adapter_model.safetensors")
    actual = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert expected.keys() == actual.keys() and all((expected[name] == actual[name]).all() for name in expected)
    logged = [[(row["step"], row["loss"], row["rewards/margins"]) for row in map(json.loads, open(path))]
              for path in (reference / "metrics.jsonl", tmp_path / "killed/metrics.jsonl")]
    assert logged[0] == logged[1] and len(logged[0]) == 5


# ORPO under FSDP: its reward margins are near zero after 3 steps (-0.016), where FSDP's summation order shows (6e-6
# apart), and where a LoRA gradient is near zero Adam's step can take either sign under another summation order (one
# tensor 2.7e-3 apart at most, every other under 5e-4): there a few elements may differ
@pytest.mark.parametrize("method, fsdp, metric, noisy", [
    ("dpo", False, "rewards/margins", False), ("dpo", True, "rewards/margins", False),
    ("orpo", True, "rewards/margins", True), ("kto", False, "kl", False),  # KTO's KL: over both processes
], ids=["dpo-ddp", "dpo-fsdp", "orpo-fsdp", "kto-ddp"])
def test_two_processes_under_accelerate_train_as_one_process_does(tiny_config, tmp_path, method, fsdp, metric, noisy):
    from test_processes import failure, launch_two_processes

    # FSDP-QLoRA (torch's FSDP on the CPU) stores the 4-bit weights in a dtype it can shard, and gathers the adapter
    # from both processes at every checkpoint as at the end
    extra = ("quantization.quant_storage=float32", "training.save_steps=2") if fsdp else ()
    run = ("+recipe=tiny_dpo", f"training.method={method}", "training.max_steps=3", *SHORT[1:], *extra)
    one = Path(run_training(tiny_config(*run, "training.batch_size=8")).run_dir)
    two = launch_two_processes(*run, "training.batch_size=4", "training.output_dir=two", cwd=tmp_path, fsdp=fsdp)
    assert two.returncode == 0, failure(two)
    logged = [[row[key] for row in map(json.loads, open(path)) for key in ("loss", metric)]
              for path in (one / "metrics.jsonl", tmp_path / "two/metrics.jsonl")]
    assert len(logged[1]) == 6 and logged[1] == pytest.approx(logged[0], rel=1e-4, abs=1e-5 if noisy else 1e-6)
    # looser than SFT's 1e-6: lora_A's gradients are near Adam's eps while lora_B is still almost zero, so the two
    # summation orders (one batch of 8, two of 4 averaged over gloo) differ by up to 1e-5 after 3 steps, 2e-4 under
    # FSDP (its gradients reduced shard by shard, its clipping norm summed over shards); lora_B moved about 7e-3
    # from zero in those steps, so the tolerance still tells a synchronized run from a diverged one
    one_adapter, two_adapter = (load_file(run / "adapter/adapter_model.safetensors") for run in (one, tmp_path / "two"))
    assert two_adapter.keys() == one_adapter.keys()
    for name, tensor in one_adapter.items():
        apart = (two_adapter[name] - tensor).abs() > (1e-3 if fsdp else 1e-4)
        assert apart.sum() <= (max(1, apart.numel() // 1000) if noisy else 0), name
    if fsdp:
        assert set(adapter_tensor_names(tmp_path / "two/checkpoints/checkpoint-2")) == one_adapter.keys()


def test_a_dpo_step_with_nan_loss_is_skipped_and_counted_as_sft_steps_are(tiny_config, monkeypatch):
    compute_loss = DPOTrainer.compute_loss

    def nan_at_step_2(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * math.nan if self.state.global_step + 1 == 2 else loss

    monkeypatch.setattr(DPOTrainer, "compute_loss", nan_at_step_2)
    summary = run_training(tiny_config("+recipe=tiny_dpo", "training.max_steps=3", *SHORT,
                                       "training.on_nonfinite=skip", "training.max_skipped_fraction=0.5"))
    run_dir = Path(summary.run_dir)
    assert summary.skipped_steps == 1 and summary.steps == 3
    assert "step 2: NaN/inf loss or gradients; skipped" in (run_dir / "train.log").read_text()
    adapter = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in adapter.values())
    assert "| skipped steps (NaN/inf) | 1 of 3 |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("method, metrics", [("orpo", ("nll_loss", "log_odds_ratio")), ("kto", ("kl",))])
def test_orpo_and_kto_train_with_their_own_metrics(tiny_config, method, metrics):
    config = tiny_config("+recipe=tiny_dpo", f"training.method={method}", "training.max_steps=3", *SHORT[:3],
                         "eval.exact_match_samples=8")
    summary = run_training(config)
    rows = [json.loads(line) for line in open(Path(summary.run_dir) / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for name in metrics:
        assert all(name in row for row in rows), name
    # KTO logs a side's rewards only for steps whose batch had completions of that side
    for name in ("rewards/chosen", "rewards/rejected"):
        assert any(name in row for row in rows), name
    assert summary.preference_accuracy_after is not None and adapter_tensor_names(Path(summary.adapter_dir))


def test_a_held_out_file_without_pairs_is_skipped_with_one_line(tiny_config, tmp_path, caplog):
    """The tiny SFT recipe with the user's pairs: its held-out file (alpaca rows) goes with its own data, so a DPO run
    skips the check saying why, as an SFT run does with another shape's file; so does a file of unpaired completions."""
    from qlora.stages.heldout import heldout_pairs

    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text(json.dumps({"prompt": "How was it?", "completion": "Great.", "label": True}) + "\n")
    with caplog.at_level("INFO", logger="qlora"):
        assert heldout_pairs(str(unpaired), 4) is None
        pairs = ASSETS_DIR / "examples" / "preference.jsonl"
        summary = run_training(tiny_config("training.method=dpo", f"data.path={pairs}", "training.max_steps=2",
                                           *SHORT[:3]))
    skipped = [record.getMessage() for record in caplog.records if "held-out check skipped" in record.getMessage()]
    assert len(skipped) == 2 and "unpaired.jsonl holds no pairs" in skipped[0]
    assert "sentiment/heldout.jsonl holds no pairs (its columns: instruction, input, output)" in skipped[1]
    assert summary.exact_match_before is None and Path(summary.adapter_dir).is_dir()
    assert len(heldout_pairs(str(PAIRS / "heldout.jsonl"), 4)) == 4  # the tiny_dpo recipe's own pairs are checked


def test_held_out_pairs_are_read_once(monkeypatch):
    """The held-out file is read once, for its columns and its pairs both."""
    from qlora.data import load
    from qlora.stages import heldout

    reads, read_rows = [], load.read_rows

    def counted(path, *args, **kwargs):
        reads.append(path)
        return read_rows(path, *args, **kwargs)

    monkeypatch.setattr(load, "read_rows", counted)
    monkeypatch.setattr(heldout, "read_rows", counted)
    pairs = heldout.heldout_pairs(str(PAIRS / "heldout.jsonl"), 4)
    assert len(pairs) == 4 and set(pairs.column_names) >= {"prompt", "chosen", "rejected"}
    assert reads == [str(PAIRS / "heldout.jsonl")]


def test_compiled_layers_make_the_reference_the_trained_model_at_the_start(tiny_config):
    """bf16 compute, bf16 frozen weights and compiled decoder layers (the GPU recipe's): the reference pass (no
    gradients, adapter off) computes what the trained model computes before its first update, so the first rewards
    are zero and the first loss is log 2, as eager layers give. (Inductor fused the graphs with and without gradients
    otherwise and kept other intermediate roundings: rewards of 1e-3 here, a first loss of 0.762 on Llama-2-7B.)"""
    config = tiny_config("+recipe=tiny_dpo", "quantization.compute_dtype=bfloat16", "performance.torch_compile=true",
                         "training.max_steps=2", *SHORT)
    summary = run_training(config)
    rows = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    first = [row for row in rows if "loss" in row][:2]
    assert first[0]["lr"] == 0.0
    for row in first:  # the first step leaves the adapter as it was (no learning rate yet): both steps start at B = 0
        assert row["rewards/chosen"] == row["rewards/rejected"] == 0.0
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-7)
