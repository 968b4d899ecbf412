"""Recipes evaluated against the daemon (`store.recipe.RecipeStore`): the store they write
into is its store.

Adding each `.drv` as it is made is a round trip per derivation: with a few hundred, more
than everything else `store-build` does when nothing needs building.  So `store-build`
evaluates with `batch`: a text's store path is its name, content and references
(`store.hashing.text_path`), computed here, and `add_text` answers with it at once and
keeps the text; `flush`, once the recipe has run, sends them in order in `add-texts`
requests (one, for a recipe of a couple of thousand derivations), each added by the daemon
in one transaction with every check it makes of a `.drv` (`store.drvcheck`).  Nothing of
an evaluation needs its `.drv` files in the store before it ends: a source's content is
added as it is, with no references found in it.

A path remembered from an earlier evaluation (`reuse`: the busybox tree,
`store.recipebusybox`) goes first, with the paths of the texts, in a request that pins them
all and asks whether they are valid, sending no text: an evaluation that reuses a path has
most likely run before, and then nothing more is sent.  A reused path collected since is
added again, and the texts not all valid are sent.

A batch the daemon refuses is sent again a text at a time, in order, as evaluating without
a batch does: the refusal is the one `add-text` gives, at the line of the recipe that made
the derivation (`file:line: message`, as a recipe's own mistakes are reported).  Used as a
context manager around the evaluation, the store flushes when the recipe fails too: what
it made before its mistake is added, as it was when each text was added as it was made,
and a refusal among those (which came first) is the error reported.  Without `batch`
(tests and benchmarks that build as they evaluate), each text is added when it is made.
"""

import os
import sys
from collections.abc import Callable

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.cli.common import CommandError

# Bytes of texts in one `add-texts` request: well under a frame's limit (`MAX_FRAME`,
# 4 MiB) with the request's framing, and a transaction of a couple of thousand `.drv`s.
BATCH_BYTES = 1 << 20
# Texts in one request: at most the daemon's `MAX_TEXTS` (daemon/rpc/ops/paths.py).
BATCH_TEXTS = 2048

# Where code that is not the user's lives: weft's packages and the standard library.  The
# deepest frame outside them made the derivation.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_THE_USERS = (
    *(os.path.join(_ROOT, package) + os.sep for package in ("daemon", "store")),
    os.path.dirname(os.__file__) + os.sep,
)


class _Text:
    """A text kept for the next `flush`: where the recipe made it, and the path it has.
    A plain class: this module loads with every `store-build`, and dataclasses' import
    costs more than the build of a `.drv` path."""

    __slots__ = ("name", "path", "references", "size", "text", "where")

    def __init__(self, name: str, text: str, references: list[str], path: str, size: int):
        self.name = name
        self.text = text
        self.references = references
        self.path = path
        self.size = size
        self.where = _caller()

    def refused(self, message: str) -> CommandError:
        """The daemon's refusal of this text, at the recipe's line, naming the text."""
        said = message if self.name in message else f"{self.name}: {message}"
        if self.where is None:
            return CommandError(f"error: {said}")
        file, line = self.where
        return CommandError(f"{file}:{line}: {said}")

    def check(self, got: str) -> None:
        if got != self.path:
            raise self.refused(
                f"the daemon stored it at {got}, not at {self.path} as computed here "
                "(is the daemon another version of weft?)"
            )

    def as_arg(self) -> dict[str, object]:
        return {"name": self.name, "text": self.text, "references": self.references}


class DaemonRecipeStore:
    """Recipes evaluated against the daemon: each text added as it is made, or with
    `batch`, kept until `flush`."""

    def __init__(self, client: BlockingClient, store_dir: str, batch: bool = False) -> None:
        self.client = client
        self.store_dir = store_dir
        self.batch = batch
        self._texts: list[_Text] = []
        self._reused: list[tuple[str, Callable[[], str]]] = []
        if batch:
            # Only here: the store's hashing is not for a build of `.drv` paths.
            from store.hashing import text_path

            self._text_path = text_path

    def __enter__(self) -> "DaemonRecipeStore":
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        """`flush`, whether the recipe ran to its end or failed: the derivations it made
        before its mistake are in the store, as they were when each was added as it was
        made, and a refusal among them (made earlier) is the error reported."""
        if kind is None or issubclass(kind, Exception):
            self.flush()

    def add_source(self, path: str, name: str) -> str:
        return str(self.client.call("add-from-path", path=path, name=name)["path"])

    def add_text(self, name: str, text: str, references: list[str]) -> str:
        if not self.batch:
            return self._add_one(name, text, references)
        data = text.encode()
        path = self._text_path(self.store_dir, name, data, references)
        self._texts.append(_Text(name, text, references, path, len(data)))
        return path

    def reuse(self, path: str, add: Callable[[], str]) -> str:
        """`path` kept for this connection if still valid, else `add()`'s; with `batch`,
        asked with the first request of `flush`."""
        if self.batch:
            self._reused.append((path, add))
            return path
        try:
            reply = self.client.call("add-texts", texts=[], require=[path])
        except DaemonError:
            return add()  # a daemon that cannot say: the path is made again
        return add() if reply.get("not_valid") else path

    def flush(self) -> None:
        """Send the texts kept since the last flush, in order, and make sure of the paths
        reused; a refusal is a `CommandError` at the recipe's line that made the text."""
        texts, self._texts = self._texts, []
        reused, self._reused = self._reused, []
        batches = _batches(texts)
        if reused and not batches:
            batches = [[]]
        for i, batch in enumerate(batches):
            self._send(batch, reused if i == 0 else [], ask_first=bool(reused))

    def _send(
        self, batch: list[_Text], reused: list[tuple[str, Callable[[], str]]], ask_first: bool
    ) -> None:
        try:
            if ask_first and self._valid_already(batch, reused):
                return
            reply = self.client.call("add-texts", texts=[t.as_arg() for t in batch])
        except DaemonError:
            # Refused: the refusal of the text that has it, at its line.  The reused
            # paths may not have been looked at, so they are made sure of first.
            _add_again(reused)
            for t in batch:
                try:
                    t.check(self._add_one(t.name, t.text, t.references))
                except DaemonError as e:
                    raise t.refused(e.message) from None
            return
        for t, got in zip(batch, reply["paths"], strict=True):
            t.check(got)

    def _valid_already(
        self, batch: list[_Text], reused: list[tuple[str, Callable[[], str]]]
    ) -> bool:
        """Whether every text of `batch` is in the store already, asked with the reused
        paths (all pinned for the connection; a reused one not valid is added again).  An
        evaluation that reuses a path has run against this store before, most likely the
        same recipe, whose texts are then all valid: its paths alone are sent, a tenth of
        the bytes, and the daemon hashes no text."""
        required = [*(p for p, _ in reused), *(t.path for t in batch)]
        reply = self.client.call("add-texts", texts=[], require=required)
        missing = set(reply.get("not_valid") or ())
        _add_again([r for r in reused if r[0] in missing])
        return not missing

    def _add_one(self, name: str, text: str, references: list[str]) -> str:
        reply = self.client.call("add-text", name=name, text=text, references=references)
        return str(reply["path"])


def _add_again(reused: list[tuple[str, Callable[[], str]]]) -> None:
    """Add the reused paths not valid any more; each must come back as the same path,
    which the recipe has already used."""
    for path, add in reused:
        again = add()
        if again != path:
            raise CommandError(
                f"error: {path}, remembered from an earlier evaluation, is now {again}: "
                "the host's file changed during the evaluation; run it again"
            )


def _batches(texts: list[_Text]) -> list[list[_Text]]:
    """`texts` in order, in requests of at most BATCH_TEXTS texts and BATCH_BYTES bytes
    (a larger text alone)."""
    batches: list[list[_Text]] = []
    size = 0
    for t in texts:
        if not batches or size + t.size > BATCH_BYTES or len(batches[-1]) >= BATCH_TEXTS:
            batches.append([])
            size = 0
        batches[-1].append(t)
        size += t.size
    return batches


# Whether each file met is weft's or the standard library's: asked for a few frames of
# every text a recipe makes.
_THEIRS: dict[str, bool] = {}


def _caller() -> tuple[str, int] | None:
    """The file and line of the deepest frame of the user's code now running."""
    frame = sys._getframe(2)
    while frame is not None:
        file = frame.f_code.co_filename
        theirs = _THEIRS.get(file)
        if theirs is None:
            theirs = _THEIRS[file] = file.startswith(NOT_THE_USERS)
        if not theirs:
            return file, frame.f_lineno
        frame = frame.f_back
    return None
