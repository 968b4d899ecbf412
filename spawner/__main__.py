"""`python -m spawner FD`: serve spawn requests on the inherited SEQPACKET socket FD."""

import sys

from spawner.server import main

if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m spawner FD")
    main(int(sys.argv[1]))
