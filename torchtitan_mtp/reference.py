"""The config reference, generated from the dataclasses of :class:`MTPJobConfig`.

Every TOML section (TorchTitan's and ours) with each key's type, default, allowed values
and the field's docstring (the string literal after the field, read with ``ast`` from each
class of the MRO, so a subclass's docstring wins over TorchTitan's)::

    python -m torchtitan_mtp.reference --write     # regenerates docs/config_reference.md
    python -m torchtitan_mtp.reference             # prints it

``tests/test_docs.py`` fails when the checked-in file differs from :func:`render`.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import types
import typing
from dataclasses import MISSING, Field, fields, is_dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from .config import TITAN_CHOICES, TITAN_LIMITS, MTPJobConfig

__all__ = ["COMMAND", "REFERENCE_PATH", "field_docs", "main", "render"]

REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "config_reference.md"
COMMAND = "python -m torchtitan_mtp.reference --write"
_LIMITS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _own_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings written in ``cls``'s own body: {field name: docstring}."""
    node = ast.parse(inspect.getsource(cls).strip()).body[0]
    assert isinstance(node, ast.ClassDef), cls
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass over its MRO; a subclass's docstring wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _value(value: Any) -> str:
    """A default as it is written in TOML (None: the key is left out)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _allowed(f: Field, path: str, choices: dict[str, tuple[str, ...]]) -> str:
    limits = {**TITAN_LIMITS.get(path, {}), **f.metadata}
    parts = [f"{_LIMITS[k]} {limits[k]}" for k in _LIMITS if k in limits]
    if path in choices:
        parts.append("one of " + ", ".join(json.dumps(c) for c in choices[path]))
    return ", ".join(parts)


def _section(cls: type, path: str, choices: dict[str, tuple[str, ...]]) -> list[str]:
    """Markdown of the section ``[path]`` (dataclass ``cls``), then its sub-tables."""
    defined = [k for k in reversed(cls.__mro__) if is_dataclass(k)]
    sources = ", ".join(f"`{k.__module__}.{k.__qualname__}`" for k in defined)
    lines = [f"## [{path}]", "", f"Defined by {sources}.", ""]
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    nested = []
    for f in fields(cls):
        if not f.init:
            continue
        if is_dataclass(hints[f.name]):
            nested.append((hints[f.name], f"{path}.{f.name}"))
            continue
        facts = [f"`{_type_name(hints[f.name])}`", f"default `{_value(_default(f))}`"]
        if allowed := _allowed(f, f"{path}.{f.name}", choices):
            facts.append(f"allowed: {allowed}")
        doc = docs.get(f.name, "(no description)")
        text = "\n  ".join(line.rstrip() for line in doc.splitlines()).replace("\n  \n", "\n\n")
        lines += [f"- **`{f.name}`** ({', '.join(facts)}):", f"  {text}", ""]
    if not any(line.startswith("- **") for line in lines):
        tables = ", ".join(f"`[{sub_path}]`" for _, sub_path in nested)
        lines += [f"No keys of its own; its tables: {tables}.", ""]
    for sub_cls, sub_path in nested:
        lines += _section(sub_cls, sub_path, choices)
    return lines


def render() -> str:
    """The whole reference (Markdown), one section per TOML table of MTPJobConfig."""
    from .models import mtp_flavors

    choices = {**TITAN_CHOICES, "model.flavor": tuple(mtp_flavors)}
    hints = typing.get_type_hints(MTPJobConfig)
    sections = [f.name for f in fields(MTPJobConfig)]
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated by `{COMMAND}`; do not edit. -->",
        "",
        f"Every section of `torchtitan_mtp.config.MTPJobConfig` (TorchTitan "
        f"{version('torchtitan')}'s `JobConfig` plus ours), from the dataclasses' fields and "
        "docstrings. Set a key in a TOML file (`[section]`, then `key = value`, passed with "
        "`--job.config_file`) or on the command line (`--section.key value`, which wins). "
        "`None` means the key is left out (TOML has no null). Unknown keys, wrong types and "
        "values outside *allowed* are errors before any training "
        "(`torchtitan_mtp.config`); *allowed* lists the range limits (field metadata, or "
        "`TITAN_LIMITS` for TorchTitan's keys) and closed sets (`TITAN_CHOICES`, the "
        "flavors). Cross-key rules are in `validate_job_config`.",
        "",
        "Sections: " + ", ".join(f"[`[{s}]`](#{s})" for s in sections) + ".",
        "",
    ]
    for name in sections:
        lines += _section(hints[name], name, choices)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {REFERENCE_PATH}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        REFERENCE_PATH.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE_PATH.write_text(text)
        print(f"wrote {REFERENCE_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
