"""Command line of the compute core: ``python -m hetplugin.core <command> [job.json] [--options]``.

Every option is a flag; a JSON job file (positional, or ``--job``) may carry the
same options (keys with dashes or underscores), and flags given on the command
line win. Progress goes to standard output, one line per step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import commands


def _apply_job_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Turn the job file's keys into parser defaults, validating the names."""
    job = None
    rest = list(argv)
    if rest and rest[0].endswith(".json") and not rest[0].startswith("-"):
        job = rest.pop(0)
    if "--job" in rest:
        i = rest.index("--job")
        job = rest[i + 1]
        del rest[i:i + 2]
    if job is None:
        return rest
    try:
        values = json.loads(Path(job).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"cannot read job file {job}: {exc}")
    known = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in known:
            raise SystemExit(f"job file {job}: unknown option '{key}' (see --help)")
        defaults[dest] = value
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.required:
            action.required = False
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m hetplugin.core",
                                     description="hetplugin compute core: simulation, reconstruction and "
                                                 "heterogeneity analysis on RELION STAR files and MRC stacks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, (helptext, add_args, _) in commands.COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--job", help="JSON file with any of these options (flags given here win)")
        add_args(p)
        parsers[name] = p
    if argv and argv[0] in parsers:
        argv = [argv[0]] + _apply_job_file(parsers[argv[0]], argv[1:])
    args = parser.parse_args(argv)
    start = time.time()
    try:
        commands.COMMANDS[args.command][2](args)
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{args.command}: done in {time.time() - start:.1f} s", flush=True)
    return 0
