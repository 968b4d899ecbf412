# An instrumentation wrapper for weft's build environments (docs/environments.md).
#
# One script for the wrapper environment's own enter and exit actions and for its three
# hooks, so that every line it logs has one format:
#
#   instrument.sh enter                      the wrapper's enter: starts the clock
#   instrument.sh hook HOOK -e K=V ... -- CMD ARGS...
#                                            a hook: logs the time and the wrapped argv,
#                                            then becomes the wrapped action
#   instrument.sh exit                       the wrapper's exit: logs the session's time
#
# A hook execs the wrapped action rather than running it as a child: its exit status,
# or the signal that killed it, is then the wrapped action's own, and a SIGTERM from weft
# reaches it directly.  So a hook cannot time the action it wraps; the time it logs is
# since the wrapper was entered, and the next line's time is where that action ended.
# The log goes to stderr: an enter's stdout is read for weft_env lines.
set -eu

# Centiseconds since boot, from /proc/uptime: busybox's date has whole seconds only.
now() {
	read -r up _ </proc/uptime
	echo "${up%.*}${up#*.}"
}

since_start() {
	t=$(($(now) - ${INSTRUMENT_T0:-$(now)}))
	printf '+%d.%02d s' $((t / 100)) $((t % 100))
}

case "${1:-}" in
enter)
	# The clock travels to every later step, hooks included, as a weft_env line.
	echo "weft_env: INSTRUMENT_T0=$(now)"
	echo "instrument: session started" >&2
	exit 0
	;;
exit)
	echo "instrument: $(since_start): session ended" >&2
	exit 0
	;;
hook) ;;
*)
	echo "instrument: usage: instrument.sh enter|exit|hook HOOK -e K=V ... -- CMD ARGS..." >&2
	exit 2
	;;
esac

hook=$2
shift 2
vars=0
# The -e pairs are the variables the environments and the derivation set.  This wrapper
# runs the action where the hook runs, whose environment holds them already; a wrapper
# that crossed into another context (a container, a remote host) would forward them.
while [ "${1:-}" = -e ]; do
	export "$2"
	vars=$((vars + 1))
	shift 2
done
if [ "${1:-}" != -- ]; then
	echo "instrument: $hook: no '--' before the wrapped command" >&2
	exit 2
fi
shift
echo "instrument: $(since_start): $hook, $vars variables: $*" >&2
exec "$@"
