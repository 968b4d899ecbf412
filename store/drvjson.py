"""A `.drv`'s JSON: read strictly (every field with its type, and each optional field only
as `Derivation.to_json` writes it, left out when empty), so that a `.drv` in the store is
the text weft would write for the derivation parsed from it; and written (`write`).

A recipe writes two texts per derivation (the one hashed for its output paths, and its
`.drv`), and `json` spends more on its generality than on the bytes: `write` writes the
fields every derivation has by hand, byte for byte as the canonical encoder (`ENCODER`)
writes them, with that encoder's own string encoding, and leaves the optional fields to it.

Apart from `store.derivation` so that the derivation's model and hashing stay readable
there; `DerivationError` lives here because both raise it (`store.derivation` exports it
too, where every caller imports it from).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from store.errors import StoreError

# `typing` itself is an import a recipe's evaluation does without (`store.recipe`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from store.buildenv import BuildEnvironment
    from store.environment.delta import Delta

    # What writing needs of `store.derivation`'s records, which import this module.
    class Output(Protocol):
        @property
        def path(self) -> str: ...

        @property
        def hash(self) -> str | None: ...

    class Derivation(Protocol):
        @property
        def name(self) -> str: ...

        @property
        def builder(self) -> str: ...

        @property
        def outputs(self) -> Mapping[str, Output]: ...

        @property
        def args(self) -> tuple[str, ...]: ...

        @property
        def env(self) -> Mapping[str, str]: ...

        @property
        def input_drvs(self) -> Mapping[str, tuple[str, ...]]: ...

        @property
        def input_srcs(self) -> tuple[str, ...]: ...

        @property
        def system(self) -> str: ...

        @property
        def env_delta(self) -> Delta: ...

        @property
        def environments(self) -> tuple[BuildEnvironment, ...]: ...

        @property
        def durable_dirs(self) -> Mapping[str, str]: ...


# The modules of the optional fields are imported where those are read: a recipe's
# evaluation, which reads no `.drv`, then does without them (`store.recipe`).
Doc = dict[str, object]


FORMAT = 1
# The canonical text: sorted keys, no insignificant whitespace, UTF-8 as it is.  One
# encoder for all (it keeps no state between calls): `json.dumps` makes one per call.
ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# What ENCODER writes a string as (with ensure_ascii=False): a TypeError for anything else.
_string = json.encoder.encode_basestring
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


Fixed = tuple[str, str, str, str]


def text(
    drv: Derivation,
    outputs: Mapping[str, Output] | None = None,
    env: Mapping[str, str] | None = None,
    input_drvs: Mapping[str, Iterable[str]] | None = None,
    fixed: Fixed | None = None,
) -> str:
    """The text of `drv` (`Derivation.to_json`), with `outputs`, `env` or `input_drvs` in
    place of its own (what hashing it as it would be with them needs, without making it),
    and its `fixed_parts` if known: written by hand, or by ENCODER when a field is not of
    the type a checked derivation has (the same text, or the same error, as ENCODER's)."""
    outputs = drv.outputs if outputs is None else outputs
    env = drv.env if env is None else env
    input_drvs = drv.input_drvs if input_drvs is None else input_drvs
    try:
        return _write(drv, outputs, env, input_drvs, fixed or _fixed_parts(drv))
    except TypeError:
        return ENCODER.encode(document(drv, outputs, env, input_drvs))


def document(
    drv: Derivation,
    outputs: Mapping[str, Output],
    env: Mapping[str, str],
    input_drvs: Mapping[str, Iterable[str]],
) -> dict[str, object]:
    """`drv`'s JSON document, with `outputs`, `env` and `input_drvs`: what ENCODER writes."""
    doc: dict[str, object] = {
        "format": FORMAT,
        "name": drv.name,
        "builder": drv.builder,
        "args": list(drv.args),
        "env": dict(env),
        "system": drv.system,
        "outputs": {
            k: {"path": o.path, **({"hash": o.hash} if o.hash is not None else {})}
            for k, o in outputs.items()
        },
        "inputDrvs": {k: sorted(v) for k, v in input_drvs.items()},
        "inputSrcs": sorted(drv.input_srcs),
    }
    if drv.env_delta:
        from store.environment.view import to_values

        doc["envDelta"] = to_values(drv.env_delta)
    if drv.environments:
        from store.buildenv import environments_to_json

        doc["environments"] = environments_to_json(drv.environments)
    if drv.durable_dirs:
        doc["durableDirs"] = dict(drv.durable_dirs)
    return doc


def fixed_parts(drv: Derivation) -> Fixed | None:
    """The parts of `drv`'s text that its output paths and its inputs' hashes leave as they
    are: a recipe's derivation is written twice, hashed with its output paths blank, then
    with them.  None when ENCODER has to write it (`text`)."""
    try:
        return _fixed_parts(drv)
    except TypeError:
        return None


def _fixed_parts(drv: Derivation) -> Fixed:
    """The text around `env`, `inputDrvs` and `outputs`' contents, written as ENCODER does;
    a TypeError for a field of the wrong type."""
    head = ['{"args":[', _strings(drv.args), '],"builder":', _string(drv.builder)]
    if drv.durable_dirs:
        head += [',"durableDirs":', ENCODER.encode(dict(drv.durable_dirs))]
    middle = ["}"]
    if drv.env_delta:
        from store.environment.view import to_values

        middle += [',"envDelta":', ENCODER.encode(to_values(drv.env_delta))]
    if drv.environments:
        from store.buildenv import environments_to_json

        middle += [',"environments":', ENCODER.encode(environments_to_json(drv.environments))]
    middle.append(f',"format":{FORMAT:d},"inputDrvs":{{')
    srcs = _strings(sorted(drv.input_srcs))
    tail = f'}},"inputSrcs":[{srcs}],"name":{_string(drv.name)},"outputs":{{'
    return "".join(head) + ',"env":{', "".join(middle), tail, f'}},"system":{_string(drv.system)}}}'


def _write(
    drv: Derivation,
    outputs: Mapping[str, Output],
    env: Mapping[str, str],
    input_drvs: Mapping[str, Iterable[str]],
    fixed: Fixed,
) -> str:
    """ENCODER's text of `drv`'s document (its keys in their sorted order) with `outputs`,
    `env` and `input_drvs`, around its `fixed` parts; a TypeError as `_fixed_parts`."""
    head, middle, tail, end = fixed
    variables = ",".join([f"{_string(k)}:{_string(v)}" for k, v in sorted(env.items())])
    # Most derivations have no input derivation, and one output: no sorting for those.
    drvs = ""
    if input_drvs:
        used = sorted(input_drvs.items())
        drvs = ",".join([f"{_string(k)}:[{_used(v)}]" for k, v in used])
    if len(outputs) == 1:
        ((name, output),) = outputs.items()
        outs = f"{_string(name)}:{_output(output)}"
    else:
        outs = ",".join([f"{_string(k)}:{_output(o)}" for k, o in sorted(outputs.items())])
    return "".join([head, variables, middle, drvs, tail, outs, end])


def _used(outputs: Iterable[str]) -> str:
    # Most input derivations are used for one output: no sorting for those.
    if isinstance(outputs, tuple) and len(outputs) == 1:
        return _string(outputs[0])
    return _strings(sorted(outputs))


def _strings(values: Iterable[str]) -> str:
    return ",".join(map(_string, values))


def _output(output: Output) -> str:
    path = _string(output.path)
    if output.hash is None:
        return f'{{"path":{path}}}'
    return f'{{"hash":{_string(output.hash)},"path":{path}}}'
