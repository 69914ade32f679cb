"""What the launchers share: splitting off main.py's flags, --env, shell quoting, running a command."""
import argparse
import shlex
import subprocess
import sys

# Pinned with requirements.txt: accelerator builds of jax must match the CPU one the project is tested with.
JAX_VERSION = "0.10.2"


def split_main_args(argv):
    """(launcher arguments, main.py arguments): main.py's flags come after a `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def check_main_args(main_args):
    if not main_args:
        raise SystemExit("give main.py's flags after `--`, e.g. -- --mode=train --config=configs/llm_embedder.py")
    if main_args[0].endswith(".py"):
        raise SystemExit(f"after `--` come main.py's flags, not a script ({main_args[0]}); main.py is implied")


def env_pairs(values):
    """`KEY=VALUE` strings (from repeated --env) -> a dict, in order."""
    pairs = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--env {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def add_common_flags(parser):
    parser.add_argument("--dry_run", action="store_true", help="print the commands (and scripts) without running them")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for every process (repeatable)")


def shell_command(argv, env=None):
    """One line a POSIX shell runs as `argv` with `env` set."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.join(argv)])


def run(argv):
    """Runs one command, echoed to stderr first; returns its exit status."""
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.call(argv)


class Parser(argparse.ArgumentParser):
    """argparse with the `-- main.py flags` convention in its usage line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        self.usage = "%(prog)s [options] -- MAIN_PY_FLAGS..."
