"""`python -m locker FD [BYTE_FD]`: serve lock requests on the inherited SEQPACKET socket
FD, locking bytes of the inherited file BYTE_FD for `lock-byte` requests."""

import sys

from locker.server import main

if __name__ == "__main__":
    fds = sys.argv[1:]
    if len(fds) not in (1, 2) or not all(fd.isdigit() for fd in fds):
        sys.exit("usage: python -m locker FD [BYTE_FD]")
    main(*(int(fd) for fd in fds))
