"""The weft daemon: store RPC on a Unix socket, build scheduling, the process monitor."""
