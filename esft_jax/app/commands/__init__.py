"""The `esft` commands, a module each: `run(c)` does the work (its docstring is the command's help)
and `check(c)`, where there is one, refuses a bad config before any work starts or any file is
written. A new command is one module here and its name in NAMES (app/cli.py imports them)."""

NAMES = (
    "route", "profile", "select", "analyze", "train", "export", "eval", "run", "plan", "data", "serve"
)  # fmt: skip
