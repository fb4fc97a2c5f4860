"""The ``spine-edge`` command line: a click group whose subcommands live in sibling modules.

CLI modules stay thin: parse options, build a config, call one library function, print. Commands
that need training or export packages import them inside the command, so ``spine-edge --help``
works on a runtime-only install.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import click

from spine_edge import __version__
from spine_edge.errors import SpineEdgeError

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_SOME_INPUTS_FAILED = 1
EXIT_USAGE = 2
EXIT_SETUP = 3
EXIT_GATE_FAILED = 4
#: The output disk filled up (ENOSPC/EDQUOT): the run stopped, every finished result kept.
EXIT_DISK_FULL = 5
#: Every input was processed, none failed, but the guard refused some (wrong modality, colour photo,
#: out of distribution): they are in the results as ``refused``, not judged.
EXIT_SOME_REFUSED = 6
#: 128 + SIGINT: Ctrl-C, in every command (click alone would exit 1, which means "some inputs failed").
EXIT_INTERRUPTED = 130
#: 128 + SIGTERM: systemd's or ``docker stop``'s stop request, handled like Ctrl-C (finished results
#: kept, CSV written) and reported with the conventional status.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so the same cleanup as for Ctrl-C runs."""


_MAIN_PID = os.getpid()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked worker (data synth/prepare pools) inherits the handler; it must simply die, as
        # the default action would, so the parent's pool breaks and the parent's cleanup runs.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated


class _Group(click.Group):
    """The command group, with one place that turns Ctrl-C and SIGTERM into their exit codes.

    Commands keep their own ``except KeyboardInterrupt`` where they have something to say (where
    the finished results are); everything else ends here with one line instead of a traceback.
    """

    # click overloads main() on standalone_mode; this one always runs click non-standalone and exits
    # itself, so it has the one signature.
    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> None:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_terminated)
        extra.pop("standalone_mode", None)
        try:
            super().main(args, prog_name, standalone_mode=False, **extra)
        except (KeyboardInterrupt, click.exceptions.Abort) as exc:
            # click turns KeyboardInterrupt (and so Terminated) into Abort, keeping it as the cause.
            cause = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__ or exc.__context__
            if isinstance(cause, Terminated):
                click.echo("terminated (SIGTERM): finished results are kept", err=True)
                sys.exit(EXIT_TERMINATED)
            click.echo("interrupted: finished results are kept", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)


def exit_for_interrupt(exc: KeyboardInterrupt) -> int:
    """The exit status for an interruption: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    from spine_edge.cli import bench, build, data, infer, listen, serve, train, watch
    from spine_edge.cli import explain as explain_cmd
    from spine_edge.cli import export as export_cmd

    main.add_command(data.data)
    main.add_command(build.build_engines)
    main.add_command(infer.infer)
    main.add_command(bench.bench)
    main.add_command(export_cmd.export)
    main.add_command(train.train)
    main.add_command(listen.listen)
    main.add_command(serve.serve)
    main.add_command(watch.watch)
    main.add_command(explain_cmd.explain)


_register()
