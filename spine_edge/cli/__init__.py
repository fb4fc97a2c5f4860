"""The ``spine-edge`` command line: a click group whose subcommands live in sibling modules.

CLI modules stay thin: parse options, build a config, call one library function, print. Commands
that need training or export packages import them inside the command, so ``spine-edge --help``
works on a runtime-only install.
"""

from __future__ import annotations

import logging
import sys

import click

from spine_edge import __version__
from spine_edge.errors import SpineEdgeError
from spine_edge.support import import_optional

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_SOME_INPUTS_FAILED = 1
EXIT_USAGE = 2
EXIT_SETUP = 3
EXIT_GATE_FAILED = 4


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spine-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Spine X-ray triage and lesion detection for edge boxes (ONNX Runtime / TensorRT)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)


def fail(exc: SpineEdgeError, code: int = EXIT_SETUP) -> None:
    """Print a project error as one line and exit with ``code``."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _register() -> None:
    from spine_edge.cli import bench, build, data, infer
    from spine_edge.cli import export as export_cmd
    from spine_edge.cli import train

    main.add_command(data.data)
    main.add_command(build.build_engines)
    main.add_command(infer.infer)
    main.add_command(bench.bench)
    main.add_command(export_cmd.export)
    main.add_command(train.train)


_register()
