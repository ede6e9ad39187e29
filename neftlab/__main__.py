"""`python -m neftlab [overrides]` — the Hydra app. `--help` lists the config groups and their options."""

import sys

import hydra

from .config import register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _app(cfg) -> None:
    from . import runner  # imported here so --help and --cfg stay fast

    runner.main(cfg)


def main() -> None:
    _app()
    from . import runner

    if runner.FAILED:
        print(f"{len(runner.FAILED)} job(s) failed:", file=sys.stderr)
        for out_dir, error in runner.FAILED:
            print(f"  {out_dir}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
