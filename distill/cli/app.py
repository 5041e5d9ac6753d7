"""The `distill` app: its root options, and how every command turns a failure into one sentence."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

import typer
from rich.markup import escape
from distill import __version__
from distill.errors import DistillError, ProcessStalled

app = typer.Typer(
    name="distill", rich_markup_mode="rich", no_args_is_help=True, pretty_exceptions_enable=False,
    help="The DeiT pipeline in chained stages: [bold]teach[/] a RegNetY teacher, distil a DeiT [bold]student[/], "
         "[bold]finetune[/] it at a higher resolution (FixRes), [bold]transfer[/] it to a new dataset. "
         "Each stage writes one self-describing safetensors checkpoint.",
)
_debug = {"on": bool(os.environ.get("DISTILL_DEBUG"))}


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _console():
    from distill.console import console

    return console


def run_guarded(action: Callable[[], Any]) -> Any:
    """Every failure a user can cause becomes one sentence and a non-zero exit; --debug shows the traceback."""
    try:
        result = action()
        group = sys.modules.get("distill.training.processes")  # loaded once a run has made its processes
        if group is not None:
            group.close_processes()
        return result
    except DistillError as error:
        if _debug["on"]:
            raise
        if _is_main_process() or isinstance(error, ProcessStalled):  # the waiting process says it, whichever it is
            _console().print(f"[bold red]error:[/] {escape(error.sentence)}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if _is_main_process():
            _console().print("[yellow]Interrupted.[/] Run the same command again: it resumes from the last saved state "
                             "where one was saved, and starts afresh where none was.")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # a defect, not bad input: still one line unless --debug
        if _debug["on"]:
            raise
        waited = _timed_out(error)
        if waited is not None:  # said by whichever process gave up: process 0 may be the one that fell behind
            _console().print(f"[bold red]error:[/] {escape(waited)}", soft_wrap=True)
            raise typer.Exit(2) from None
        if _is_main_process():
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _console().print(f"[bold red]unexpected error:[/] {type(error).__name__}: {escape(first)} "
                             "(run with --debug for the traceback).", soft_wrap=True)
        raise typer.Exit(1) from None


def _timed_out(error: Exception) -> str | None:
    """The sentence for a collective operation that outlasted the process group's timeout, or None."""
    group = sys.modules.get("distill.training.processes")  # loaded once a run has made its processes
    seconds = getattr(group, "PROCESS_GROUP", {}).get("seconds") if group else None
    text = f"{type(error).__name__}: {error}"
    collective = type(error).__name__ == "DistBackendError" or re.search(r"\bgloo\b|\bnccl\b", text, re.IGNORECASE)
    if seconds is None or not collective or not re.search(r"timed out|timeout", text, re.IGNORECASE):
        return None
    rank = os.environ.get("RANK", "0")
    return (f"Process {rank} waited more than --dist-timeout {seconds:g} s for the others in a collective operation: "
            "one of them fell behind (a slow disk, a long evaluation) or stopped; see its output, or raise "
            "--dist-timeout.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"distill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version,
                                 is_eager=True),
) -> None:
    _debug["on"] = _debug["on"] or debug


def one_of(value: Any, alias: Any, flag: str, alias_flag: str) -> Any:
    """An option and its older spelling (kept as a hidden alias): either one, the same value twice, never two values."""
    if value is not None and alias is not None and value != alias:
        raise DistillError(f"{alias_flag} is the older spelling of {flag}; give one of them.")
    return value if value is not None else alias


def main() -> None:
    app(prog_name="distill")
