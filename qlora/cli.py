"""What every `python -m qlora.X key=value ...` command shares: one way to read the command line (Hydra's flags
anywhere, recipe=NAME, only the schema's keys, --help, --verbose), Hydra composition over the schema, one quiet
output, and user errors printed as one line (exit code 2; 128 + N after signal N) instead of a traceback."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, NoReturn

import hydra
from hydra._internal.utils import get_args_parser  # the parser hydra.main reads the command line with
from omegaconf import DictConfig

from qlora.config import configs_dir, recipe_names, register_configs, with_default_recipe
from qlora.errors import QLoRAError
from qlora.output import configure_output
from qlora.overrides import checked_overrides

DOCS = "docs/recipes-and-overrides.md (every key, the recipes) and docs/faq.md (errors and their fixes)"


@dataclass(frozen=True)
class Command:
    """What --help says about a `python -m qlora.<name>` command, and whether it takes recipes."""

    summary: str
    examples: tuple[str, ...]  # the most used overrides
    recipes: str = ""  # for a command that takes recipe=NAME (and runs tiny without one): what they need
    flags: tuple[tuple[str, str], ...] = ()  # its own flags, and what they do


# By command name, which is also the name of its primary config (configs/<name>.yaml)
COMMANDS = {
    "train": Command(
        "Train a QLoRA adapter: the tiny recipe on the CPU unless recipe=NAME picks another.",
        ("recipe=llama7b", "data.path=my.jsonl", "model.name_or_path=meta-llama/Llama-2-7b-hf",
         "training.max_steps=500", "training.lr=1e-4", "training.output_dir=outputs/run1", "lora.r=8",
         "quantization=int8", "training.resume=auto"),
        recipes="every recipe but tiny and tiny_dpo needs the Hugging Face Hub, or model.name_or_path=a local "
                "model folder"),
    "plan": Command(
        "Plan the GPU memory of a training config before loading anything: the same recipes and keys as train.",
        ("recipe=llama7b", "training.batch_size=8", "data.max_length=4096", "lora.r=64", "plan.gpu_memory=24GiB"),
        recipes="each recipe's model config.json ships with qlora, so that every recipe is planned offline too",
        flags=(("--gpu-memory 80GiB", "the GPU memory to fit (as plan.gpu_memory=80GiB)"),)),
    "merge": Command(
        "Fold a trained LoRA adapter into its base model and save a plain transformers checkpoint.",
        ("run=outputs/<run>", "output_dir=merged", "dtype=float16", "from_dequantized=true", "adapter=PATH",
         "base=PATH_OR_HUB_ID")),
    "generate": Command(
        "Answer prompts with a base model and a trained adapter: one prompt, a chat, or a file of prompts.",
        ("run=outputs/<run>", 'prompt="Is this review positive?"', "chat=true", "input_file=prompts.jsonl",
         "max_new_tokens=64", "temperature=0.7", "template=raw")),
    "evaluate": Command(
        "Loss, perplexity and answer metrics of a base model and a trained adapter on a dataset.",
        ("run=outputs/<run>", "data.path=eval.jsonl", "max_samples=200", "regex='(positive|negative)'",
         "generation=false")),
    "quantize": Command(
        "Save a base model quantized once (bitsandbytes), to fine-tune many times without re-quantizing.",
        ("output_dir=models/llama2-7b-nf4", "model=llama2_7b", "model.name_or_path=PATH_OR_HUB_ID",
         "quantization=int8")),
}


@dataclass
class CommandLine:
    hydra_flags: list[str]  # --cfg job, --info, ... in the order given
    overrides: list[str]
    verbose: bool
    help: bool
    unknown_flags: list[str]


def run_hydra_command(name: str, task: Callable[[DictConfig], None], argv: list[str] | None = None) -> None:
    """`python -m qlora.<name>`: read the command line (sys.argv's by default), compose configs/<name>.yaml with it
    and run `task` on the result."""
    register_configs()
    command, line = COMMANDS[name], read_command_line(sys.argv[1:] if argv is None else argv)
    if line.help:
        print(usage(name))
        return
    try:
        if line.unknown_flags:
            raise QLoRAError(f"unknown flag {line.unknown_flags[0]}: python -m qlora.{name} --help lists them.")
        overrides = checked_overrides(name, line.overrides, recipes=bool(command.recipes))
    except QLoRAError as error:
        exit_with(error)
    if command.recipes:
        overrides = with_default_recipe(overrides)

    def guarded(cfg: DictConfig) -> None:
        configure_output(line.verbose)
        try:
            task(cfg)
        except QLoRAError as error:
            exit_with(error)

    # Hydra's parser takes no override after a flag: the flags go first
    sys.argv[1:] = [*line.hydra_flags, *overrides]
    hydra.main(config_path=str(configs_dir()), config_name=name, version_base="1.3")(guarded)()


def read_command_line(argv: list[str]) -> CommandLine:
    """Hydra's flags, qlora's --verbose and the overrides, in any order."""
    parser = get_args_parser()
    parser.add_argument("--verbose", action="store_true")
    args, unknown = parser.parse_known_intermixed_args(argv)
    ours = {"--verbose", "--help", "-h", *args.overrides, *unknown}
    return CommandLine(hydra_flags=[word for word in argv if word not in ours], overrides=args.overrides,
                       verbose=args.verbose, help=args.help, unknown_flags=unknown)


def usage(name: str) -> str:
    """The short help: the command line, the recipes, the most used keys, the flags and where the docs are."""
    command = COMMANDS[name]
    recipe = "[recipe=NAME] " if command.recipes else ""
    lines = [f"usage: python -m qlora.{name} {recipe}[key=value ...] [--cfg job] [--verbose]", "",
             command.summary, ""]
    if command.recipes:
        lines += [f"recipes: {', '.join(recipe_names())}; without one, tiny (the shipped CPU model)",
                  f"  {command.recipes}", ""]
    flags = [*command.flags, ("--cfg job", "print the composed config and run nothing"),
             ("--verbose", "also show the libraries' own progress bars and notices"),
             ("--hydra-help", "Hydra's own flags")]
    lines += ["most used keys, for example:", *(f"  {example}" for example in command.examples), "",
              "flags, anywhere on the line:", *(f"  {flag:<20}{what}" for flag, what in flags), "",
              f"docs: {DOCS}"]
    return "\n".join(lines)


def exit_with(error: QLoRAError) -> NoReturn:
    print(f"qlora: error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
