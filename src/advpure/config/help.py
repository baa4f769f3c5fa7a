"""`advpure <command> --help`: text generated from the config schema and `conf/`, never a copy.

A command's help lists what it does, its config groups with the options found in `conf/<group>/`,
the experiments, the keys of the schema sections it reads with their schema defaults, types,
allowed values or ranges and the comment written next to the field in `advpure.config.compose`, and
examples. The sections come from `help_sections()`, the one place to change when the schema
changes shape (e.g. per-kind defense / attack blocks taken from registries).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from collections.abc import Iterable
from functools import cache
from typing import Any

from advpure.config import compose as C
from advpure.core.errors import AdvpureError
from advpure.core.params import allowed_choices


def help_sections(names: Iterable[str] | None = None) -> list[tuple[str, type]]:
    """(dotted prefix, schema dataclass) of the top-level config sections, in schema order.

    `names` selects sections by their top-level key (`data`, `attacks`, ...); None: all. Scalar
    top-level keys (`experiment`, `seed`) come as the section "" with the root dataclass. The
    `defense` block and the `attacks.<name>` blocks are typed by their kind: one section per
    registered purifier / attack (its `Params`, from the registries), e.g. `defense[kind=adp]`;
    the keys shared by every kind are listed once, under the first kind.
    """
    from advpure.attacks import ATTACKS
    from advpure.purify import PURIFIERS

    wanted = None if names is None else set(names)
    out: list[tuple[str, type]] = []
    for f in dataclasses.fields(C.root_schema()):
        if wanted is not None and f.name not in wanted:
            continue
        sub = _schema_type(f)
        if sub is not None:
            out.append((f.name, sub))
        elif f.name == "defense":
            kinds = sorted((k for k in PURIFIERS if ":" not in k), key=lambda k: k == "none")  # none last
            out += [(f"defense[kind={k}]", PURIFIERS.get(k).Params) for k in kinds]
        elif f.name == "attacks":
            out += [(f"attacks.<name>[kind={k}]", cls.Params) for k, cls in ATTACKS.items() if ":" not in k]
    if wanted is None or "" in wanted:
        out.insert(0, ("", C.root_schema()))
    return out


def _common_keys() -> dict[str, set[str]]:
    from advpure.attacks import AttackParams
    from advpure.purify import DefenseParams

    return {
        "defense": {f.name for f in dataclasses.fields(DefenseParams)},
        "attacks.<name>": {f.name for f in dataclasses.fields(AttackParams)},
    }


_COMMON = _common_keys()


def _schema_type(f: dataclasses.Field) -> type | None:
    from advpure.core.params import _dataclass_type

    return _dataclass_type(f)


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: the `# comment` on the line where the field's definition ends} of a dataclass."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    source = inspect.cleandoc("\n" + source) if source.startswith((" ", "\t")) else source
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = comments.get(node.end_lineno or node.lineno)
            if text:
                out[node.target.id] = text
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if "choices" in m:
        return "one of " + "|".join(_show(c) for c in allowed_choices(m))
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and hi is not None:
        return f"in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{'>' if m.get('strict') else '>='} {lo:g}"
    return ""


def schema_rows(prefix: str, cls: type) -> list[tuple[str, str, str, str]]:
    """(key, schema default, type and allowed values, comment) for every leaf field of `cls`.

    Nested schema dataclasses are expanded under their own prefix; the root section ("")
    lists only its scalar keys.
    """
    rows = []
    notes = field_comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        sub = _schema_type(f)
        if sub is not None or (cls is C.root_schema() and f.name in ("attacks", "defense")):
            if prefix:  # nested blocks (classifier.optim); the root's sections come separately
                rows += schema_rows(key, sub)
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        allowed = _allowed(f)
        rows.append(
            (key, _show(_default(f)), f"{kind}{', ' + allowed if allowed else ''}", notes.get(f.name, ""))
        )
    return rows


def _groups_block(groups: Iterable[str]) -> list[str]:
    lines = []
    for g in groups:
        try:
            options = C.group_options(g)
        except AdvpureError:
            options = []
        pick = "attack=[a,b,...]" if g == "attack" else f"{g}=OPTION"
        lines.append(f"  {pick:<20} {', '.join(options) or '(none found)'}")
    try:
        exps = ", ".join(C.experiment_names())
    except AdvpureError:
        exps = "(experiments/ not found)"
    lines.append(f"  {'experiment=NAME':<20} {exps}")
    return lines


def _keys_block(sections: list[tuple[str, type]]) -> list[str]:
    rows, seen = [], set()
    for prefix, cls in sections:
        base = prefix.split("[", 1)[0]  # a kind's block: its shared keys only once, as `defense.key`
        for key, default, kind, note in schema_rows(prefix, cls):
            name = key.rsplit(".", 1)[-1]
            plain = f"{base}.{name}"
            if "[" in prefix and name == "kind":  # one row listing the registered kinds
                if plain not in seen:
                    seen.add(plain)
                    kinds = [
                        p.split("kind=", 1)[1].rstrip("]") for p, _ in sections if p.startswith(base + "[")
                    ]
                    rows.append(
                        (
                            plain,
                            _show(C.Config.__dataclass_fields__["defense"].default_factory()["kind"])
                            if base == "defense"
                            else "pgd",
                            f"str, one of {'|'.join(kinds)}|module.path:Class",
                            "registered kinds; each has the keys below",
                        )
                    )
                continue
            common = name in _COMMON.get(base, ())
            if "[" in prefix and common and plain in seen:  # shared keys: once, from the first kind
                continue
            seen.add(plain)
            rows.append(
                (plain if "[" in prefix and name in _COMMON.get(base, ()) else key, default, kind, note)
            )
    if not rows:
        return []
    w_key = min(max(len(r[0]) for r in rows), 34)
    w_def = min(max(len(r[1]) for r in rows), 28)
    lines = []
    for key, default, kind, note in rows:
        lines.append(f"  {key:<{w_key}} {default:<{w_def}} {kind}" + (f"  # {note}" if note else ""))
    return lines


def command_help(
    name: str,
    *,
    summary: str,
    description: str = "",
    usage: str | None = None,
    groups: Iterable[str] = (),
    sections: Iterable[str] | None = (),
    examples: Iterable[str] = (),
) -> str:
    """The full help text of one command (see the module docstring)."""
    groups, examples = list(groups), list(examples)
    sections = None if sections is None else list(sections)
    out = [f"usage: {usage or f'advpure {name} [experiment=NAME] [group=option ...] [key=value ...]'}", ""]
    out.append(summary[:1].upper() + summary[1:] + ".")
    if description:
        out += ["", description.strip()]
    if groups:
        out += ["", "config groups (group=option picks conf/<group>/<option>.yaml):", *_groups_block(groups)]
    secs = help_sections(sections) if sections is None or sections else []
    if secs:
        out += [
            "",
            "keys (key=value) with their schema defaults; conf/ options and experiments change some,",
            "`advpure config experiment=NAME [key=value ...]` prints the resolved values:",
            *_keys_block(secs),
        ]
    if examples:
        out += ["", "examples:", *(f"  {e}" for e in examples)]
    return "\n".join(out) + "\n"
