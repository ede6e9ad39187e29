"""`python -m neftlab.workspace SPEC [--entity E]`: save the W&B workspace and report that
`python -m neftlab.report SWEEP --wandb` wrote to SPEC (wandb_workspace.json), once the runs are uploaded
(`wandb sync`); prints their URLs (`analysis.wandb_workspace`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .analysis.wandb_workspace import read_spec, save
from .core.errors import first_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.workspace", description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="the wandb_workspace.json that neftlab.report --wandb wrote")
    parser.add_argument("--entity", help="the W&B entity the runs are in (default: logger.entity, else the "
                        "account's default entity)")
    args = parser.parse_args(argv)
    try:
        workspace, report = read_spec(args.spec)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    try:
        urls = save(workspace, report, args.entity)
    except Exception as e:  # noqa: BLE001 - W&B's own errors: no credentials, no network, an unknown project
        print(f"error: W&B did not save the workspace ({first_line(e)}); log in (wandb login), upload the runs "
              f"(wandb sync), and run this again", file=sys.stderr)
        return 1
    for url in urls:
        print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
