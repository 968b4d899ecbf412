# A wrapper that runs everything it wraps under stricter limits (docs/environments.md).
#
#   limit.sh -e K=V ... -- CMD ARGS...
#
# The limits come from the environment, where the wrapper environment's variables put
# them (a variable left unset is a limit left as it is):
#
#   LIMIT_FILE_KIB     the largest file a process may write, KiB (ulimit -f): a write past
#                      it kills the writer with SIGXFSZ
#   LIMIT_MEMORY_KIB   the address space of each process, KiB (ulimit -v)
#
# Limits are inherited and can only be lowered by an unprivileged process, so the wrapped
# action cannot lift them.  The hook execs the action: its exit status, or the signal that
# killed it, is the action's own.
set -eu

# busybox's `ulimit -f` counts 512-byte blocks.
FILE_BLOCKS_PER_KIB=2

while [ "${1:-}" = -e ]; do
	export "$2"
	shift 2
done
if [ "${1:-}" != -- ]; then
	echo "limit: no '--' before the wrapped command" >&2
	exit 2
fi
shift
if [ -n "${LIMIT_FILE_KIB:-}" ]; then
	ulimit -f $((LIMIT_FILE_KIB * FILE_BLOCKS_PER_KIB))
fi
if [ -n "${LIMIT_MEMORY_KIB:-}" ]; then
	ulimit -v "$LIMIT_MEMORY_KIB"
fi
echo "limit: file size ${LIMIT_FILE_KIB:-unlimited} KiB, memory ${LIMIT_MEMORY_KIB:-unlimited} KiB: $*" >&2
exec "$@"
