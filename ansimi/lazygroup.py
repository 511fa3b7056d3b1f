"""A click group whose subcommands are imported only when they run."""

from __future__ import annotations

import importlib
from typing import Any

import click


class LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so `ansimi --help` stays fast, a
    running agent does not carry the code of commands it never runs (memory is a goal on
    a device), and one part's missing optional dependency never breaks another's.

    `lazy`: subcommand -> ("module:attribute" of a click command, one-line help).
    `aliases`: old name -> subcommand, for a renamed command: it still runs, but is not
    listed in the help.
    """

    def __init__(
        self,
        *args: Any,
        lazy: dict[str, tuple[str, str]],
        aliases: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy
        self.aliases = aliases or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        name = self.aliases.get(name, name)
        if name not in self.lazy:
            return super().get_command(ctx, name)
        target, help_text = self.lazy[name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise

            @click.command(name=name, help=f"{help_text} (not built yet)")
            def missing() -> None:
                raise click.ClickException(f"`ansimi {name}` is not part of this build yet")

            return missing
        command: click.Command = getattr(module, attribute)
        command.help = command.help or help_text
        command.short_help = help_text
        return command
