"""How recipes write environment deltas (`derivation(..., env_delta=...)`, `profile(...,
env=...)`): a `Delta`, a uenv view or the shorthand mapping, each checked as one read from
a `.drv` is.  Kept apart from `store.recipe`, which holds the recipe functions themselves.
"""

from collections.abc import Mapping

from store.environment.delta import Delta, DeltaError
from store.environment.view import from_mapping, parse_values, parse_view, to_values

EnvDelta = Delta | Mapping[str, object]


def as_delta(given: EnvDelta | None, where: str) -> Delta:
    """`given` (a view, a `Delta` or the shorthand) as a checked `Delta`: one made in
    Python gets the checks one read from JSON has."""
    if given is None:
        return Delta()
    if isinstance(given, Delta):
        return parse_values(to_values(given), where)
    if not isinstance(given, Mapping):
        raise DeltaError(f"{where}an environment is a mapping, not {type(given).__name__}")
    # A shorthand's values are strings, None or lists: an int version or a mapping of
    # values can only be a view.
    if isinstance(given.get("version"), int) or isinstance(given.get("values"), Mapping):
        return parse_view(given, where)
    return from_mapping(given, where)


def delta_strings(delta: Delta) -> list[str]:
    scalars = [v for v in delta.scalars.values() if v is not None]
    return [*scalars, *(v for updates in delta.lists.values() for u in updates for v in u.values)]
