"""``lpeer``: the typer application. Each command parses, calls one library function, renders."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import typer

from lifelong_peer import __version__
from lifelong_peer.errors import Interrupted, UserError

from .options import FormatOpt, WorkspaceOpt
from .output import Format, emit, key_value_table, labelled, stderr, stdout

app = typer.Typer(
    name="lpeer",
    help="Continual learning for language models with growable PEER expert pools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


_default_showwarning = warnings.showwarning


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lpeer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Continual learning for language models with growable PEER expert pools.

    Example: lpeer info --format json
    """


@app.command()
def info(
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
    full: bool = typer.Option(
        False, "--full", help="Also import torch and faiss: threads, CPU code path, CUDA devices, faiss GPUs."
    ),
) -> None:
    """Versions of torch / faiss / datasets, the CPU, the native kernels and the workspace; --full adds threads,
    CUDA and faiss-GPU availability (a bug report wants --full).

    Example: lpeer info --full --format json
    """
    from lifelong_peer.system import info as system_info
    from lifelong_peer.workspace import default_root

    data = system_info(full) | {"workspace": str(workspace or default_root())}
    emit(data, fmt, lambda d: stdout.print(key_value_table(d, title="lifelong-peer environment")))


from .streams_cmds import register as _register_streams  # noqa: E402  (init, ingest, streams)

_register_streams(app)

from .run_cmds import register as _register_runs  # noqa: E402  (run, train)

_register_runs(app)

from .demo_cmds import register as _register_demo  # noqa: E402  (demo)

_register_demo(app)


from . import eval_cmds  # noqa: E402  (after `app`, to keep the command order of --help)

app.command("eval")(eval_cmds.eval_cmd)
app.command("report")(eval_cmds.report_cmd)

from .index_cmds import register as _register_index  # noqa: E402  (inspect, grow, freeze)

_register_index(app)

from .use_cmds import register as _register_use  # noqa: E402  (score, generate, export)

_register_use(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """lifelong-peer's own warnings (a damaged checkpoint skipped, ...) as one line on stderr."""
    from lifelong_peer.files import IntegrityWarning

    if issubclass(category, IntegrityWarning):
        stderr.print(labelled("warning:", "yellow", str(message)), highlight=False)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main() -> None:
    """Entry point: user errors → one line on stderr and exit 2; internal errors → exit 1; Ctrl-C →
    one line saying what was saved and exit 130 (issue 17: it exited 0, silently).

    Errors of the environment (a missing or unreadable file, a full disk) are user errors too.
    """
    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)  # typer returns the exit code of a typer.Exit, or of Ctrl-C (130)
    except Interrupted as e:
        stderr.print(str(e), highlight=False)
        sys.exit(130)
    except UserError as e:
        stderr.print(labelled("error:", "red", str(e)), highlight=False)
        sys.exit(2)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        stderr.print(labelled("error:", "red", f"{e.strerror or e}{where}"), highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        stderr.print("aborted")
        sys.exit(130)
    except Exception as e:
        try:  # typer ≥ 0.16 vendors its own click: usage errors are its exceptions, not click's
            from typer._click.exceptions import ClickException
        except ImportError:  # pragma: no cover - older typer
            from click.exceptions import ClickException

        if isinstance(e, ClickException):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("LPEER_DEBUG") == "1":
            traceback.print_exc()
        else:
            text = f"{type(e).__name__}: {e} (set LPEER_DEBUG=1 for a traceback)"
            stderr.print(labelled("internal error:", "red", text), highlight=False)
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:  # Ctrl-C outside the library's own handling (typer turned it into Exit(130))
            stderr.print("interrupted; nothing more was saved", highlight=False)
        sys.exit(code)


if __name__ == "__main__":
    main()
