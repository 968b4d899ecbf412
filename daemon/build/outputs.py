"""A build's outputs: their locks, and what becomes of them once the builder is done.

Every build holds the lock of each output, a byte of the locker's byte-lock file
(`LockService.exclusive_bytes`), owned by the derivation whichever request builds it;
under them it looks whether the outputs are still missing (`Register.needed`).  What the
builder left is then, in one worker-thread trip (`Finish`): registered (`Register`, a
build), compared bit for bit with what is registered (`Compare`, `--check`), or put in
place of the registered paths (`Replace`, a repair).
"""

from collections.abc import Callable

from daemon.build.closures import Closures
from daemon.build.errors import BuildError
from daemon.sched.retry import Cause
from store.derivation import Derivation, drv_name
from store.errors import HashMismatch
from store.hashing import hash_path
from store.store import Store

# {output name: (where the builder left it, its store path)} and the input closure, in a
# worker thread.
Finish = Callable[[dict[str, tuple[str, str]], list[str]], None]


def output_paths(drv: Derivation) -> list[str]:
    """What a build of `drv` locks: its outputs' paths."""
    return [o.path for o in drv.outputs.values()]


def build_owner(drv_path: str) -> str:
    """The owner of a build's output locks: one per derivation, whichever request builds
    it."""
    return f"build:{drv_path}"


def movable(drv: Derivation) -> bool:
    """Whether a build's outputs may be moved into the store rather than copied.  Once
    the builder is reaped no process of its sandbox is left; but a fixed-output build has
    the network, and a way out found there (its namespace is its own since pasta, but
    the copy costs little against a download) could hand a descriptor of its output to a
    process outside, to write into the store later."""
    return not drv.is_fixed_output


class Register:
    """A build's `Finish`: its outputs registered, their closures known to the request.
    Also the look, under the locks, whether the build is needed at all."""

    def __init__(
        self,
        store: Store,
        drv_path: str,
        drv: Derivation,
        closures: Closures,
    ) -> None:
        self.store = store
        self.drv_path = drv_path
        self.drv = drv
        self.closures = closures
        self.expected = {k: o.hash for k, o in drv.outputs.items() if o.hash}
        # A fixed output's content found in the store under another name, if it was.
        self.present: str | None = None

    def needed(self) -> bool:
        """Whether the outputs are still missing (in a worker thread, under the locks:
        another process may have made them meanwhile)."""
        outs = [o.path for o in self.drv.outputs.values()]
        if self.store.valid_paths(outs) == set(outs):
            return False
        if self.drv.is_fixed_output:
            found = self.store.path_with_hash(self.expected["out"])
            if found is not None:
                # The content is already in the store: no need to fetch it again.
                self({"out": (found, outs[0])}, [])
                self.present = found
                return False
        return True

    def __call__(self, built: dict[str, tuple[str, str]], closure: list[str]) -> None:
        try:
            infos = self.store.add_outputs(
                self.drv_path,
                built,
                closure,
                self.expected,
                move=movable(self.drv),
            )
        except HashMismatch as e:
            # Already says which derivation, what was specified and what was got: the
            # words Nix users look for when they asked for the hash with an empty one.
            raise BuildError(str(e), Cause.HASH_MISMATCH) from None
        except Exception as e:
            message = f"outputs of '{drv_name(self.drv_path)}' refused: {e}"
            raise BuildError(message, Cause.REFUSED) from None
        self.closures.add_outputs(infos)


class Compare:
    """`--check`'s `Finish`: each output built again, compared with the registered one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.differs: list[str] = []  # the outputs that are not the same

    def __call__(self, built: dict[str, tuple[str, str]], closure: list[str]) -> None:
        for out_name, (left, registered) in built.items():
            info = self.store.path_info(registered)
            got, _ = hash_path(left)
            if info is None or got != info.nar_hash:
                self.differs.append(out_name)


class Replace:
    """A repair's `Finish`: the outputs put in place of the registered ones (corrupt or
    missing)."""

    def __init__(self, store: Store, drv_path: str, drv: Derivation) -> None:
        self.store = store
        self.drv_path = drv_path
        self.drv = drv

    def __call__(self, built: dict[str, tuple[str, str]], closure: list[str]) -> None:
        expected = {k: o.hash for k, o in self.drv.outputs.items() if o.hash}
        self.store.add_outputs(
            self.drv_path, built, closure, expected, repair=True, move=movable(self.drv)
        )
