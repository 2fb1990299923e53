"""`python -m qlora.data preview [-n N] [+recipe=NAME] [key=value ...]`: see what the model will see.

Composes the config exactly as `python -m qlora.train` does (same recipes and overrides), tokenizes the
data, and prints the first N examples (default 3) with trained and masked tokens told apart, plus the
dataset's statistics. Nothing is trained or written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qlora.cli import DOCS
from qlora.config import recipe_names
from qlora.errors import QLoRAError
from qlora.output import configure_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora.data", description=__doc__.splitlines()[0],
                                     epilog=f"recipes: {', '.join(recipe_names())}; docs: docs/data.md, and {DOCS}")
    parser.add_argument("command", choices=["preview"])
    parser.add_argument("-n", "--examples", type=int, default=3, help="how many examples to show (default 3)")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' own progress bars and notices")
    parser.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides, as for qlora.train, e.g. "
                                                     "data.path=my.jsonl")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from qlora.compose import compose_config
        from qlora.data.preview import preview

        config = compose_config(args.overrides)
        configure_output(args.verbose)  # the report is the output
        print(preview(config, args.examples, colour=sys.stdout.isatty()))
    except QLoRAError as error:
        print(f"qlora: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
