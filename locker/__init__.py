"""The locker helper: a separate process that holds the daemon's fcntl locks."""
