"""The command line of every `python -m qlora.X`: only the schema's keys, recipe=NAME, --help, each command's main()
called as `python -m` calls it (the module imported once here, not per test)."""

import importlib
import sys

import pytest

from qlora.cli import COMMANDS
from qlora.compose import compose_config
from qlora.config import COMMAND_SCHEMAS, recipes_dir
from qlora.data.__main__ import main as data_main
from qlora.errors import QLoRAError
from qlora.overrides import accepts_key, checked_overrides, config_groups

MODULES = {"train": "qlora.train", "plan": "qlora.plan.__main__", "merge": "qlora.merge",
           "generate": "qlora.generate", "evaluate": "qlora.evaluate", "quantize": "qlora.quantize"}
RECIPES = sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def run_main(command: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"{command}.py", *args])
    importlib.import_module(MODULES[command]).main()


@pytest.mark.parametrize("command, override, closest", [
    ("train", "+lora.rank=8", "lora.r"),  # what Hydra itself suggests after lora.rank=8 is refused
    ("train", "lora.rank=8", "lora.r"),
    ("train", "++trainig.lr=1e-4", "training.lr"),
    ("plan", "+plan.gpu_mem=24GiB", "plan.gpu_memory"),
    ("merge", "output=x", "output_dir"),
    ("generate", "promt=hi", "prompt"),
    ("evaluate", "data.pth=eval.jsonl", "data.path"),
    ("quantize", "outputdir=x", "output_dir"),
])
def test_a_key_outside_the_schema_is_refused_with_the_closest_one(command, override, closest, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(command, override, monkeypatch=monkeypatch)
    error = capsys.readouterr().err
    key = override.lstrip("+").split("=")[0]
    assert exit.value.code == 2
    assert error == f"qlora: error: {key} is not a key of python -m qlora.{command} (did you mean {closest}?). " \
                    f"Every key is listed in docs/recipes-and-overrides.md; python -m qlora.{command} --help shows " \
                    f"the most used ones.\n"


def test_data_preview_refuses_an_unknown_key_in_one_line(capsys):
    assert data_main(["preview", "+lora.rank=8"]) == 2
    assert capsys.readouterr().err.startswith("qlora: error: lora.rank is not a key of python -m qlora.train "
                                              "(did you mean lora.r?)")


def test_recipe_without_plus_and_plus_on_a_known_key_compose_as_meant():
    config = compose_config(["recipe=llama7b", "+lora.r=4"])
    assert config.model.name_or_path == "meta-llama/Llama-2-7b-hf" and config.lora.r == 4
    assert checked_overrides("train", ["recipe=tiny", "+recipe=tiny", "lora=attention", "hydra.verbose=true"],
                             recipes=True) == ["+recipe=tiny", "+recipe=tiny", "lora=attention", "hydra.verbose=true"]


def test_a_misspelt_recipe_names_the_closest_and_a_command_without_recipes_has_none():
    with pytest.raises(QLoRAError, match=r"^recipe=llama-7b is not a recipe \(did you mean recipe=llama7b\?\)\. "
                                         r"The recipes are llama3_8b, llama7b"):
        compose_config(["recipe=llama-7b"])
    with pytest.raises(QLoRAError, match="recipe is not a key of python -m qlora.merge"):
        checked_overrides("merge", ["recipe=tiny"])


@pytest.mark.parametrize("command", sorted(MODULES))
def test_help_is_a_short_usage_with_recipes_keys_and_docs(command, monkeypatch, capsys):
    run_main(command, "lora.r=4", "--help", monkeypatch=monkeypatch)
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m qlora.{command} ") and len(text.splitlines()) < 40
    assert ("recipes: " + ", ".join(RECIPES) in text) == bool(COMMANDS[command].recipes)
    groups = config_groups(command) + (["recipe"] if COMMANDS[command].recipes else [])
    for example in COMMANDS[command].examples:  # every key shown is a key of the command
        key = example.split("=")[0]
        assert f"  {example}\n" in text and (key in groups or accepts_key(COMMAND_SCHEMAS[command], key)), example
    assert "--cfg job" in text and "--verbose" in text and "docs/recipes-and-overrides.md" in text


@pytest.mark.parametrize("main, words", [(data_main, ["recipes: " + ", ".join(RECIPES), "docs/data.md"]),
                                         (None, ["docs/runs.md"])])
def test_help_of_the_argparse_commands_points_to_the_docs(main, words, capsys):
    from qlora.report import main as report_main

    with pytest.raises(SystemExit) as exit:
        (main or report_main)(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert exit.value.code == 0 and text.startswith("usage: python -m qlora.")
    assert all(word in text for word in words)


def test_every_command_has_a_schema_and_a_usage():
    assert set(COMMANDS) == set(COMMAND_SCHEMAS) == set(MODULES)
