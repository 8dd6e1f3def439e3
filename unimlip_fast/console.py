"""The one way the package makes its rich console: on a terminal, rich as usual; sent to a file or
a pipe, lines are never wrapped (logs stay greppable: no number cut from its unit, no path cut in two)."""

from __future__ import annotations

from rich.console import Console


def make_console(stderr: bool = True) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
    return console
