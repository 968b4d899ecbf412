"""Whether a build runs on the remote engine or here: the decisions alone, no I/O.

The remote policy in effect is the request's (`store-build --remote`) over `weft.toml`'s
(`remote-policy`), and `none` whenever no `remote-endpoint` is set.  Under it, a build
goes remote unless its derivation asks to stay local (`preferLocalBuild`, as Nix has
it), or, under `overflow`, a local build slot is free when the build may start.  Once
remote, a closure whose names REAPI cannot carry (its Directory names are UTF-8 strings)
stays local, and so does every build while the engine cannot be reached, unless local
fallback is turned off (`remote-fallback = false`): then it fails, saying why.
"""

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class Policy(enum.StrEnum):
    ALL = "all"  # every build that may go remote goes
    OVERFLOW = "overflow"  # only while every local build slot is taken
    NONE = "none"  # nothing goes remote


class Where(enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True)
class Choice:
    where: Where
    # Why a build that could have gone remote stays here, for its log; "" when it is
    # not worth a line (remote off, a free local slot).
    why: str = ""


class Fallback(enum.Enum):
    LOCAL = "local"  # built here after all, with a warning
    FAIL = "fail"  # local builds are off: the build fails


class StayLocal(Exception):
    """A build that was to go remote does not after all: built locally, with `why` in
    its log (a warning when the engine is `unreachable`)."""

    def __init__(self, why: str, unreachable: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.unreachable = unreachable


def parse_policy(value: str, what: str) -> Policy:
    """A policy by its name; ValueError naming `what` and the names there are."""
    try:
        return Policy(value)
    except ValueError:
        names = ", ".join(p.value for p in Policy)
        raise ValueError(f"{what} must be one of {names}, not {value!r}") from None


def effective(requested: Policy | None, configured: Policy, endpoint: str) -> Policy:
    """The policy in effect for a request: none without an engine to go to."""
    if not endpoint:
        return Policy.NONE
    return configured if requested is None else requested


def _prefers_local(env: Mapping[str, str]) -> bool:
    # Nix's derivations say "1" (a Nix `true` turned into a string); "true" is the same
    # wish spelt out.
    return env.get("preferLocalBuild", "").strip().lower() in ("1", "true")


def choose(
    policy: Policy,
    env: Mapping[str, str],
    local_free: bool,
    *,
    durable: bool = False,
    keep_failed: bool = False,
    resumed: bool = False,
) -> Choice:
    """Where one build runs, as it is about to start: `env` is its derivation's,
    `local_free` says whether a local build slot would take it now, `durable` whether it
    keeps durable directories (its snapshots are this store's), `keep_failed` whether
    its request wants a failed build's directory (only a local build leaves one),
    `resumed` whether its request seeds it with a snapshot (`--resume-from`: restored into
    a local build dir)."""
    if policy is Policy.NONE:
        return Choice(Where.LOCAL)
    if _prefers_local(env):
        return Choice(Where.LOCAL, "built locally: the derivation sets preferLocalBuild")
    if durable:
        return Choice(Where.LOCAL, "built locally: its durable directories' snapshots are local")
    if resumed:
        return Choice(Where.LOCAL, "built locally: it resumes from a snapshot of this store")
    if keep_failed:
        return Choice(Where.LOCAL, "built locally: --keep-failed keeps a local build's directory")
    if policy is Policy.OVERFLOW and local_free:
        return Choice(Where.LOCAL)
    return Choice(Where.REMOTE)


def _utf8(name: str) -> bool:
    # Names that are not UTF-8 on disk come to Python as str with surrogate escapes,
    # which UTF-8 refuses to encode.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unoffloadable(store_dir: str, closure: Iterable[str]) -> str:
    """Why a build with this input closure cannot go remote ("" if it can): a REAPI
    Directory names its entries in UTF-8, so each store dir component and base name must
    be UTF-8."""
    if not _utf8(store_dir):
        return "built locally: the store dir's name is not UTF-8, which REAPI cannot carry"
    for path in closure:
        if not _utf8(path):
            return (
                f"built locally: {printable(path)} is not named in UTF-8, which REAPI cannot carry"
            )
    return ""


def printable(text: str) -> str:
    """`text` with the bytes of names that are not UTF-8 (surrogate escapes, which no
    message can carry) shown escaped, as `\\xff`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def on_unavailable(policy: Policy, fallback: bool, why: str) -> tuple[Fallback, str]:
    """What becomes of a build whose engine cannot be reached (`why`), and the line that
    says so in its log."""
    if not fallback:
        return (
            Fallback.FAIL,
            f"the remote engine is unreachable ({why}) and remote-fallback is off: "
            f"not building locally (remote policy {policy.value})",
        )
    return Fallback.LOCAL, f"warning: the remote engine is unreachable ({why}); building locally"
