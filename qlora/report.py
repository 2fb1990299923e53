"""`python -m qlora.report outputs/<run> [outputs/<other> ...]`: regenerate a run's report.md, or compare runs.

With one run folder, report.md and report.png are written again into it. With several, each run's report
is regenerated and one table and one plot compare them (comparison.md and comparison.png, or --output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora.errors import QLoRAError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlora.report", description=__doc__.splitlines()[0],
                                     epilog="docs: docs/runs.md (what a report holds)")
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (outputs/<recipe>/<date_time>)")
    parser.add_argument("--output", type=Path, default=Path("comparison.md"),
                        help="with several runs: the comparison's markdown file (default: comparison.md)")
    args = parser.parse_args(argv)
    from qlora.stages.report import write_comparison, write_report  # matplotlib only once the arguments parse

    try:
        for run in args.runs:
            print(f"report: {write_report(run)}")
        if len(args.runs) > 1:
            print(f"comparison: {write_comparison(args.runs, args.output)}")
    except QLoRAError as error:
        print(f"qlora: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
