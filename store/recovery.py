"""How paths leave the store, and how what a dead process left half-way is set right.

A path leaves by a rename into a deletion directory in `.tmp` inside the write transaction
that unregisters it (the collector), or that registers its replacement (repair); it is
removed from disk after the commit.  Adds journal their entries in `PendingAdds` before
renaming them into place.  So whatever a process was doing when it died, the next open
(`recover`) finds either a journal row naming an unregistered path, which it removes, or
a dead owner's deletion directory holding a registered path, which it renames back.
"""

import os
import stat
from pathlib import Path

import apsw

from store.db import Database
from store.paths import StorePath
from store.tmparea import DELETION, TmpArea, owner_alive, owner_of, remove_tree


class Recovery:
    def __init__(self, db: Database, tmp: TmpArea, store_dir: str) -> None:
        self.db = db
        self.tmp = tmp
        self.store_dir = store_dir

    def recover(self) -> None:
        """Remove what dead processes left behind: unregistered paths, then scratch.

        A process is dead once it has exited (`store.tmparea`): the daemon calls this as
        it opens the store, before it serves anyone, and a killed daemon's deletions must
        be undone then, not at some later open once its zombie has been reaped."""
        with self.db.connection() as conn:
            pending = list(conn.execute("SELECT entry, path FROM PendingAdds"))
        for entry, path in pending:
            if owner_alive(owner_of(entry)):
                continue

            def body(conn: apsw.Connection, entry: str = entry, path: str = path) -> Path | None:
                conn.execute("DELETE FROM PendingAdds WHERE entry = ?", (entry,))
                if conn.execute("SELECT 1 FROM ValidPaths WHERE path = ?", (path,)).fetchone():
                    return None
                return self.tmp.move_aside(Path(path))

            aside = self.db.write(body)
            if aside is not None:
                remove_tree(aside)
        for entry in self.tmp.dead_entries():
            if entry.name.endswith(DELETION):
                self._finish_deletion(entry)
            else:
                remove_tree(entry)

    def _finish_deletion(self, batch: Path) -> None:
        """Deletions whose process died: each undone if its transaction did not commit."""
        names = os.listdir(batch)

        def body(conn: apsw.Connection) -> None:
            for name in names:
                final = os.path.join(self.store_dir, name)
                registered = conn.execute(
                    "SELECT 1 FROM ValidPaths WHERE path = ?", (final,)
                ).fetchone()
                if registered and not os.path.lexists(final):
                    self.move_back(batch / name, final)

        self.db.write(body)
        remove_tree(batch)

    def deletion_dir(self) -> str:
        """A new directory in `.tmp` to move deleted paths into (see `recover`)."""
        path = str(self.tmp.new_entry(DELETION))
        os.mkdir(path, 0o700)
        return path

    def move_out(self, path: str, into: str) -> str | None:
        """Rename a path out of the store into `into`, a `deletion_dir()`."""
        base = StorePath.parse(path, self.store_dir).base_name
        final = os.path.join(self.store_dir, base)
        entry = os.path.join(into, base)
        try:
            try:
                os.rename(final, entry)
            except PermissionError:
                # Not root: moving a directory to a new parent rewrites its '..'.
                os.chmod(final, 0o755)
                os.rename(final, entry)
        except FileNotFoundError:
            return None
        return entry

    def move_back(self, entry: str | Path, final: str | Path) -> None:
        os.rename(entry, final)
        if stat.S_ISDIR(os.lstat(final).st_mode):
            os.chmod(final, 0o555)
