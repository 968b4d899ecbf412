"""The builder's environment, as every build of a derivation gets it: Nix's defaults, then
the derivation's own variables, then its environment delta.  One function for the local
attempt (`attempt.py`) and the remote one (`daemon/remote/request.py`): a remote Command
must carry exactly what a local build would get, or the two would build different things.
"""

from store.derivation import Derivation
from store.environment.delta import Expand, apply


def defaults(store_dir: str, cores: str) -> dict[str, str]:
    """What every builder's environment has, unless its derivation says otherwise."""
    return {
        "PATH": "/path-not-set",
        "HOME": "/homeless-shelter",
        "NIX_STORE": store_dir,
        "NIX_BUILD_TOP": "/build",
        "NIX_BUILD_CORES": cores,
        "TMPDIR": "/build",
        "TEMPDIR": "/build",
        "TMP": "/build",
        "TEMP": "/build",
        "PWD": "/build",
    }


def build_environment(drv: Derivation, store_dir: str, cores: str) -> dict[str, str]:
    env = defaults(store_dir, cores)
    env.update(drv.env)
    # After `env`, so that `${@PATH@}` and the lists' old values are the derivation's.
    return apply(drv.env_delta, env, Expand.VIEW)[0]
