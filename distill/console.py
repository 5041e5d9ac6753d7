"""The one rich console everything distill prints goes through."""

from rich.console import Console

console = Console(highlight=False)
