"""Reading a `.drv`'s JSON strictly: every field with its type, and each optional field
only as `Derivation.to_json` writes it (left out when empty), so that a `.drv` in the store
is the text weft would write for the derivation parsed from it.

Apart from `store.derivation` so that the derivation's model and hashing stay readable
there; `DerivationError` lives here because both raise it (`store.derivation` exports it
too, where every caller imports it from).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from store.errors import StoreError

# `typing` itself is an import a recipe's evaluation does without (`store.recipe`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from store.buildenv import BuildEnvironment
    from store.environment.delta import Delta

# The modules of the optional fields are imported where those are read: a recipe's
# evaluation, which reads no `.drv`, then does without them (`store.recipe`).
Doc = dict[str, object]


FORMAT = 1
_KEYS = frozenset(
    {"format", "name", "builder", "args", "env", "system", "outputs", "inputDrvs", "inputSrcs"}
)
# Written only when non-empty: a derivation without them is the same text as before they
# existed.
_OPTIONAL_KEYS = frozenset({"envDelta", "environments", "durableDirs"})


class DerivationError(StoreError, ValueError):
    """A derivation that is malformed or inconsistent (a `StoreError`: the store refuses
    to add it)."""


def fields(text: str | bytes) -> dict[str, Any]:
    """A `.drv`'s fields, by `Derivation`'s names, each checked; its outputs as
    {name: (path, hash or None)}."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        # RecursionError: arrays nested deeper than the parser's stack.
        raise DerivationError(f"malformed derivation: {e}") from None
    if not isinstance(doc, dict):
        raise DerivationError("malformed derivation: not a JSON object")
    if doc.get("format") != FORMAT or type(doc["format"]) is not int:
        raise DerivationError(f"unknown derivation format {doc.get('format')!r}")
    if not _KEYS <= set(doc) <= _KEYS | _OPTIONAL_KEYS:
        extra = sorted(set(doc) - _KEYS - _OPTIONAL_KEYS)
        missing = sorted(_KEYS - set(doc))
        raise DerivationError(
            f"malformed derivation: unknown fields {extra}, missing fields {missing}"
        )
    outputs = str_map(doc, "outputs", dict)
    input_drvs = str_map(doc, "inputDrvs", list)
    for k, o in outputs.items():
        if not set(o) <= {"path", "hash"} or not all(isinstance(v, str) for v in o.values()):
            raise DerivationError(f"malformed derivation: output {k!r} is not {{path, hash}}")
    return {
        "name": typed(doc, "name", str),
        "builder": typed(doc, "builder", str),
        "outputs": {k: (o.get("path", ""), o.get("hash")) for k, o in outputs.items()},
        "args": strs(doc["args"], "args"),
        "env": str_map(doc, "env", str),
        "input_drvs": {k: strs(v, f"inputDrvs[{k!r}]") for k, v in input_drvs.items()},
        "input_srcs": strs(doc["inputSrcs"], "inputSrcs"),
        "system": typed(doc, "system", str),
        "env_delta": env_delta(doc),
        "environments": environments(doc),
        "durable_dirs": durable_dirs(doc),
    }


def env_delta(doc: Doc) -> Delta:
    from store.environment.delta import Delta, DeltaError
    from store.environment.view import parse_values

    if "envDelta" not in doc:
        return Delta()
    try:
        delta = parse_values(doc["envDelta"], "envDelta: ")
    except DeltaError as e:
        raise DerivationError(f"malformed derivation: {e}") from None
    if not delta:
        # Its text would not be the one `to_json` writes for the same derivation.
        raise DerivationError("malformed derivation: envDelta is empty (leave it out)")
    return delta


def environments(doc: Doc) -> tuple[BuildEnvironment, ...]:
    if "environments" not in doc:
        return ()
    from store.buildenv import BuildEnvError, environments_to_json, parse_environments

    try:
        envs = parse_environments(doc["environments"], "environments: ")
    except BuildEnvError as e:
        raise DerivationError(f"malformed derivation: {e}") from None
    if environments_to_json(envs) != doc["environments"]:
        # As with envDelta: a text `to_json` would not write (an action without `args`).
        raise DerivationError("malformed derivation: environments not as weft writes them")
    return envs


def durable_dirs(doc: Doc) -> Mapping[str, str]:
    if "durableDirs" not in doc:
        return {}
    from store.durabledirs import DurableDirError, check_durable_dirs

    dirs = str_map(doc, "durableDirs", str)
    if not dirs:
        # As with envDelta.
        raise DerivationError("malformed derivation: durableDirs is empty (leave it out)")
    try:
        return check_durable_dirs(dirs, "durableDirs: ")
    except DurableDirError as e:
        raise DerivationError(f"malformed derivation: {e}") from None


def typed(doc: Doc, key: str, kind: type) -> Any:
    value = doc[key]
    if not isinstance(value, kind):
        raise DerivationError(f"malformed derivation: {key} is not a {kind.__name__}")
    return value


def strs(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DerivationError(f"malformed derivation: {what} is not a list of strings")
    return tuple(value)


def str_map(doc: Doc, key: str, kind: type) -> dict[str, Any]:
    value = typed(doc, key, dict)
    if not all(isinstance(v, kind) for v in value.values()):
        raise DerivationError(f"malformed derivation: the values of {key} are not {kind.__name__}s")
    return value
