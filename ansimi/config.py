"""Load TOML config files into pydantic models, with errors an installer can act on.

Every error names the file, the key and the fix: "gateway.toml: key `forward.timeout_s`:
Input should be greater than 0 (got -1). Fix: set a positive number of seconds."
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, Field, ValidationError
from pydantic_core import ErrorDetails

from ansimi.errors import AnsimiError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(AnsimiError, ValueError):
    """A config file is missing, not TOML, or has a bad value."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "\n  ".join(problems))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, or inside a list, an Optional or Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for inner in typing.get_args(annotation):
        found = _model_in(inner)
        if found is not None:
            return found
    return None


def _keys_at(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The keys the table at `path` (a list's items by index) accepts; [] if not known."""
    current: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int):
            continue  # an item of an array of tables: the field's model already
        field = current.model_fields.get(part) if current is not None else None
        current = _model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _unknown_key_fix(model: type[BaseModel], loc: Sequence[int | str]) -> str:
    unknown = str(loc[-1])
    near = difflib.get_close_matches(unknown, _keys_at(model, loc[:-1]), n=1, cutoff=0.6)
    if near:
        return f"did you mean `{near[0]}`? Rename it, or remove it (see the example file)"
    return "remove it, or check its spelling against the example file"


def _describe(error: ErrorDetails, model: type[BaseModel]) -> str:
    location = ".".join(str(part) for part in error["loc"] if part != "__root__")
    kind = error["type"]
    message = error["msg"]
    if "Fix:" in message:
        # a check that knows its own fix (a rule across several keys) says it best
        where = f"key `{location}`" if location else "top level"
        return f"{where}: {message.removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        fix = _unknown_key_fix(model, error["loc"])
    elif kind == "missing":
        fix = "add it (see the example file for its meaning)"
    else:
        got = error["input"]
        shown = repr(got) if not isinstance(got, dict) else "a table"
        fix = f"got {shown[:60]}; change it to a valid value (see the example file)"
    where = f"key `{location}`" if location else "top level"
    return f"{where}: {message}. Fix: {fix}"


def parse_config(text: str, model: type[Model], path: Path) -> Model:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}. Fix: correct the syntax there"]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [_describe(e, model) for e in exc.errors()]) from None


def load_config(path: Path, model: type[Model], *, missing_ok: bool = False) -> Model:
    """Read and validate `path`; a missing file gives the defaults only if `missing_ok`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return model()
        raise ConfigError(
            path, ["file not found. Fix: create it from the example file, or pass --config"]
        ) from None
    except PermissionError:
        raise ConfigError(
            path, ["cannot read it. Fix: make it readable by the service user"]
        ) from None
    return parse_config(text, model, path)


# a broker's address in a config file; the device's and the gateway's lists of brokers
def broker_address(text: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets, `[::1]:8883`) as (host, port)."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or any(c.isspace() for c in host):
        raise ValueError(f'{text!r} is not host:port (for example "10.0.0.2:8883")')
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def _all_broker_addresses(texts: list[str]) -> list[str]:
    for text in texts:
        broker_address(text)
    return texts


# further brokers, "host:port" each, tried in turn after the first (a cluster's nodes)
BrokerAddresses = Annotated[list[str], Field(max_length=8), AfterValidator(_all_broker_addresses)]


def broker_addresses(texts: list[str]) -> tuple[tuple[str, int], ...]:
    """A checked `BrokerAddresses` list as (host, port) pairs."""
    return tuple(broker_address(text) for text in texts)
