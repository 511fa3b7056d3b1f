"""Writing a TOML config: one renderer, every value escaped, checked by reading it back.

A config written with f-strings breaks on the first path or secret holding a quote or a
backslash, and then the service does not start. `render_toml` writes strings as JSON
strings (a JSON string is a valid TOML basic string), and reads its own text back: what it
returns parses to exactly the document it was given, or it raises.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from ansimi.errors import AnsimiError


class TomlWriteError(AnsimiError, ValueError):
    """A document that cannot be written as TOML (a type TOML has no form for)."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | PurePath):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TomlWriteError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _plain(value: Any) -> Any:
    """The document as TOML reads it back: paths are strings, tuples lists, no None."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def render_toml(
    document: Mapping[str, Any],
    *,
    header: Sequence[str] = (),
    comments: Mapping[str, str] | None = None,
) -> str:
    """`document` as TOML: top-level keys, then tables, then arrays of tables.

    `header` lines open the file as comments; `comments` puts a comment before a table
    (by its dotted name). A None value is written as `# key (unset)`: the option is shown,
    its default applies.
    """
    notes = comments or {}
    lines = [f"# {line}" if line else "#" for line in header]

    def comment(name: str) -> None:
        if name in notes:
            lines.extend(f"# {line}" for line in notes[name].splitlines())

    def keys(values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping) or _is_table_array(value):
                continue
            lines.append(f"# {key} (unset)" if value is None else f"{key} = {toml_value(value)}")

    def tables(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                lines.append("")
                comment(name)
                lines.append(f"[{name}]")
                keys(value)
                tables(f"{name}.", value)
            elif _is_table_array(value):
                for entry in value:
                    lines.append("")
                    comment(name)
                    lines.append(f"[[{name}]]")
                    keys(entry)
                    tables(f"{name}.", entry)

    keys(document)
    tables("", document)
    text = "\n".join(lines).lstrip("\n") + "\n"
    # what we write must read back as what we were given, or the service would not start
    if tomllib.loads(text) != _plain(document):
        raise TomlWriteError("internal error: the written TOML does not read back the same")
    return text
