"""Tests of ckpt_callbacks.naming: template validation, formatting, patterns and parsing back."""

from __future__ import annotations

import doctest
import re
from pathlib import Path, PurePosixPath

import pytest

import ckpt_callbacks.naming as naming
from ckpt_callbacks.errors import ConfigurationError, InvalidTemplateError
from ckpt_callbacks.naming import (
    ALL_VARIABLES,
    DIST_VARIABLES,
    RUN_VARIABLES,
    TIME_VARIABLES,
    NameTemplate,
    check_relative,
    is_later,
)

# Composer's test-pinned timestamp (composer-semantics.md section 2), plus run and rank values.
VALUES: dict[str, int | float | str] = {
    "run_name": "awesome-training-run",
    "rank": 3,
    "local_rank": 1,
    "world_size": 8,
    "local_world_size": 4,
    "node_rank": 0,
    "epoch": 0,
    "batch": 1,
    "batch_in_epoch": 1,
    "sample": 2,
    "sample_in_epoch": 2,
    "token": 3,
    "token_in_epoch": 3,
    "total_wct": 36000.0,
    "epoch_wct": 3000.0,
    "batch_wct": 5.0,
}


def test_variable_constants() -> None:
    assert RUN_VARIABLES == ("run_name",)
    assert DIST_VARIABLES == ("rank", "local_rank", "world_size", "local_world_size", "node_rank")
    assert len(TIME_VARIABLES) == 10 and "total_wct" in TIME_VARIABLES
    assert ALL_VARIABLES == RUN_VARIABLES + DIST_VARIABLES + TIME_VARIABLES
    assert set(VALUES) == set(ALL_VARIABLES)


def test_docstring_examples() -> None:
    assert doctest.testmod(naming).failed == 0


@pytest.mark.parametrize(
    ("template", "values", "name"),
    [
        ("ep{epoch}-ba{batch}-rank{rank}.pt", {"epoch": 1, "batch": 5, "rank": 0}, "ep1-ba5-rank0.pt"),
        ("{run_name}/ep{epoch:03d}.pt", {"run_name": "awesome-run", "epoch": 7}, "awesome-run/ep007.pt"),
        ("t{total_wct}.pt", {"total_wct": 36000.0}, "t36000.0.pt"),
        ("t{total_wct:.1f}-ba{batch}.pt", {"total_wct": 12.5, "batch": 3}, "t12.5-ba3.pt"),
        ("ba{batch:_>6}.pt", {"batch": 42}, "ba____42.pt"),
        ("./ckpt+[v1]-{epoch}.pt", {"epoch": 2}, "ckpt+[v1]-2.pt"),
        ("latest-rank{rank}.pt", {"rank": 3}, "latest-rank3.pt"),
        ("a//b/./{epoch}.pt", {"epoch": 1}, "a/b/1.pt"),
        ("{{literal}}-{epoch}.pt", {"epoch": 1}, "{literal}-1.pt"),
        ("no-variables.pt", {}, "no-variables.pt"),
    ],
)
def test_format_table(template: str, values: dict[str, object], name: str) -> None:
    t = NameTemplate(template, argument="filename")
    assert t.format(**values) == name
    assert t.parse(name) == values


def test_format_ignores_extra_values_and_needs_used_ones() -> None:
    t = NameTemplate("ep{epoch}-rank{rank}.pt", argument="filename")
    assert t.format(**VALUES) == "ep0-rank3.pt"
    with pytest.raises(KeyError, match="rank"):
        t.format(epoch=1)


def test_attributes_str_and_repr() -> None:
    t = NameTemplate(Path("{run_name}/ep{epoch}-ba{batch}.pt"), argument="filename")
    assert t.template == "{run_name}/ep{epoch}-ba{batch}.pt"
    assert str(t) == t.template
    assert repr(t) == "NameTemplate('{run_name}/ep{epoch}-ba{batch}.pt', argument='filename')"
    assert t.argument == "filename"
    assert t.variables == frozenset({"run_name", "epoch", "batch"})
    assert t.has_counter
    folder = NameTemplate("{run_name}/checkpoints", argument="folder", allowed=RUN_VARIABLES + DIST_VARIABLES)
    assert folder.variables == frozenset({"run_name"}) and not folder.has_counter
    assert NameTemplate("t{batch_wct}.pt", argument="filename").has_counter


@pytest.mark.parametrize(
    ("template", "fragments"),
    [
        ("", ["'filename' must be a relative path template", "(got '')"]),
        ("ep{epcoh}.pt", ["{epcoh} is not one of them", "did you mean {epoch}?", "{run_name}, {rank}", "{batch_wct}"]),
        ("ep{0}.pt", ["named variables", "{0} is positional", "(got 'ep{0}.pt')"]),
        ("ep{}.pt", ["named variables", "{} is positional"]),
        ("ep{epoch.x}.pt", ["plain variables", "{epoch.x} uses '.' or '[]'"]),
        ("rank{rank[0]}.pt", ["plain variables", "{rank[0]} uses '.' or '[]'"]),
        ("ep{epoch.pt", ["balanced braces", "(got 'ep{epoch.pt')"]),
        ("ep}{epoch}.pt", ["balanced braces"]),
        ("ep{epoch:{width}}.pt", ["nested fields"]),
        ("{run_name!r}.pt", ["without conversions", "'!r'"]),
        ("{run_name:d}.pt", ["format specs suit their variables", "{run_name:d} cannot format a string"]),
        ("ep{epoch:s}.pt", ["{epoch:s} cannot format an integer such as 7"]),
        ("t{total_wct:d}.pt", ["{total_wct:d} cannot format seconds such as 36000.0"]),
        ("ep{epoch:c}.pt", ["{epoch:c} cannot format an integer"]),
        ("{run_name:,}.pt", ["{run_name:,} cannot format a string"]),
        ("ep{epoch:0<3}.pt", ["can be read back", "pads numbers with '0'"]),
        ("ep{epoch:1>3}.pt", ["can be read back", "pads numbers with '1'"]),
        ("ep{epoch:,>6,}.pt", ["can be read back", "pads numbers with ','"]),
        ("ep{epoch:/>3}.pt", ["does not pad with path separators"]),
        ("/abs/ep{epoch}.pt", ["not an absolute path", "(got '/abs/ep{epoch}.pt')"]),
        ("C:/ckpt/ep{epoch}.pt", ["not an absolute path"]),
        ("../ep{epoch}.pt", ["stays inside its folder", "no '..' component"]),
        ("a/../../ep{epoch}.pt", ["no '..' component"]),
        ("a\\..\\ep{epoch}.pt", ["no '..' component"]),
        ("{run_name}/", ["does not end with '/'"]),
    ],
)
def test_rejections_name_argument_value_and_accepted(template: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidTemplateError) as info:
        NameTemplate(template, argument="filename")
    message = str(info.value)
    assert message.startswith("'filename' must be ")
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, ValueError)


def test_rejects_a_known_variable_that_is_not_allowed_here() -> None:
    with pytest.raises(InvalidTemplateError, match=r"'folder' must be .*\{epoch\} is not one of them") as info:
        NameTemplate("{run_name}/ep{epoch}", argument="folder", allowed=RUN_VARIABLES + DIST_VARIABLES)
    assert "{batch}" not in str(info.value)


def test_rejects_values_that_are_not_paths() -> None:
    with pytest.raises(InvalidTemplateError, match="'filename' must be"):
        NameTemplate(42, argument="filename")  # type: ignore[arg-type]
    with pytest.raises(InvalidTemplateError, match="'filename' must be"):
        NameTemplate(b"ep{epoch}.pt", argument="filename")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "template",
    ["./ep{epoch}.pt", "ep{epoch:03d}.pt", "t{total_wct:.1f}.pt", "..{epoch}.pt", "ep{epoch:>5}.pt", "."],
)
def test_accepts(template: str) -> None:
    NameTemplate(template, argument="filename")


def test_extra_allowed_variables_are_strings() -> None:
    t = NameTemplate("{mlflow_run_id}/ep{epoch}.pt", argument="filename", allowed=(*ALL_VARIABLES, "mlflow_run_id"))
    assert t.parse("abc.123/ep4.pt") == {"mlflow_run_id": "abc.123", "epoch": 4}


def test_partial_format_is_composers() -> None:
    t = NameTemplate("{run_name} {rank}", argument="folder")
    assert t.partial_format(run_name="Hello") == "Hello {rank}"
    t = NameTemplate("{run_name}/ep{epoch:03d}-rank{rank}.pt", argument="filename")
    assert t.partial_format(rank=2) == "{run_name}/ep{epoch:03d}-rank2.pt"
    assert t.partial_format(run_name="r", epoch=7, rank=0) == "r/ep007-rank0.pt"
    assert t.partial_format() == "{run_name}/ep{epoch:03d}-rank{rank}.pt"
    assert NameTemplate("{{x}}{epoch}", argument="filename").partial_format() == "{x}{epoch}"


@pytest.mark.parametrize("variable", ALL_VARIABLES)
def test_pattern_and_parse_round_trip_every_variable(variable: str) -> None:
    t = NameTemplate(f"ckpt+[v1].{{{variable}}}.pt", argument="filename")
    name = t.format(**VALUES)
    assert t.parse(name) == {variable: VALUES[variable]}
    assert type(t.parse(name)[variable]) is type(VALUES[variable])  # type: ignore[index]
    assert t.pattern().fullmatch(name)[variable] == str(VALUES[variable])  # type: ignore[index]


def test_round_trip_all_variables_in_one_template() -> None:
    template = "{run_name}/" + "-".join(f"{v[:2]}{{{v}}}" for v in ALL_VARIABLES[1:]) + ".pt.zst"
    t = NameTemplate(template, argument="filename")
    assert t.parse(t.format(**VALUES)) == VALUES


def test_literal_text_is_escaped() -> None:
    t = NameTemplate("ckpt+[v1].{epoch}.pt", argument="filename")
    assert t.parse("ckpt+[v1].5.pt") == {"epoch": 5}
    # Composer's unescaped regex would accept these: '.' matches anything, '+' and [] are operators.
    for other in ("ckpt+[v1]x5.pt", "ckpttv1.5.pt", "ckpt+[v1].5xpt", "ckpt+[v1].5.pt.tmp"):
        assert t.parse(other) is None
        assert t.pattern().fullmatch(other) is None


@pytest.mark.parametrize("run_name", ["run.v1.2", "my-run--3", "a.b-c_d", "ep7", "-.-"])
def test_run_name_with_dots_and_dashes(run_name: str) -> None:
    t = NameTemplate("{run_name}-ep{epoch}.pt", argument="filename")
    name = t.format(run_name=run_name, epoch=12)
    assert t.parse(name) == {"run_name": run_name, "epoch": 12}
    assert t.parse(name, run_name=run_name) == {"epoch": 12}
    assert t.parse(name, run_name="other") is None


def test_fixed_values_are_substituted_with_their_spec() -> None:
    t = NameTemplate("ep{epoch}-rank{rank:02d}.pt", argument="filename")
    p = t.pattern(rank=3)
    assert p.groupindex.keys() == {"epoch"}
    assert p.fullmatch("ep4-rank03.pt") and not p.fullmatch("ep4-rank04.pt")
    assert t.parse("ep4-rank03.pt", rank=3) == {"epoch": 4}
    assert t.parse("ep4-rank03.pt", rank=4) is None
    assert t.parse("ep4-rank03.pt") == {"epoch": 4, "rank": 3}
    assert t.pattern(unused=1).pattern == t.pattern().pattern


def test_width_specs_match_and_parse_is_exact() -> None:
    t = NameTemplate("ep{epoch:03d}.pt", argument="filename")
    assert t.parse("ep007.pt") == {"epoch": 7}
    assert t.parse("ep1234.pt") == {"epoch": 1234}
    assert t.parse("ep000.pt") == {"epoch": 0}
    # Matches the regex, but this template would have written 'ep007.pt'.
    assert t.pattern().fullmatch("ep0007.pt")
    assert t.parse("ep0007.pt") is None
    assert NameTemplate("ep{epoch}.pt", argument="filename").parse("ep07.pt") is None


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ("05d", 42), (">6", 42), ("_>6", 0), ("*=+6", 42), ("+", 7), (",", 1234567), ("_", 1234567),
        ("x", 255), ("#06x", 255), ("X", 255), ("b", 5), ("#o", 8), (".1f", 3), ("e", 1000), ("g", 10**7),
        ("%", 3), (" ", 4),
    ],
)  # fmt: skip
def test_int_specs_round_trip(spec: str, value: int) -> None:
    t = NameTemplate(f"ba{{batch:{spec}}}.pt", argument="filename")
    assert t.parse(t.format(batch=value)) == {"batch": value}


@pytest.mark.parametrize(
    ("spec", "value"),
    [("", 0.0), ("", 12.5), ("", 1e20), ("", 1e-5), (".1f", 12.5), (".3f", 0.125), ("e", 36000.0),
     (".3", 36000.0), ("08.2f", 3.5), ("#.0f", 7.0), (",.1f", 1234567.5), ("%", 0.5)],
)  # fmt: skip
def test_wct_specs_round_trip(spec: str, value: float) -> None:
    t = NameTemplate(f"t{{total_wct:{spec}}}.pt", argument="filename")
    parsed = t.parse(t.format(total_wct=value))
    assert parsed == {"total_wct": pytest.approx(value)} and isinstance(parsed["total_wct"], float)


def test_lossy_specs_parse_to_what_was_written() -> None:
    t = NameTemplate("t{total_wct:.0f}.pt", argument="filename")
    assert t.format(total_wct=12.4) == "t12.pt"
    assert t.parse("t12.pt") == {"total_wct": 12.0}
    assert NameTemplate("ep{epoch:.1f}.pt", argument="filename").parse("ep3.5.pt") is None


@pytest.mark.parametrize(("spec", "name"), [("", "r"), (">8", "r.v1"), ("-^9", "a-b"), (".3", "abcdef")])
def test_string_specs_round_trip(spec: str, name: str) -> None:
    t = NameTemplate(f"{{run_name:{spec}}}/x.pt", argument="filename")
    written = t.format(run_name=name)
    assert t.parse(written) == {"run_name": format(name, spec).strip(" -")}


def test_repeated_variable_must_match_the_same_value() -> None:
    t = NameTemplate("ep{epoch}/ep{epoch}-rank{rank}.pt", argument="filename")
    assert "(?P=epoch)" in t.pattern().pattern
    assert t.parse("ep3/ep3-rank0.pt") == {"epoch": 3, "rank": 0}
    assert t.parse("ep3/ep4-rank0.pt") is None
    t = NameTemplate("ep{epoch}/ep{epoch:03d}.pt", argument="filename")
    assert t.parse("ep3/ep003.pt") == {"epoch": 3}
    assert t.parse("ep3/ep004.pt") is None


def test_parse_names_relative_to_the_folder_only() -> None:
    t = NameTemplate("{run_name}/ep{epoch}.pt", argument="filename")
    assert t.parse("./r//ep1.pt") == {"run_name": "r", "epoch": 1}
    assert t.parse("../ep1.pt") is None
    assert t.parse("/r/ep1.pt") is None
    assert t.parse("a/b/ep1.pt") is None  # run_name never spans a '/'
    assert t.parse("r/ep1.pt.tmp") is None


def test_parse_files_in_a_real_folder(tmp_path: Path) -> None:
    t = NameTemplate("ep{epoch}-ba{batch}-rank{rank}.pt", argument="filename")
    for epoch, batch in [(1, 5), (2, 10), (3, 15)]:
        for rank in (0, 1):
            (tmp_path / t.format(epoch=epoch, batch=batch, rank=rank)).write_bytes(b"x")
    (tmp_path / "latest-rank0.pt").write_bytes(b"x")
    (tmp_path / ".ep4-ba20-rank0.pt.tmp-host-1-abc").write_bytes(b"x")
    found = sorted(
        (v["epoch"], v["batch"]) for p in tmp_path.iterdir() if (v := t.parse(p.name, rank=1)) is not None
    )
    assert found == [(1, 5), (2, 10), (3, 15)]


# composer-semantics.md 1.10: any total counter ahead is later; in-epoch counters count only within
# the same epoch; equal is fine.
@pytest.mark.parametrize(
    ("found", "current", "later"),
    [
        ({"epoch": 3, "batch": 30}, {"epoch": 2, "batch": 20}, True),
        ({"epoch": 2, "batch": 20}, {"epoch": 2, "batch": 20}, False),
        ({"epoch": 1, "batch": 10}, {"epoch": 2, "batch": 20}, False),
        ({"batch": 21}, {"epoch": 2, "batch": 20}, True),
        ({"sample": 65}, {"sample": 64, "token": 0}, True),
        ({"token": 1000}, {"token": 999}, True),
        ({"epoch": 2, "batch_in_epoch": 5}, {"epoch": 2, "batch_in_epoch": 4}, True),
        ({"epoch": 1, "batch_in_epoch": 5}, {"epoch": 2, "batch_in_epoch": 4}, False),
        ({"epoch": 2, "sample_in_epoch": 4}, {"epoch": 2, "sample_in_epoch": 4}, False),
        ({"epoch": 2, "token_in_epoch": 9}, {"epoch": 2, "token_in_epoch": 8}, True),
        ({"batch_in_epoch": 5}, {"epoch": 2, "batch_in_epoch": 4}, False),
        ({"total_wct": 36000.5}, {"total_wct": 36000.0}, True),
        ({"total_wct": 36000.0}, {"total_wct": 36000.0}, False),
        ({"epoch": 2, "epoch_wct": 60.0}, {"epoch": 2, "epoch_wct": 30.0}, True),
        ({"epoch": 1, "epoch_wct": 60.0}, {"epoch": 2, "epoch_wct": 30.0}, False),
        ({"batch_wct": 9.0}, {"batch_wct": 1.0}, False),
        ({"run_name": "r", "rank": 7}, {"epoch": 0, "batch": 0}, False),
        ({"epoch": 5}, {"batch": 100}, False),
    ],
)
def test_is_later(found: dict[str, int | float], current: dict[str, int | float], later: bool) -> None:
    assert is_later(found, current) is later


def test_is_later_on_parsed_names() -> None:
    t = NameTemplate("ep{epoch}-ba{batch_in_epoch}.pt", argument="filename")
    now = {"epoch": 2, "batch": 25, "batch_in_epoch": 5}
    assert is_later(t.parse("ep2-ba6.pt"), now)  # type: ignore[arg-type]
    assert not is_later(t.parse("ep2-ba5.pt"), now)  # type: ignore[arg-type]
    assert not is_later(t.parse("ep1-ba9.pt"), now)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "normalised"),
    [("ep1.pt", "ep1.pt"), ("./run//ep1.pt", "run/ep1.pt"), ("run/./x/", "run/x"), (PurePosixPath("a/b"), "a/b")],
)
def test_check_relative_normalises(name: str, normalised: str) -> None:
    assert check_relative(name, argument="filename") == normalised


@pytest.mark.parametrize("name", ["", "/ckpt/ep1.pt", "C:\\ckpt\\ep1.pt", "../ep1.pt", "run/../../x", "a\\..\\b"])
def test_check_relative_rejects(name: str) -> None:
    with pytest.raises(InvalidTemplateError) as info:
        check_relative(name, argument="remote_file_name")
    message = str(info.value)
    assert message.startswith("'remote_file_name' must be a relative path inside its folder")
    assert f"(got {name!r})" in message


def test_check_relative_catches_values_that_escape() -> None:
    t = NameTemplate("{run_name}/ep{epoch}.pt", argument="filename")
    with pytest.raises(InvalidTemplateError, match="not absolute"):
        check_relative(t.format(run_name="", epoch=1), argument="filename")
    with pytest.raises(InvalidTemplateError, match=re.escape("(got '../ep1.pt')")):
        check_relative(t.format(run_name="..", epoch=1), argument="filename")


def test_all_is_complete() -> None:
    defined = {
        name
        for name, value in vars(naming).items()
        if not name.startswith("_") and (name.isupper() or getattr(value, "__module__", None) == naming.__name__)
    }
    assert set(naming.__all__) == defined
