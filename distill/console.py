"""The one rich console everything distill prints goes through."""

from typing import Iterable

from rich.console import Console

console = Console(highlight=False)


def listing(items: Iterable[object], limit: int = 6) -> str:
    """`a, b, c`, or `a, b, c, ... (12 in all)` when there are more than `limit`: a cut list always says so."""
    items = [str(item) for item in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])}, ... ({len(items)} in all)"
