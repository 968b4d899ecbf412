"""Deltas as uenv's `env.json` views write them, read strictly and written back.

    {"version": 1,
     "values": {"list":   {"PATH": [{"op": "prepend", "value": ["/a/bin"]}]},
                "scalar": {"CC": "gcc", "OLD": null}}}

Everything a profile, a derivation or a hand-written file says is checked here, once,
with an error naming the variable: a bad name, an unknown operation, a value of the wrong
type.  A delta that reached `store.environment.delta` was read through this module.
"""

from collections.abc import Mapping
from typing import Any

from store.environment.delta import Delta, DeltaError, ListOp, ListUpdate, check_name

VIEW_VERSION = 1
_OPS = ", ".join(op.value for op in ListOp)


def parse_values(values: object, where: str = "") -> Delta:
    """A view's `values` object: `{"list": {...}, "scalar": {...}}`, either optional."""
    if not isinstance(values, Mapping):
        raise DeltaError(f"{where}the values of an environment must be an object")
    unknown = sorted(set(values) - {"list", "scalar"})
    if unknown:
        raise DeltaError(f"{where}unknown keys {unknown} (an environment has list and scalar)")
    scalars_in = _object(values.get("scalar", {}), f"{where}scalar")
    lists_in = _object(values.get("list", {}), f"{where}list")
    scalars: dict[str, str | None] = {}
    for name, value in scalars_in.items():
        check_name(name, where)
        if value is not None and not isinstance(value, str):
            raise DeltaError(
                f"{where}scalar {name}: the value must be a string or null, not "
                f"{type(value).__name__}"
            )
        _no_nul(value, f"{where}scalar {name}")
        scalars[name] = value
    lists: dict[str, tuple[ListUpdate, ...]] = {}
    for name, updates in lists_in.items():
        check_name(name, where)
        if name in scalars:
            raise DeltaError(f"{where}{name} is both a scalar and a list")
        if not isinstance(updates, list):
            raise DeltaError(f"{where}list {name}: the updates must be a list")
        lists[name] = tuple(_update(u, f"{where}list {name}") for u in updates)
    return Delta(scalars, lists)


def parse_view(doc: object, where: str = "") -> Delta:
    """A whole view: `{"version": 1, "values": {...}}`."""
    view = _object(doc, f"{where}environment")
    if view.get("version") != VIEW_VERSION or type(view.get("version")) is not int:
        raise DeltaError(
            f"{where}environment version {view.get('version')!r} is not {VIEW_VERSION}"
        )
    unknown = sorted(set(view) - {"version", "values"})
    if unknown:
        raise DeltaError(f"{where}unknown keys {unknown} in an environment")
    return parse_values(view.get("values", {}), where)


def to_values(delta: Delta) -> dict[str, Any]:
    """`delta` as a view's `values`, with only the kinds it has."""
    values: dict[str, Any] = {}
    if delta.lists:
        values["list"] = {
            name: [{"op": str(u.op), "value": list(u.values)} for u in updates]
            for name, updates in delta.lists.items()
        }
    if delta.scalars:
        values["scalar"] = dict(delta.scalars)
    return values


def to_view(delta: Delta) -> dict[str, Any]:
    return {"version": VIEW_VERSION, "values": to_values(delta)}


def from_mapping(env: Mapping[str, object], where: str = "") -> Delta:
    """The shorthand recipes write: `{"CC": "gcc", "OLD": None, "PATH": [("prepend",
    ["/a/bin"])]}`, a str or None for a scalar, a list of (op, values) for a list."""
    values: dict[str, Any] = {"scalar": {}, "list": {}}
    for name, value in env.items():
        if value is None or isinstance(value, str):
            values["scalar"][name] = value
        elif isinstance(value, list | tuple):
            values["list"][name] = [_shorthand(u, f"{where}list {name}") for u in value]
        else:
            raise DeltaError(
                f"{where}{name}: a value must be a string, None, or a list of (op, values); "
                f"not {type(value).__name__}"
            )
    return parse_values(values, where)


def _shorthand(update: object, where: str) -> object:
    if isinstance(update, Mapping):
        return update
    if not isinstance(update, list | tuple) or len(update) != 2:
        raise DeltaError(f"{where}: each update is (op, [values]), not {update!r}")
    op, values = update
    return {"op": op, "value": list(values) if isinstance(values, list | tuple) else values}


def _update(update: object, where: str) -> ListUpdate:
    u = _object(update, where)
    unknown = sorted(set(u) - {"op", "value"})
    if unknown:
        raise DeltaError(f"{where}: unknown keys {unknown} in an update")
    try:
        op = ListOp(u.get("op"))
    except ValueError:
        raise DeltaError(f"{where}: unknown operation {u.get('op')!r} (one of {_OPS})") from None
    values = u.get("value", [])
    if op is ListOp.UNSET and values is None:
        values = []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DeltaError(f"{where}: the value of {op} must be a list of strings")
    for v in values:
        _no_nul(v, where)
    return ListUpdate(op, tuple(values))


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise DeltaError(f"{where} must be an object")
    return value


def _no_nul(value: str | None, where: str) -> None:
    # An environment string ends at its first NUL: execve would cut the value short.
    if value is not None and "\0" in value:
        raise DeltaError(f"{where}: a value may not contain a NUL character")
