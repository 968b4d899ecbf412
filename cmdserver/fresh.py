"""Whether a command may run in this server: the code it would run is what is on disk
now, and what the interpreter read from the environment when it started is what the
command's environment says.

A module is read once, when the server imports it; an edit afterwards (a `git pull`, a
reinstall) would otherwise go unseen by every later command.  So the server notes the
size and modification time of the interpreter and of every file it has loaded from
outside the interpreter's own installation (weft's modules, the venv's packages), and
looks again before each command: a few dozen `stat` calls.  The standard library changes
only with the interpreter, whose binary a package upgrade replaces.
"""

import os
import sys
from dataclasses import dataclass

# Read by the interpreter as it starts (sys.path, flags, the streams' encoding), and not
# again: a command with other values must run in an interpreter of its own.
_STARTUP_PREFIXES = (b"PYTHON",)
_STARTUP_NAMES = frozenset({b"LANG", b"LC_ALL", b"LC_CTYPE"})


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _startup_env(env: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {k: v for k, v in env.items() if k in _STARTUP_NAMES or k.startswith(_STARTUP_PREFIXES)}


@dataclass
class Fingerprint:
    files: dict[str, tuple[int, int] | None]
    startup_env: dict[bytes, bytes]

    @classmethod
    def now(cls) -> "Fingerprint":
        """What the server runs on, taken once its imports are done."""
        paths = {os.path.realpath(sys.executable)}
        base = os.path.join(sys.base_prefix, "")
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and not path.startswith(base):
                paths.add(path)
        return cls({p: _stamp(p) for p in sorted(paths)}, _startup_env(dict(os.environb)))

    def changed(self) -> str | None:
        """A file loaded that is not what it was, if any."""
        for path, stamp in self.files.items():
            if _stamp(path) != stamp:
                return path
        return None

    def same_startup(self, env: dict[bytes, bytes]) -> bool:
        return _startup_env(env) == self.startup_env
