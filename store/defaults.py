"""Where things are by default; kept free of heavy imports for the command-line client."""

import os

ENV_STATE_DIR = "WEFT_STATE_DIR"
ENV_SOCKET = "WEFT_SOCKET"


def default_state_dir() -> str:
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/weft"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "weft")


def has_store(state_dir: str) -> bool:
    """Whether a store was made in `state_dir`: its database is its birth certificate.  A
    named state dir without one is not created implicitly (a typo would start a new store)."""
    return os.path.exists(os.path.join(state_dir, "var", "db", "db.sqlite"))


def socket_path(state_dir: str) -> str:
    """`<state dir>/var/daemon.sock`, unless WEFT_SOCKET says otherwise."""
    return os.environ.get(ENV_SOCKET) or os.path.join(state_dir, "var", "daemon.sock")
