"""The `esft` command line: `esft <command> --config path.py[:arg] [--config.key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from esft_jax.app import checks, config_files, interrupt, step_cap
from esft_jax.app.commands import NAMES
from esft_jax.errors import UserError
from esft_jax.train.guard import DivergedError

COMMANDS: dict[str, ModuleType] = {
    name: importlib.import_module(f"esft_jax.app.commands.{name}") for name in NAMES
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="esft", description="Expert-Specialized Fine-Tuning in JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.run.__doc__, description=command.run.__doc__)
        p.add_argument(
            "--config", required=True, help="path.py or path.py:arg, a file with get_config()"
        )
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --config.KEY=VALUE)")
    try:
        overrides = [a.removeprefix("--config.") for a in rest]
        c = config_files.load(args.config, overrides, command=args.command)
        checks.model_overrides(c, overrides)
        command = COMMANDS[args.command]
        if hasattr(command, "check"):
            command.check(c)
        step_cap.from_environment(args.command, c)
        command.run(c)
    except UserError as e:  # the input is wrong: one line naming what to fix
        print(f"esft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused: a full disk, a read-only or vanished directory
        where = f"{e.filename}: " if e.filename else ""
        print(f"esft {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except DivergedError as e:  # the input was fine, the run was not: exit 1
        print(f"esft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line (where it struck, for training), no traceback
        print(f"esft {args.command}: {interrupt.line(e)}", file=sys.stderr)
        return interrupt.EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
