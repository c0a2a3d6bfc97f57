"""A tool's arguments on pydantic (#19): the JSON schema of a function's parameters, in
strict form, and the arguments the model sends validated back into the parameters' types.

The parameters become one TypedDict (a parameter with a default is `NotRequired`, so the
function's own default applies when the model leaves it out), which pydantic's
`TypeAdapter` turns into a JSON schema and validates against: any type pydantic takes
works, pydantic models, dataclasses and TypedDicts included. Descriptions come from the
Google-style docstring (`Args:`), from `Annotated[X, "text"]`, or from
`Annotated[X, Field(description=...)]` (the last wins). `_strict.py` makes the schema
strict-ready, and turns the `null` the model sends for an optional parameter back into
"not given".

Internal interface, used by `tools/_tool.py` only: `is_coroutine_function`,
`ArgumentsCheck`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, NotRequired, get_args, get_origin, get_type_hints

from .._exceptions import OutputValidationError
from .._pydantic import TypeCheck, require_pydantic, summary
from .._strict import StrictSchema, strict_schema

__all__ = ["ArgumentsCheck", "is_coroutine_function"]


def is_coroutine_function(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, functools.partial):
        return False
    # An instance whose class defines `async def __call__`.
    return inspect.iscoroutinefunction(type(fn).__call__)


def _hint_source(fn: object) -> object:
    if isinstance(fn, functools.partial):
        return _hint_source(fn.func)
    if inspect.isroutine(fn):
        return inspect.unwrap(fn)
    return type(fn).__call__


class ArgumentsCheck:
    """A function's parameters as one object: its strict JSON schema (`schema`) and the
    validation of the model's arguments (`parse`).

    Args:
        fn: the function.
        name: the tool's name, for messages.
        arg_docs: the docstring's `Args:` texts by parameter name.

    Raises:
        ImportError: pydantic is not installed.
        TypeError: a parameter cannot be passed by name from JSON, has no annotation, or
            a type pydantic or a strict schema cannot express.
    """

    def __init__(self, fn: Callable[..., object], name: str, arg_docs: Mapping[str, str]) -> None:
        where = f"tool {name!r}"
        require_pydantic(f"tool() (for {where})")
        from pydantic import ConfigDict

        # typing_extensions' TypedDict, which pydantic needs before Python 3.12 (it comes
        # with pydantic).
        from typing_extensions import TypedDict

        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: cannot read the signature ({exc}); pass schema=") from exc
        try:
            hints = get_type_hints(_hint_source(fn), include_extras=True)
        except Exception as exc:  # NameError for a name not importable where fn was defined
            raise TypeError(f"{where}: cannot resolve the type annotations ({exc})") from exc
        fields: dict[str, object] = {}
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise TypeError(
                    f"{where}: parameter {param.name!r} cannot be passed by name from JSON "
                    "(no *args, **kwargs or positional-only parameters); pass schema="
                )
            if param.name not in hints:
                raise TypeError(f"{where}: parameter {param.name!r} has no type annotation")
            hint = _described(hints[param.name], arg_docs.get(param.name))
            fields[param.name] = hint if param.default is param.empty else NotRequired[hint]
        arguments: type = TypedDict(f"{name}_arguments", fields)  # type: ignore[misc]
        # Unknown arguments are an error the model reads, as the schema forbids them.
        arguments.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
        self._check = TypeCheck(arguments, where)
        try:
            self._strict: StrictSchema = strict_schema(self._check.json_schema(), where=where)
        except TypeError as exc:
            raise TypeError(f"{exc} (or pass schema= to send a schema as given)") from None
        self.names = tuple(fields)

    @property
    def schema(self) -> dict[str, object]:
        """The strict JSON schema of the arguments object."""
        return self._strict.schema

    def parse(self, arguments: Mapping[str, object]) -> dict[str, object]:
        """The model's decoded arguments validated into keyword arguments for the function
        (a null sent for a parameter with a default leaves it to the default).

        Raises:
            ValueError: they do not fit the parameters (pydantic's errors, summed up).
        """
        restored = self._strict.restore_defaults(dict(arguments))
        try:
            validated = self._check.validate(restored)
        except OutputValidationError as exc:
            raise ValueError(summary(exc.errors)) from None
        assert isinstance(validated, dict)
        return validated


def _described(hint: object, doc: str | None) -> object:
    """`hint` with its description as pydantic reads it: `Annotated[X, "text"]`'s texts, else
    the docstring's; a `Field(description=...)` of its own still wins (it comes later)."""
    from pydantic import Field

    metadata: list[object] = []
    if get_origin(hint) is Annotated:
        hint, *metadata = get_args(hint)
    notes = [m for m in metadata if isinstance(m, str)]
    metadata = [m for m in metadata if not isinstance(m, str)]
    description = " ".join(notes) or doc
    if description:
        metadata.insert(0, Field(description=description))
    if not metadata:
        return hint
    return Annotated.__class_getitem__((hint, *metadata))  # type: ignore[attr-defined]
