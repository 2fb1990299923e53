from pathlib import Path

import pytest

from qlora.config import recipes_dir, schema_keys
from qlora.compose import compose_config
from qlora.errors import QLoRAError

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))

# The keys the foundation issue fixes so that recipes and docs stay stable.
PUBLIC_KEYS = """
model.name_or_path model.dtype model.trust_remote_code model.attn_implementation
quantization.method quantization.double_quant quantization.compute_dtype quantization.quant_storage
lora.r lora.alpha lora.dropout lora.target_modules lora.use_rslora lora.use_dora lora.modules_to_save
data.path data.format data.max_length
training.output_dir training.max_steps training.epochs training.batch_size training.grad_accum training.lr
training.scheduler training.warmup_ratio training.optim training.gradient_checkpointing training.seed
training.logging_steps training.save_steps
""".split()


def test_public_keys_exist():
    assert set(PUBLIC_KEYS) <= set(schema_keys())


def test_shipped_recipes():
    assert {"tiny", "llama7b", "llama3_8b", "mistral7b", "qwen2_5_7b", "tiny_dpo", "llama7b_dpo"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    config = compose_config([f"+recipe={recipe}"])
    assert config.model.name_or_path
    assert config.training.output_dir.startswith(f"outputs/{recipe}/")


def test_llama7b_recipe_is_the_qlora_paper_setup():
    config = compose_config(["+recipe=llama7b"])
    assert config.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert config.quantization.method == "nf4"
    assert config.quantization.double_quant is True
    assert config.quantization.compute_dtype == "bfloat16"
    assert config.lora.target_modules == "all-linear"
    assert config.training.gradient_checkpointing is True
    assert config.training.optim == "adamw_torch_fused"  # the paper's paged 8-bit AdamW is slower (config.py)
    assert config.data.max_length == 2048


def test_no_recipe_means_tiny():
    assert compose_config(["training.output_dir=x"]) == compose_config(["+recipe=tiny", "training.output_dir=x"])


def test_tiny_recipe_uses_shipped_assets():
    config = compose_config(["+recipe=tiny"])
    assert (Path(config.model.name_or_path) / "config.json").is_file()
    assert Path(config.data.path).is_file()
    assert Path(config.data.heldout_path).is_file()


def test_command_line_overrides(tmp_path):
    data = tmp_path / "my.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    config = compose_config(["lora.r=8", "training.lr=1e-4", f"data.path={data}",
                             "lora.target_modules=[q_proj,v_proj]"])
    assert (config.lora.r, config.training.lr, config.data.path) == (8, 1e-4, str(data))
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_quantization_group_switch():
    config = compose_config(["quantization=int8"])
    assert (config.quantization.method, config.quantization.double_quant) == ("int8", False)


def test_hub_ids_are_not_checked_on_disk():
    config = compose_config(["model.name_or_path=meta-llama/Llama-2-7b-hf"])
    assert config.model.name_or_path == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.r=0", "lora.r=0"),
        ("lora.alpha=0", "lora.alpha=0"),
        ("lora.dropout=1.5", "lora.dropout=1.5"),
        ("training.lr=-1", "training.lr=-1"),
        ("training.batch_size=0", "training.batch_size=0"),
        ("training.warmup_ratio=2", "training.warmup_ratio=2"),
        ("training.scheduler=bogus", "training.scheduler=bogus"),
        ("training.optim=bogus", "training.optim=bogus"),
        ("quantization.method=int4", "quantization.method=int4"),
        ("quantization.compute_dtype=float8", "quantization.compute_dtype=float8"),
        ("quantization.method=int8", "quantization.double_quant=true"),
        ("quantization.method=none", "quantization.double_quant=true"),
        ("data.format=xml", "data.format=xml"),
        ("data.path=no/such/data.jsonl", "data.path=no/such/data.jsonl does not exist"),
        ("model.name_or_path=./no/such/model", "model.name_or_path=./no/such/model does not exist"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("data.truncation=cut", "data.truncation=cut is not supported. Allowed values: truncate, drop"),
        ("data.on_error=ignore", "data.on_error=ignore is not supported. Allowed values: raise, skip"),
        ("data.val_size=1.5", "data.val_size=1.5: use a share below 1"),
        ("data.val_size=-1", "data.val_size=-1.0 is out of range"),
        ("data.num_proc=0", "data.num_proc=0 is out of range"),
        ("data.datasets=[{path: no/such.jsonl}]", "data.datasets[0].path=no/such.jsonl does not exist"),
        ("data.path=null", "no training data: set data.path=my.jsonl"),
        ("training.eval_steps=0", "training.eval_steps=0 is out of range"),
        ("training.max_skipped_fraction=1.5", "training.max_skipped_fraction=1.5 is out of range"),
    ],
)
def test_bad_values_name_key_and_value(override, expected):
    with pytest.raises(QLoRAError, match=expected.replace("[", r"\[").replace(".", r"\.")):
        compose_config([override])


def test_data_keys_compose_from_the_command_line(tmp_path):
    config = compose_config(["data.columns.instruction=question", "data.packing=true", "data.val_size=0.1",
                             "data.datasets=[{path: a/b, split: test, format: sharegpt, columns: {text: body}}]"])
    assert config.data.columns.instruction == "question" and config.data.packing is True
    source = config.data.datasets[0]
    assert (source.path, source.split, source.columns.text, source.columns.prompt) == ("a/b", "test", "body", None)


def test_a_misspelt_column_field_is_refused_while_composing():
    with pytest.raises(QLoRAError, match=r"^data.columns.question is not a key of python -m qlora.train \(did you"):
        compose_config(["data.columns.question=q"])


def test_nothing_to_train_is_refused():
    with pytest.raises(QLoRAError, match="nothing to train"):
        compose_config(["training.max_steps=-1", "training.epochs=0"])


def test_unset_required_value_is_named():
    with pytest.raises(QLoRAError, match="model.name_or_path"):
        compose_config(["model.name_or_path=???"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["training.method=ppo"], "training.method=ppo is not supported. Allowed values: sft, dpo, orpo, kto."),
        (["+recipe=tiny_dpo", "data.format=alpaca"],
         "data.format=alpaca does not fit training.method=dpo: dpo trains on preference, implicit_preference data. "
         "Train alpaca data with training.method=sft"),
        (["+recipe=tiny_dpo", "data.format=unpaired_preference"], "Train unpaired_preference data with "
                                                                 "training.method=kto"),
        (["data.format=preference"], "Train preference data with training.method=dpo|orpo|kto"),
        (["+recipe=tiny_dpo", "data.packing=true"], "data.packing=true does not apply to training.method=dpo"),
        (["+recipe=tiny_dpo", "data.train_on_prompt=true"], "data.train_on_prompt=true does not apply"),
        (["+recipe=tiny_dpo", "eval.during_training=true"], "eval.during_training=true does not apply"),
        (["+recipe=tiny_dpo", "training.method=kto", "training.batch_size=1"],
         "training.batch_size=1 with training.method=kto"),
        (["+recipe=tiny_dpo", "training.beta=0"], "training.beta=0.0 must be positive"),
        (["+recipe=tiny_dpo", "training.method=orpo", "performance.activation_offloading=true"],
         "performance.activation_offloading=true is not available with training.method=orpo"),
        (["model.adapter=no/such/run"], "model.adapter=no/such/run holds no LoRA adapter"),
    ],
)
def test_preference_settings_that_cannot_work_are_refused_with_the_fix(overrides, expected):
    with pytest.raises(QLoRAError) as error:
        compose_config(overrides)
    assert expected in str(error.value)


def test_a_continued_adapter_must_have_the_lora_groups_shape(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "use_dora": false, "use_rslora": false}')
    assert compose_config([f"model.adapter={tmp_path / 'run'}"]).model.adapter == str(tmp_path / "run")  # tiny: r=8
    with pytest.raises(QLoRAError, match="was trained with lora.r=8, lora.alpha=16 but the lora group says lora.r=16, "
                                         "lora.alpha=32.*Set lora.r=8 lora.alpha=16"):
        compose_config(["+recipe=llama7b", f"model.adapter={adapter}"])


def test_dpo_recipes():
    tiny = compose_config(["+recipe=tiny_dpo"])
    assert (tiny.training.method, tiny.training.beta) == ("dpo", 0.1)
    assert Path(tiny.data.path).is_file() and tiny.data.val_path == tiny.data.heldout_path
    llama = compose_config(["+recipe=llama7b_dpo"])
    assert (llama.training.method, llama.model.name_or_path) == ("dpo", "meta-llama/Llama-2-7b-hf")
    assert (llama.data.max_length, llama.training.batch_size, llama.lora.r) == (1024, 2, 16)
    # the reference pass and the trained pass through TRL's LM head: the first loss log 2 on an H100 (session 7)
    assert not llama.performance.lm_head_gradient_in_forward and llama.performance.torch_compile
