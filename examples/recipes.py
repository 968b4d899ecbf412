"""weft's examples: `store-build examples/recipes.py` builds `default`.

- `words`, `shout`, `count`, `report`: a diamond built with busybox alone.
- `greeting_o`, `hello_o`, `hello`: compile two C files and link them with the host's gcc,
  which the daemon exposes to builders through `sandbox-paths` in weft.toml
  (`["/usr", "/lib", "/lib64"]` is enough on Debian).
"""

from store.recipe import busybox, derivation, source

bb = busybox()
sh = f"{bb}/bin/busybox"
env = {"PATH": f"{bb}/bin"}

words = derivation("words", sh, ["sh", "-c", "printf 'store\\nbuild\\ndaemon\\n' > $out"], env=env)
shout = derivation("shout", sh, ["sh", "-c", f"tr a-z A-Z < {words} > $out"], env=env)
count = derivation("count", sh, ["sh", "-c", f"wc -l < {words} > $out"], env=env)
report = derivation(
    "report", sh, ["sh", "-c", f"{{ cat {shout}; echo lines: $(cat {count}); }} > $out"], env=env
)

src = source("hello-c")  # beside this file, from whatever directory it is built
cc_env = {"PATH": f"{bb}/bin:/usr/bin"}
greeting_o = derivation(
    "greeting.o", sh, ["sh", "-c", f"gcc -c -o $out {src}/greeting.c"], env=cc_env
)
hello_o = derivation(
    "hello.o", sh, ["sh", "-c", f"gcc -c -I{src} -o $out {src}/hello.c"], env=cc_env
)
hello = derivation(
    "hello",
    sh,
    ["sh", "-c", f"mkdir -p $out/bin && gcc -o $out/bin/hello {hello_o} {greeting_o}"],
    env=cc_env,
)

default = report
