"""An instrumentation wrapper around a real build (docs/environments.md).

    store-build -L examples/environments/instrument.py         # instrumented, with its log
    store-build examples/environments/instrument.py:plain      # the same build, unwrapped
    store-log "$(store-build examples/environments/instrument.py)"    # the log, later

`instrumented` and `plain` run one builder in one inner environment, `words`, whose enter
action hands the builder a variable through a `weft_env:` line.  `instrumented` puts the
wrapper environment `instrument` in front of it: `words`' enter and exit and the builder
itself then run through the wrapper's hooks, which log the time since the session started
and each wrapped argv (`instrument.sh`) and then exec it.  The two outputs have the same
contents; their paths differ, because the environments are part of the derivation.
"""

from store.recipe import action, busybox, derivation, environment, source

bb = busybox()
sh = f"{bb}/bin/busybox"
script = source("instrument.sh")  # beside this file, from whatever directory it is built


def hook(name: str) -> list[str]:
    return [sh, "sh", script, "hook", name]


instrument = environment(
    "instrument",
    enter=[sh, "sh", script, "enter"],
    exit=[sh, "sh", script, "exit"],
    wrap_env_enter=hook("wrap_env_enter"),
    wrap_build=hook("wrap_build"),
    wrap_env_exit=hook("wrap_env_exit"),
)
# An enter action sets variables for everything after it with `weft_env: K=V` lines.
words = environment(
    "words",
    variables={"WORDS_SORT": "-r"},
    enter=action(sh, "sh", "-c", "echo 'weft_env: WORDS=store build daemon session'", timeout=10),
    exit=[sh, "sh", "-c", "echo 'words: done with the words' >&2"],
)

# One line, as the wrapper logs the builder's argv on one.
BUILD = (
    "mkdir -p $out/share && for w in $WORDS; do echo $w; done | sort $WORDS_SORT"
    " > $out/share/words && cd $out/share && sha256sum words > SHA256SUMS"
)
env = {"PATH": f"{bb}/bin"}
plain = derivation("words", sh, ["sh", "-c", BUILD], env=env, environments=[words])
instrumented = derivation(
    "words", sh, ["sh", "-c", BUILD], env=env, environments=[instrument, words]
)

default = instrumented
