"""Environment deltas: changes to environment variables, computed as data.

The semantics are uenv's (its `envvars` module), so that a profile means in weft what a
view means there.  A variable is a scalar or a list (colon-separated, like PATH).  A
scalar is set to a value or unset (None).  A list gets a sequence of updates, applied in
order to the inherited value split on `:` with empty entries dropped: `set` replaces the
list, `prepend` and `append` insert their block, `unset` clears it and marks it unset
until a later update revives it.  The result then loses empty entries and duplicates
(first occurrence kept, inherited entries included); it is unset or the joined list, so
`set []` gives the empty string.  Scalars are applied before lists, and values are
expanded: `${@NAME@}` is the current value of NAME (uenv's view syntax).

Two differences from uenv.  An operation it does not know is refused here, where uenv
treats it as `unset`: a typo must not silently clear PATH.  And a list's entries are
expanded before empty ones are dropped, where uenv expands the joined value after: there,
prepending `${@UNSET@}` to PATH leaves an empty entry, which means the working directory.
Variables of one delta are applied in name order, uenv's being unordered: a stored delta
is canonical JSON, which keeps no other order, and the same delta must mean the same
environment before it is written and after it is read.

This module does no I/O: the daemon, `store-run` and the builders' environments all apply
deltas through it, and tests check its rules without a process.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from store.errors import StoreError


class DeltaError(StoreError, ValueError):
    """A delta that cannot be applied: a bad name, an unknown operation, a conflict."""


class VarType(StrEnum):
    SCALAR = "scalar"
    LIST = "list"


class ListOp(StrEnum):
    SET = "set"
    UNSET = "unset"
    PREPEND = "prepend"
    APPEND = "append"


class Expand(Enum):
    """How a value names another variable: `${NAME}` (curly) or `${@NAME@}` (view)."""

    CURLY = ("${", "}")
    VIEW = ("${@", "@}")


@dataclass(frozen=True, slots=True)
class ListUpdate:
    op: ListOp
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """Scalars (a value, or None to unset) and lists (their updates, in order), each in
    the order they were declared."""

    scalars: Mapping[str, str | None] = field(default_factory=dict)
    lists: Mapping[str, tuple[ListUpdate, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.scalars or self.lists)


@dataclass(frozen=True, slots=True)
class Change:
    """What applying a delta did to one variable, as uenv reports it: the value before
    (None: unset), the operation(s), the delta's value, and the value after."""

    name: str
    type: VarType
    op: str  # "set" / "unset" for a scalar; a list's ops in order, joined by ","
    old: str | None
    value: str | None  # a scalar's value; a list's updates' values joined by ":"
    new: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "type": str(self.type),
            "op": self.op,
            "old": self.old,
            "value": self.value,
            "new": self.new,
        }


def valid_name(name: str, strict: bool = True) -> bool:
    """Strict: `[A-Za-z_][A-Za-z0-9_]*`, what shells accept, for names a delta sets.
    Lenient: non-empty with no `=`, for names found in a captured environment (POSIX says
    applications shall tolerate such names)."""
    if not name:
        return False
    if not strict:
        return "=" not in name and "\0" not in name
    first = name[0]
    if not (first == "_" or (first.isascii() and first.isalpha())):
        return False
    return all(c == "_" or (c.isascii() and c.isalnum()) for c in name)


def check_name(name: object, where: str = "") -> str:
    if not isinstance(name, str) or not valid_name(name):
        raise DeltaError(
            f"{where}invalid environment variable name {name!r}: names are letters, digits "
            "and '_', not starting with a digit"
        )
    return name


def simplify(entries: Iterable[str]) -> list[str]:
    """Empty entries dropped, and duplicates after the first (uenv's
    `simplify_prefix_path_list`)."""
    seen: set[str] = set()
    out: list[str] = []
    for entry in entries:
        if entry and entry not in seen:
            seen.add(entry)
            out.append(entry)
    return out


def evaluate_list(
    old: str | None,
    updates: Iterable[ListUpdate],
    env: Mapping[str, str] | None = None,
    mode: "Expand | None" = None,
) -> str | None:
    """The value of a list variable after `updates`, from its inherited value `old`; with
    `env`, each update's entries expanded against it (an entry may expand to several)."""
    value = [e for e in (old or "").split(":") if e]
    is_set = True
    for u in updates:
        if env is not None and u.values:
            u = ListUpdate(
                u.op,
                tuple(":".join(expand(v, env, mode or Expand.VIEW) for v in u.values).split(":")),
            )
        match u.op:
            case ListOp.SET:
                value = list(u.values)
            case ListOp.PREPEND:
                value = [*u.values, *value]
            case ListOp.APPEND:
                value = [*value, *u.values]
            case ListOp.UNSET:
                value = []
                is_set = False
                continue
        is_set = True
    return ":".join(simplify(value)) if is_set else None


def merge(deltas: Iterable[Delta]) -> Delta:
    """Several deltas as one, in order: the last scalar value wins, list updates are
    concatenated.  A variable that is a scalar in one and a list in another is refused by
    name (uenv warns and keeps the later kind; which was meant cannot be known)."""
    scalars: dict[str, str | None] = {}
    lists: dict[str, tuple[ListUpdate, ...]] = {}
    for delta in deltas:
        for name, value in delta.scalars.items():
            if name in lists:
                raise _conflict(name)
            scalars[name] = value
        for name, updates in delta.lists.items():
            if name in scalars:
                raise _conflict(name)
            lists[name] = (*lists.get(name, ()), *updates)
    return Delta(scalars, lists)


def _conflict(name: str) -> DeltaError:
    return DeltaError(
        f"environment variable {name} is a scalar in one profile and a list in another"
    )


def expand(text: str, env: Mapping[str, str], mode: Expand = Expand.VIEW) -> str:
    """`text` with each `${@NAME@}` (or `${NAME}`) replaced by NAME's value in `env`, as
    uenv expands: an unset or invalid name expands to nothing, and an opening with no
    closing drops the rest of the text."""
    start, end = mode.value
    out: list[str] = []
    i = 0
    while i < len(text):
        at = text.find(start, i)
        if at < 0:
            out.append(text[i:])
            break
        out.append(text[i:at])
        close = text.find(end, at + len(start))
        if close < 0:
            break
        name = text[at + len(start) : close]
        if valid_name(name):
            out.append(env.get(name, ""))
        i = close + len(end)
    return "".join(out)


def apply(
    delta: Delta, env: Mapping[str, str], mode: Expand = Expand.VIEW
) -> tuple[dict[str, str], list[Change]]:
    """`env` changed by `delta`, and what changed, one `Change` per variable the delta
    names.  Scalars first, then lists, each in name order, each value expanded against the
    environment as it is at that point."""
    new = dict(env)
    changes: list[Change] = []
    for name, value in sorted(delta.scalars.items()):
        old = new.get(name)
        if value is None:
            new.pop(name, None)
            changes.append(Change(name, VarType.SCALAR, "unset", old, None, None))
            continue
        result = new[name] = expand(value, new, mode)
        changes.append(Change(name, VarType.SCALAR, "set", old, value, result))
    for name, updates in sorted(delta.lists.items()):
        old = new.get(name)
        got = evaluate_list(old, updates, new, mode)
        if got is None:
            new.pop(name, None)
        else:
            new[name] = got
        ops = ",".join(str(u.op) for u in updates)
        value = ":".join(v for u in updates for v in u.values)
        changes.append(Change(name, VarType.LIST, ops, old, value, got))
    return new, changes
