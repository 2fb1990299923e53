"""The key=value overrides of a command line, read before Hydra composes them.

Hydra accepts `+key=value` for a key the schema lacks (it adds it, and the run then ignores it) and wants
`+recipe=NAME` for a group that the primary config leaves out. Here every override must name a key of the
command's schema or one of its groups: an unknown key is refused with the closest valid one, `+` on a known key
is dropped, and `recipe=NAME` becomes `+recipe=NAME`.
"""

from __future__ import annotations

import difflib

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from qlora.config import COMMAND_SCHEMAS, configs_dir, recipe_names, schema_keys
from qlora.errors import QLoRAError

RECIPE_GROUP = "recipe"


def checked_overrides(command: str, overrides: list[str], recipes: bool = False) -> list[str]:
    """The overrides of `python -m qlora.<command>` as Hydra must get them; an unknown key raises QLoRAError.

    `recipes`: the command takes recipe=NAME (training's keys, composed as qlora.train does).
    """
    groups = config_groups(command) + ([RECIPE_GROUP] if recipes else [])
    parser = OverridesParser.create()
    checked = []
    for override in overrides:
        try:
            parsed = parser.parse_overrides([override])[0]
        except OverrideParseException:
            checked.append(override)  # Hydra reports the syntax error itself
            continue
        key = parsed.key_or_group
        if key == RECIPE_GROUP and recipes:
            check_recipe(parsed.value())
            # the primary config picks no recipe, so Hydra wants it added: recipe=NAME works as +recipe=NAME
            checked.append(f"+{override}" if parsed.type == OverrideType.CHANGE else override)
        elif key in groups:
            checked.append(override)
        elif key.split(".")[0].split("/")[0] == "hydra":
            checked.append(override)  # Hydra's own settings (hydra.verbose=true, hydra/job_logging=...)
        elif accepts_key(COMMAND_SCHEMAS[command], key):
            checked.append(override.lstrip("+") if parsed.is_add() else override)
        else:
            raise unknown_key_error(command, key, groups)
    return checked


def accepts_key(schema: type, key: str) -> bool:
    """Whether `key` (dotted) names a field of the dataclass `schema`, a group of fields (data.columns), or lies
    below a field that holds any value (a list, a dict), where the schema says nothing about the keys."""
    keys = schema_keys(schema)
    return any(known == key or known.startswith(key + ".") or key.startswith(known + ".") for known in keys)


def check_recipe(name: object) -> None:
    names = recipe_names()
    if name not in names:
        raise QLoRAError(f"recipe={name} is not a recipe{_closest(str(name), names, 'recipe=')}. "
                         f"The recipes are {', '.join(names)} (the files in recipes/).")


def unknown_key_error(command: str, key: str, groups: list[str]) -> QLoRAError:
    closest = _closest(key, schema_keys(COMMAND_SCHEMAS[command]) + groups)
    return QLoRAError(f"{key} is not a key of python -m qlora.{command}{closest}. Every key is listed in "
                      f"docs/recipes-and-overrides.md; python -m qlora.{command} --help shows the most used ones.")


def _closest(word: str, candidates: list[str], prefix: str = "") -> str:
    """' (did you mean X?)' for the candidate closest to `word`, or '' when none is close."""
    closest = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {prefix}{closest[0]}?)" if closest else ""


def config_groups(command: str) -> list[str]:
    """The groups the command's primary config picks an option of (configs/<command>.yaml's defaults list)."""
    defaults = OmegaConf.load(configs_dir() / f"{command}.yaml").get("defaults", [])
    return [group for entry in defaults if OmegaConf.is_dict(entry) for group in entry
            if not str(group).startswith("override ")]
