"""`quantd serve` (also `python -m quantd.server`): settings from flags and QUANTD_* variables."""
from __future__ import annotations

import argparse
import sys

from . import app, config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantd serve", description="start a quantd server")
    config.add_arguments(p)
    return p


def main(argv=None) -> int:
    try:
        settings = config.from_args(parser().parse_args(argv))
        app.pick_devices(settings.device)  # a device that is not there stops the start with the reason
    except ValueError as exc:
        print(f"quantd serve: {exc}", file=sys.stderr)
        return 2
    app.main(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
