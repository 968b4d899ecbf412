"""A wrapper that runs the builder under stricter limits (docs/environments.md).

    store-build -L examples/environments/limit.py              # fits: builds
    store-build -L examples/environments/limit.py:too_big      # fails, as it should

The wrapper environment `limits` sets `LIMIT_FILE_KIB` and `LIMIT_MEMORY_KIB`, and its
hooks (`limit.sh`) apply them with `ulimit` before they exec what they wrap.  `fits`
writes 64 KiB of output under a 1 MiB file size limit and builds; `too_big` writes 2 MiB,
and the kernel kills its builder with SIGXFSZ at the first byte past the limit: the build
fails with

    error: builder for '/var/lib/weft/store/…-too-big.drv' failed: killed by signal SIGXFSZ

reported as the builder's own death by a signal (not as a shell's exit code 153), so the
retry policy sees a signal; `noRetry` says that retrying it is pointless anyway.
"""

from store.recipe import Derivation, busybox, derivation, environment, source

bb = busybox()
sh = f"{bb}/bin/busybox"
hook = [sh, "sh", source("limit.sh")]

limits = environment(
    "limits",
    variables={"LIMIT_FILE_KIB": "1024", "LIMIT_MEMORY_KIB": "262144"},
    wrap_env_enter=hook,
    wrap_build=hook,
    wrap_env_exit=hook,
)


def writes(name: str, kib: int, **env: str) -> Derivation:
    # `exec`: the writer is the builder itself, so a signal that kills it is the build's.
    script = f"exec head -c {kib * 1024} /dev/zero > $out"
    return derivation(
        name, sh, ["sh", "-c", script], env={"PATH": f"{bb}/bin", **env}, environments=[limits]
    )


fits = writes("fits", 64)
too_big = writes("too-big", 2048, noRetry="1")

default = fits
