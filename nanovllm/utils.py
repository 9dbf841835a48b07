"""Small helpers with vLLM's names, so that vLLM's example scripts run after a change of import."""

from __future__ import annotations

import argparse


class FlexibleArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that also accepts `--flag_name` for `--flag-name` (as vLLM's does)."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = [_dashed(a) for a in args]
        else:
            import sys

            args = [_dashed(a) for a in sys.argv[1:]]
        return super().parse_known_args(args, namespace)


def _dashed(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value
