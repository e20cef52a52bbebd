"""Name templates: validate them, format them into file names, and parse file names back.

One :class:`NameTemplate` both writes and reads names (like orbax's ``NameFormat``), so pruning,
``overwrite=False`` conflict checks and latest-discovery recognise exactly the files that the same
template wrote. Templates use ``str.format`` fields with Composer's variables (see
:data:`ALL_VARIABLES`); specs such as ``{epoch:03d}`` work. Examples:

======================================  ==================================  ========================
template                                values                              name
======================================  ==================================  ========================
``ep{epoch}-ba{batch}-rank{rank}.pt``   epoch=1, batch=5, rank=0            ``ep1-ba5-rank0.pt``
``{run_name}/ep{epoch:03d}.pt``         run_name='awesome-run', epoch=7     ``awesome-run/ep007.pt``
``t{total_wct}.pt``                     total_wct=36000.0                   ``t36000.0.pt``
``t{total_wct:.1f}-ba{batch}.pt``       total_wct=12.5, batch=3             ``t12.5-ba3.pt``
``ba{batch:_>6}.pt``                    batch=42                            ``ba____42.pt``
``./ckpt+[v1]-{epoch}.pt``              epoch=2                             ``ckpt+[v1]-2.pt``
``latest-rank{rank}.pt``                rank=3                              ``latest-rank3.pt``
======================================  ==================================  ========================

Names are produced from the normalised template (a leading ``./`` or a doubled ``/`` is dropped), so
:meth:`NameTemplate.parse` of a formatted name gives back the values. Unlike Composer we refuse
unknown variables, absolute paths and ``..`` at construction, escape literal text in patterns, and
read ``{run_name}`` and the ``*_wct`` floats back too.
"""

from __future__ import annotations

import difflib
import ntpath
import os
import posixpath
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import NamedTuple

from ckpt_callbacks.errors import InvalidTemplateError, bad_value

__all__ = [
    "ALL_VARIABLES",
    "DIST_VARIABLES",
    "RUN_VARIABLES",
    "TIME_VARIABLES",
    "NameTemplate",
    "check_relative",
    "is_later",
]

RUN_VARIABLES: tuple[str, ...] = ("run_name",)
DIST_VARIABLES: tuple[str, ...] = ("rank", "local_rank", "world_size", "local_world_size", "node_rank")
TIME_VARIABLES: tuple[str, ...] = (
    "epoch", "batch", "batch_in_epoch", "sample", "sample_in_epoch", "token", "token_in_epoch",
    "total_wct", "epoch_wct", "batch_wct",
)
ALL_VARIABLES: tuple[str, ...] = RUN_VARIABLES + DIST_VARIABLES + TIME_VARIABLES

_FLOAT_VARIABLES = frozenset({"total_wct", "epoch_wct", "batch_wct"})
_INT_VARIABLES = frozenset(DIST_VARIABLES + TIME_VARIABLES) - _FLOAT_VARIABLES
# A sample value per kind: a spec is valid for a variable if it formats this value.
_SAMPLES: dict[str, int | float | str] = {"int": 7, "float": 36000.0, "str": "run"}
_KIND_TEXT = {"int": "an integer such as 7", "float": "seconds such as 36000.0", "str": "a string"}
_TYPES = {"int": set("dboxXeEfFgG%"), "float": set("eEfFgG%"), "str": {"s"}}
_DIGITS = {"d": "0-9", "b": "01", "o": "0-7", "x": "0-9a-f", "X": "0-9A-F"}
_BASES = {"b": 2, "o": 8, "x": 16, "X": 16}
# A fill char that can occur inside a number's text could not be told apart from it when parsing.
_NUMBER_CHARS = frozenset(string.ascii_letters + string.digits + ".+-%")
_SPEC = re.compile(
    r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?z?(?P<alt>\#)?(?P<zero>0)?"
    r"(?P<width>[0-9]+)?(?P<grouping>[,_])?(?:\.[0-9]+)?(?P<type>[a-zA-Z%])?",
    re.DOTALL,
)
# Counters that only grow during a run, and those that restart every epoch (section 1.10 of the
# Composer notes). batch_wct is the duration of one batch, not a position in time, so it is never
# compared.
_TOTAL_COUNTERS = ("epoch", "batch", "sample", "token", "total_wct")
_IN_EPOCH_COUNTERS = ("batch_in_epoch", "sample_in_epoch", "token_in_epoch", "epoch_wct")


class _Spec(NamedTuple):
    fill: str
    align: str | None
    grouping: str | None
    alt: bool
    type: str | None
    width: bool


class _Field(NamedTuple):
    literal: str
    name: str | None
    spec: str


def _kind(variable: str) -> str:
    if variable in _FLOAT_VARIABLES:
        return "float"
    return "int" if variable in _INT_VARIABLES else "str"


def _components(path: str) -> list[str]:
    # Split on both separators: a '..' meant for Windows must not slip through on Linux.
    return re.split(r"[/\\]", path)


def _is_absolute(path: str) -> bool:
    return posixpath.isabs(path) or ntpath.isabs(path)


def _refuse(argument: str, accepted: str, value: object) -> InvalidTemplateError:
    return InvalidTemplateError(bad_value(argument, accepted, value))


def _parse_spec(spec: str) -> _Spec:
    match = _SPEC.fullmatch(spec)
    assert match is not None, spec  # format() accepted it, so it follows the spec grammar
    return _Spec(
        fill=match["fill"] or ("0" if match["zero"] else " "),
        align=match["align"],
        grouping=match["grouping"],
        alt=bool(match["alt"]),
        type=match["type"],
        width=bool(match["width"]),
    )


class NameTemplate:
    """A validated name template for a file, folder or object key.

    Args:
        template: The template, e.g. ``'ep{epoch}-ba{batch}-rank{rank}.pt'``; a relative path.
        argument: The name of the argument it came from, used in error messages.
        allowed: The variables this template may use (``folder`` allows no time variables). Names
            outside :data:`ALL_VARIABLES` are allowed as string variables.
        relative: Whether the template must stay inside a folder (file names, keys). A folder
            template itself passes ``relative=False``: it may be absolute or use ``..``.

    Attributes:
        template: The template as given (names come from its normalised form).
        argument: The argument named in error messages.
        variables: The variables the template uses.
        has_counter: Whether it uses a time variable (else every save gets the same name).

    Raises:
        InvalidTemplateError: The template is empty, absolute, ends with ``/``, contains a ``..``
            component, has unbalanced braces, a positional, unknown, attribute or index field, a
            conversion, or a format spec that does not suit its variable or cannot be read back.

    Example:
        >>> t = NameTemplate("{run_name}/ep{epoch:03d}.pt", argument="filename")
        >>> t.format(run_name="awesome-run", epoch=7)
        'awesome-run/ep007.pt'
        >>> t.parse("awesome-run/ep007.pt")
        {'run_name': 'awesome-run', 'epoch': 7}
    """

    def __init__(
        self,
        template: str | os.PathLike[str],
        *,
        argument: str,
        allowed: Iterable[str] = ALL_VARIABLES,
        relative: bool = True,
    ) -> None:
        accepted = "a relative path template such as 'ep{epoch}-ba{batch}-rank{rank}.pt'"
        if not isinstance(template, (str, os.PathLike)):
            raise _refuse(argument, accepted, template)
        # A PurePath is written with '/' on every platform, like the rest of the template.
        text = template.as_posix() if isinstance(template, PurePath) else os.fspath(template)
        if not isinstance(text, str) or not text:
            raise _refuse(argument, accepted, template)
        if relative and _is_absolute(text):
            raise _refuse(argument, f"{accepted} (not an absolute path)", text)
        if relative and text.endswith(("/", "\\")):
            raise _refuse(argument, "a template that does not end with '/'", text)
        if relative and ".." in _components(text):
            raise _refuse(argument, "a template that stays inside its folder (no '..' component)", text)
        self.template: str = text
        self.argument: str = argument
        self.allowed: tuple[str, ...] = tuple(allowed)
        # Normalising before parsing is safe: a '/' inside a field can only be a fill char (refused).
        self._fields = self._parse(posixpath.normpath(text))
        self.variables: frozenset[str] = frozenset(f.name for f in self._fields if f.name is not None)
        self.has_counter: bool = not self.variables.isdisjoint(TIME_VARIABLES)

    def _parse(self, text: str) -> list[_Field]:
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError:
            accepted = "a template with balanced braces (write '{{' and '}}' for literal ones)"
            raise _refuse(self.argument, accepted, self.template) from None
        fields = []
        for literal, name, spec, conversion in parsed:
            if name is not None:
                self._check_field(name, spec or "", conversion)
            fields.append(_Field(literal, name, spec or ""))
        return fields

    def _check_field(self, name: str, spec: str, conversion: str | None) -> None:
        def refuse(accepted: str) -> InvalidTemplateError:
            return _refuse(self.argument, accepted, self.template)

        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if re.search(r"[.\[]", name):
            raise refuse(f"a template of plain variables such as '{{epoch}}' ({field} uses '.' or '[]')")
        if name == "" or name.isdigit():
            raise refuse(f"a template of named variables such as '{{epoch}}' ({field} is positional)")
        if name not in self.allowed:
            known = ", ".join("{" + v + "}" for v in self.allowed)
            # Composer leaves unknown placeholders in the name; a typo like {epcoh} would then
            # silently write one file that every save overwrites, so we refuse.
            close = difflib.get_close_matches(name, self.allowed, n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else ""
            raise refuse(f"a template using only the variables {known} ({field} is not one of them{hint})")
        if conversion:
            raise refuse(f"a template without conversions ({field} uses '!{conversion}')")
        if "{" in spec:
            raise refuse(f"a template without nested fields in format specs (got {field})")
        kind = _kind(name)
        unsuitable = f"a template whose format specs suit their variables ({field} cannot format {_KIND_TEXT[kind]})"
        try:
            format(_SAMPLES[kind], spec)
        except ValueError:
            raise refuse(unsuitable) from None
        parsed = _parse_spec(spec)
        # 'c' and 'n' format, but a character code or a locale's digits make no file name to read back.
        if parsed.type is not None and parsed.type not in _TYPES[kind]:
            raise refuse(unsuitable)
        if parsed.width and parsed.fill in "/\\":
            raise refuse(f"a template that does not pad with path separators (got {field})")
        zero_padded = parsed.fill == "0" and parsed.align in (None, ">", "=")
        in_number = parsed.fill in _NUMBER_CHARS or parsed.fill == parsed.grouping
        if kind != "str" and parsed.width and in_number and not zero_padded:
            raise refuse(f"a template whose names can be read back ({field} pads numbers with {parsed.fill!r})")

    def __str__(self) -> str:
        return self.template

    def __repr__(self) -> str:
        return f"NameTemplate({self.template!r}, argument={self.argument!r})"

    def format(self, **values: object) -> str:
        """Return the name for ``values``; extra values are ignored.

        Raises:
            KeyError: A variable the template uses is missing from ``values``.

        Example:
            >>> NameTemplate("ep{epoch}-ba{batch}-rank{rank}.pt", argument="filename").format(
            ...     epoch=1, batch=5, rank=0, run_name="unused")
            'ep1-ba5-rank0.pt'
        """
        return "".join(
            f.literal + ("" if f.name is None else format(values[f.name], f.spec)) for f in self._fields
        )

    def partial_format(self, **values: object) -> str:
        """Fill the variables given and leave the others as literal placeholders, specs kept.

        This is Composer's ``partial_format``: used where only some values are known yet (the folder
        before the rank is known, say). Literal ``{{``/``}}`` come out as single braces, as in Composer.

        Example:
            >>> NameTemplate("{run_name}/ep{epoch:03d}.pt", argument="filename").partial_format(run_name="r")
            'r/ep{epoch:03d}.pt'
        """
        parts = []
        for f in self._fields:
            parts.append(f.literal)
            if f.name in values:
                parts.append(format(values[f.name], f.spec))
            elif f.name is not None:
                parts.append("{" + f.name + (f":{f.spec}" if f.spec else "") + "}")
        return "".join(parts)

    def pattern(self, **fixed: object) -> re.Pattern[str]:
        """Return a regex that matches (from start to end) the names this template produces.

        Variables in ``fixed`` are substituted; every other variable becomes a named group. The
        regex is slightly permissive about numbers (``ep{epoch}`` matches ``ep01``); :meth:`parse`
        is exact.

        Example:
            >>> p = NameTemplate("ep{epoch}-rank{rank}.pt", argument="filename").pattern(rank=0)
            >>> p.fullmatch("ep3-rank0.pt")["epoch"], p.fullmatch("ep3-rank1.pt")
            ('3', None)
        """
        parts = [r"\A"]
        seen: dict[str, str] = {}
        for f in self._fields:
            parts.append(re.escape(f.literal))
            if f.name is None:
                continue
            if f.name in fixed:
                parts.append(re.escape(format(fixed[f.name], f.spec)))
            elif f.name not in seen:
                seen[f.name] = f.spec
                parts.append(f"(?P<{f.name}>{_value_regex(_kind(f.name), _parse_spec(f.spec))})")
            elif seen[f.name] == f.spec:
                parts.append(f"(?P={f.name})")  # the same value must appear again
            else:
                # Another spec renders the same value differently; parse() checks they agree.
                parts.append(f"(?:{_value_regex(_kind(f.name), _parse_spec(f.spec))})")
        parts.append(r"\Z")
        return re.compile("".join(parts))

    def parse(self, name: str, **fixed: object) -> dict[str, int | float | str] | None:
        """Return the variables of a relative ``/``-separated name, or None if this template did not write it.

        A name matches only if formatting the values read back gives the same name again.

        Example:
            >>> t = NameTemplate("t{total_wct}-rank{rank}.pt", argument="filename")
            >>> t.parse("t36000.0-rank0.pt", rank=0), t.parse("t36000.0-rank1.pt", rank=0)
            ({'total_wct': 36000.0}, None)
        """
        if _is_absolute(name) or ".." in _components(name):
            return None
        name = posixpath.normpath(name)
        match = self.pattern(**fixed).fullmatch(name)
        if match is None:
            return None
        specs = {f.name: f.spec for f in reversed(self._fields) if f.name is not None}
        values: dict[str, int | float | str] = {}
        for variable, text in match.groupdict().items():
            value = _decode(_kind(variable), _parse_spec(specs[variable]), text)
            if value is None:
                return None
            values[variable] = value
        if self.format(**fixed, **values) != name:
            return None
        return values


def _value_regex(kind: str, spec: _Spec) -> str:
    if kind == "str":
        # Padding of a string is part of the match; _decode strips it.
        return r"[^/]+?"
    group = f"|{re.escape(spec.grouping)}" if spec.grouping else ""
    if spec.type in _DIGITS or (kind == "int" and spec.type is None):
        digits = _DIGITS[spec.type or "d"]
        prefix = re.escape("0" + spec.type) if spec.alt and spec.type in _BASES else ""
        body = f"{prefix}[{digits}](?:[{digits}]{group})*"
    else:
        body = rf"[0-9](?:[0-9]{group})*(?:\.[0-9]*)?(?:[eE][-+][0-9]+)?%?"
    pad = f"(?:{re.escape(spec.fill)})*" if spec.width else ""
    return f"{pad}[-+ ]?{pad}{body}{pad}"


def _decode(kind: str, spec: _Spec, text: str) -> int | float | str | None:
    if kind == "str":
        if not spec.width:
            return text
        align = spec.align or "<"
        if align in "<^":
            text = text.rstrip(spec.fill)
        return text.lstrip(spec.fill) if align in ">^" else text
    # Fill chars never occur in a number's text (checked at construction), except leading zeros.
    if spec.width and spec.fill != "0":
        text = text.replace(spec.fill, "")
    if spec.grouping:
        text = text.replace(spec.grouping, "")
    try:
        if spec.type in _BASES:
            return int(text, _BASES[spec.type])
        if kind == "int" and spec.type in (None, "d"):
            return int(text)
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None
    if kind == "float":
        return value
    return int(value) if value.is_integer() else None


def is_later(found: Mapping[str, int | float | str], current: Mapping[str, int | float]) -> bool:
    """Return True if a name's counters are ahead of ``current``: a later save would overwrite it.

    Composer's ``overwrite=False`` rule: any of epoch, batch, sample, token or total_wct greater than
    now; the in-epoch counters (and epoch_wct) count only when ``found`` is from the current epoch.
    Equal counters are not later, and counters missing from either side are not compared.

    Example:
        >>> is_later({"epoch": 1, "batch_in_epoch": 9}, {"epoch": 2, "batch_in_epoch": 3})
        False
        >>> is_later({"epoch": 2, "batch_in_epoch": 9}, {"epoch": 2, "batch_in_epoch": 3})
        True
    """

    def ahead(counters: tuple[str, ...]) -> bool:
        return any(c in found and c in current and found[c] > current[c] for c in counters)  # type: ignore[operator]

    if ahead(_TOTAL_COUNTERS):
        return True
    same_epoch = "epoch" in found and "epoch" in current and found["epoch"] == current["epoch"]
    return same_epoch and ahead(_IN_EPOCH_COUNTERS)


def check_relative(name: str | os.PathLike[str], *, argument: str) -> str:
    """Return a fully formatted name normalised, refusing names that leave their folder.

    A template can be safe while a value is not: ``{run_name}/x`` with an empty run name is ``/x``.

    Raises:
        InvalidTemplateError: ``name`` is empty, absolute, or has a ``..`` component.

    Example:
        >>> check_relative("./awesome-run//ep1.pt", argument="filename")
        'awesome-run/ep1.pt'
    """
    text = os.fspath(name)
    accepted = "a relative path inside its folder (not absolute, no '..' component)"
    if not text or _is_absolute(text) or ".." in _components(text):
        raise _refuse(argument, accepted, text)
    return posixpath.normpath(text)
