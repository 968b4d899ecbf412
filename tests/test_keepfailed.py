"""--keep-failed hygiene, on a build dir made on the host with every hazard in it."""

import os
import shutil
import stat
from pathlib import Path

from daemon.build.keepfailed import keep_failed

BUILDER = 30042
USER = 65534


def test_hazards_are_removed_and_the_rest_handed_over(tmp_path: Path) -> None:
    build = tmp_path / "build"
    (build / "sub").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    os.link(secret, build / "sub" / "stolen")  # a hard link to a root-owned file
    setuid = build / "setuid"
    setuid.write_text("#!/bin/sh\n")
    os.chmod(setuid, 0o6777)
    os.mkfifo(build / "fifo")
    (build / "link").symlink_to("/etc/shadow")
    (build / "sub").chmod(0o1777)
    for p in [build, *build.rglob("*")]:
        if p.name != "stolen":
            os.lchown(p, BUILDER, BUILDER)
    kept = Path(keep_failed(build, BUILDER, "thing", USER, USER))
    assert kept.name == "build" and kept.parent.name.startswith("weft-build-thing-")
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert kept.parent.stat().st_uid == USER
    assert not (kept / "sub" / "stolen").exists()
    assert secret.read_text() == "root only"
    assert not (kept / "fifo").exists()
    assert stat.S_IMODE((kept / "setuid").stat().st_mode) == 0o755
    assert stat.S_IMODE((kept / "sub").stat().st_mode) == 0o755
    assert os.readlink(kept / "link") == "/etc/shadow"
    assert {p.lstat().st_uid for p in [kept, *kept.rglob("*")]} == {USER}
    shutil.rmtree(kept.parent)
