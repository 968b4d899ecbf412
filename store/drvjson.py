"""Reading a `.drv`'s JSON fields strictly: each with its type, and each optional field
only as `Derivation.to_json` writes it (left out when empty), so that a `.drv` in the store
is the text weft would write for the derivation parsed from it.

Apart from `store.derivation` so that the derivation's model and hashing stay readable
there; `DerivationError` lives here because both raise it (`store.derivation` exports it
too, where every caller imports it from).
"""

from collections.abc import Mapping
from typing import Any

from store.buildenv import BuildEnvError, BuildEnvironment, environments_to_json, parse_environments
from store.durabledirs import DurableDirError, check_durable_dirs
from store.environment.delta import Delta, DeltaError
from store.environment.view import parse_values
from store.records import StoreError


class DerivationError(StoreError, ValueError):
    """A derivation that is malformed or inconsistent (a `StoreError`: the store refuses
    to add it)."""


def env_delta(doc: dict[str, Any]) -> Delta:
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


def environments(doc: dict[str, Any]) -> tuple[BuildEnvironment, ...]:
    if "environments" not in doc:
        return ()
    try:
        envs = parse_environments(doc["environments"], "environments: ")
    except BuildEnvError as e:
        raise DerivationError(f"malformed derivation: {e}") from None
    if environments_to_json(envs) != doc["environments"]:
        # As with envDelta: a text `to_json` would not write (an action without `args`).
        raise DerivationError("malformed derivation: environments not as weft writes them")
    return envs


def durable_dirs(doc: dict[str, Any]) -> Mapping[str, str]:
    if "durableDirs" not in doc:
        return {}
    dirs = str_map(doc, "durableDirs", str)
    if not dirs:
        # As with envDelta.
        raise DerivationError("malformed derivation: durableDirs is empty (leave it out)")
    try:
        return check_durable_dirs(dirs, "durableDirs: ")
    except DurableDirError as e:
        raise DerivationError(f"malformed derivation: {e}") from None


def typed(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc[key]
    if not isinstance(value, kind):
        raise DerivationError(f"malformed derivation: {key} is not a {kind.__name__}")
    return value


def strs(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DerivationError(f"malformed derivation: {what} is not a list of strings")
    return tuple(value)


def str_map(doc: dict[str, Any], key: str, kind: type) -> dict[str, Any]:
    value = typed(doc, key, dict)
    if not all(isinstance(v, kind) for v in value.values()):
        raise DerivationError(f"malformed derivation: the values of {key} are not {kind.__name__}s")
    return value
