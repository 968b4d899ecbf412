"""Every `.drv` is checked before it is registered, as Nix checks each derivation it
registers: a derivation that could never be built (a name that makes a bad store path or
looks like a derivation's, an output path its inputs do not give, an input that is not a
derivation, references other than its inputs, an environment delta with a bad name or
operation, a build environment no build could run, such as a wrapper with one hook or a
program outside its inputs) is refused before anything of the add is written, however it
arrives (a text, an archive, an import).  Checking at the door rather than at the build
means a bad `.drv` never sits in the store looking like a good one.

A `.drv` path's text never changes, so each one's hash modulo fixed-output inputs and
the derivation itself are remembered, in bounded maps, for the derivations added after it
and for whoever builds it (`checked`): a recipe adding a chain of derivations reads none
of its inputs back from disk, and the daemon parses none of them again.  A text added is
checked from the bytes written, not read back.
"""

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from store.buildenv import BuildEnvError, check_environments
from store.derivation import (
    DRV_SUFFIX,
    Derivation,
    DerivationError,
    HashModulo,
    check_output_paths,
    validate,
)
from store.lru import Lru
from store.queries import Queries
from store.records import NewPath

# Hashes modulo and derivations remembered across adds: a derivation is a kilobyte or two,
# so a few MB (the daemon's cache of derivations holds the same objects), and more than
# the derivations of a large recipe (examples/ has tens; a distribution has ~10,000, of
# which an evaluation adds those that changed).
KNOWN_HASHES = 4096
# The largest `.drv` read: each is read whole into the daemon's memory, and anyone may add
# a file named `*.drv`.  A buildable derivation is small: its arguments and environment
# must pass execve (ARG_MAX, 2 MiB with the default stack limit: `daemon/wire/spawner.py`),
# and the rest is input and output paths, about 100 bytes each (10,000 inputs, a large
# package's closure, is 1 MiB).  Nix's largest real ones are a few MiB; 16 MiB is several
# times that, and bounded.
MAX_DRV_SIZE = 16 << 20


class DerivationCheck:
    def __init__(self, queries: Queries) -> None:
        self.queries = queries
        self.store_dir = queries.store_dir
        self._hashes = Lru[str, str](KNOWN_HASHES)
        self._checked = Lru[str, Derivation](KNOWN_HASHES)

    def checked(self, path: str) -> Derivation | None:
        """The derivation at `path` if one was checked here lately (valid or not: it is
        what the path's text says)."""
        return self._checked.get(path)

    def check(self, new: Sequence[NewPath]) -> None:
        """Refuse the batch if any path named `*.drv` in it is not a derivation that checks
        out; its inputs may be valid already or in the batch."""
        batch = {n.path: n for n in new}
        drvs = [n for n in new if n.path.endswith(DRV_SUFFIX)]
        if not drvs:
            return
        parsed: dict[str, Derivation] = {}

        def resolve(path: str) -> Derivation:
            drv = parsed.get(path)
            if drv is None:
                drv = parsed[path] = self._read(path, batch)
            return drv

        hashes = HashModulo(resolve, self._hashes)
        for n in drvs:
            drv = validate(resolve(n.path))
            base = n.path.rsplit("/", 1)[-1]
            if base.split("-", 1)[1] != drv.name + DRV_SUFFIX:
                raise DerivationError(
                    f"{base}: the derivation in it is named {drv.name!r}, so its file must be "
                    f"named '{drv.name}{DRV_SUFFIX}'"
                )
            if set(n.references) != set(drv.references()):
                raise DerivationError(
                    f"{base}: a derivation's references must be its input derivations and "
                    "sources, no more and no fewer"
                )
            inputs = list(drv.input_srcs)
            for input_path, outputs in drv.input_drvs.items():
                have = _paths(self._checked.get(input_path) or resolve(input_path))
                missing = sorted(set(outputs) - set(have))
                if missing:
                    raise DerivationError(f"{base}: {input_path} has no output {missing[0]!r}")
                inputs.extend(have[o] for o in outputs)
            try:
                check_environments(drv.environments, inputs, f"{base}: ")
            except BuildEnvError as e:
                raise DerivationError(str(e)) from None
            check_output_paths(drv, self.store_dir, hashes)
        for n in drvs:
            hashes.of_path(n.path)
            self._checked.put(n.path, parsed[n.path])

    def _read(self, path: str, batch: dict[str, NewPath]) -> Derivation:
        if not path.endswith(DRV_SUFFIX):
            raise DerivationError(f"input {path} is not a derivation")
        new = batch.get(path)
        if new is None and not self.queries.is_valid(path):
            raise DerivationError(f"input derivation {path} is not valid")
        try:
            if new is not None and new.contents is not None:
                return Derivation.from_json(_bounded(new.contents))
            return Derivation.from_json(read_drv_file(new.entry if new else Path(path)))
        except DerivationError as e:
            raise DerivationError(f"{path}: {e}") from None


def _bounded(data: bytes) -> bytes:
    if len(data) > MAX_DRV_SIZE:
        raise DerivationError(f"not a derivation: over the {MAX_DRV_SIZE:,} bytes allowed")
    return data


def _paths(drv: Derivation) -> Mapping[str, str]:
    return {name: out.path for name, out in drv.outputs.items()}


def read_drv_file(where: Path) -> bytes:
    """The bytes of the `.drv` at `where`: a regular file, not a link, at
    most MAX_DRV_SIZE bytes."""
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DerivationError(f"not a derivation file: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DerivationError("not a derivation: not a regular file")
        if st.st_size > MAX_DRV_SIZE:
            raise DerivationError(
                f"not a derivation: {st.st_size:,} bytes, over the {MAX_DRV_SIZE:,} a .drv "
                "may be (MAX_DRV_SIZE)"
            )
        # One more byte than allowed: a file grown since the fstat is caught, not read whole.
        data = f.read(MAX_DRV_SIZE + 1)
        if len(data) > MAX_DRV_SIZE:
            raise DerivationError(f"not a derivation: over the {MAX_DRV_SIZE:,} bytes allowed")
        return data
