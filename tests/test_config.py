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
    assert {"tiny", "llama7b", "llama3_8b", "mistral7b", "qwen2_5_7b"} <= set(RECIPES)


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
    config = compose_config(["lora.r=8", "training.lr=1e-4", f"data.path={data}", "lora.target_modules=[q_proj,v_proj]"])
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
