#!/usr/bin/env bash
# Installs what weft needs on a Debian 12 machine (as root) into ./.venv.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=(nix-bin busybox-static python3 python3-venv gcc libc6-dev musl-tools util-linux
  passt postgresql)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The spare program (the sandbox's last steps and the builder's exec, or the session
# runner of a build with environments: runner.c and its parts, runner_*.c), static: an
# exec without the dynamic loader.  With musl where there is one: glibc's start-up asks the CPU for its features
# dozens of times, and on a virtual machine each question traps to the hypervisor (a spare
# started 0.43 ms before its exit with glibc, 0.13 ms with musl).
spare_sources=(spawner/spare.c spawner/runner.c spawner/runner_plan.c spawner/runner_steps.c
  spawner/runner_io.c spawner/runner_env.c)
stale=0
for f in "${spare_sources[@]}" spawner/runner.h; do
  [ "$f" -nt spawner/weft-spare ] && stale=1
done
if [ ! -x spawner/weft-spare ] || [ $stale = 1 ]; then
  flags=(-O2 -Wall -Wextra -Werror -static -o spawner/weft-spare.tmp "${spare_sources[@]}")
  if command -v musl-gcc >/dev/null; then
    # musl brings no kernel headers: only those are taken from the system's.
    kernel_headers=$(mktemp -d)
    trap 'rm -rf "$kernel_headers"' EXIT
    ln -s /usr/include/linux /usr/include/asm-generic "$kernel_headers"/
    ln -s "/usr/include/$(gcc -print-multiarch)/asm" "$kernel_headers"/asm
    musl-gcc -idirafter "$kernel_headers" "${flags[@]}"
  else
    cc "${flags[@]}"
  fi
  mv spawner/weft-spare.tmp spawner/weft-spare
fi

# From Debian's own interpreter, whatever `python3` is first on root's PATH: the commands
# are run by every local user, and an interpreter under root's home (pyenv) is not theirs.
if [ "$(readlink -f .venv/bin/python 2>/dev/null)" != "$(readlink -f /usr/bin/python3)" ]; then
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
# A plain path entry, not setuptools' import-hook finder: the finder costs every
# command 20 ms of start-up.
.venv/bin/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
# remote/wire's message modules, generated from our .proto files by the installed grpcio-tools
# (generated code demands a protobuf runtime at least as new as its protoc): again when a .proto
# changed or grpcio-tools did.
tools_version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
regen=0
[ "$(cat remote/wire/.generated 2>/dev/null)" = "$tools_version" ] || regen=1
for f in remote/wire/*.proto; do
  [ "$f" -nt "${f%.proto}_pb2.py" ] && regen=1
done
if [ $regen = 1 ]; then
  .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. remote/wire/*.proto
  echo "$tools_version" >remote/wire/.generated
fi
# Commands start faster from compiled bytecode, and some environments never write it.
.venv/bin/python -m compileall -q store daemon locker spawner remote worker cmdserver >/dev/null

# The store-* commands are the command server's client (cmdserver/client.c): it runs the
# command in the user's server, whose imports are done, or this checkout's script when there
# is none; but store-run and store-runtime, which exec the user's program, in the user's own
# process.  Static with musl, as the spare is, for the same reason; it names this checkout
# and its interpreter, so it is made again at every install, and replaces the scripts pip
# made.
client_flags=(-O2 -Wall -Wextra -Werror -static -DWEFT_PYTHON="\"$PWD/.venv/bin/python\""
  -DWEFT_ROOT="\"$PWD\"" -o cmdserver/store-command.tmp cmdserver/client.c)
if command -v musl-gcc >/dev/null; then
  musl-gcc "${client_flags[@]}"
else
  cc "${client_flags[@]}"
fi
mv cmdserver/store-command.tmp cmdserver/store-command
for command in bin/store-*; do
  case "${command#bin/}" in
  store-client | store-run | store-runtime) ;;
  *) ln -sfn ../../cmdserver/store-command ".venv/bin/${command#bin/}" ;;
  esac
done

# The remote-execution engine (BuildGrid) of the one-machine farm (contrib/remote/farm) and of the
# remote tests, in a venv of its own: it wants a newer Python than Debian's and pins its own
# grpcio, protobuf and SQLAlchemy. 0.9.1 needs Python >= 3.13 (pyenv's, where the machine has
# one); from Debian 12's 3.11 the newest that installs is 0.4.4, with psycopg2.
engine_python=/usr/bin/python3
engine_spec='buildgrid[database]==0.4.4'
for candidate in ~/.pyenv/versions/3.1[3-9]*/bin/python3 python3.13 python3.14; do
  if command -v "$candidate" >/dev/null &&
    "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 13))' 2>/dev/null; then
    engine_python=$(command -v "$candidate")
    engine_spec='buildgrid==0.9.1'
    break
  fi
done
if [ "$(cat .venv-bgd/weft-engine 2>/dev/null)" != "$engine_spec" ] || [ ! -x .venv-bgd/bin/bgd ]; then
  rm -rf .venv-bgd
  "$engine_python" -m venv .venv-bgd
  .venv-bgd/bin/pip install -q --disable-pip-version-check "$engine_spec" 2>&1 |
    { grep -v "^WARNING: Location" || true; } >&2
  echo "$engine_spec" >.venv-bgd/weft-engine
fi
