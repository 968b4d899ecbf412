"""`python -m locker FD`: serve lock requests on the inherited SEQPACKET socket FD."""

import sys

from locker.server import main

if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m locker FD")
    main(int(sys.argv[1]))
