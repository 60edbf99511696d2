"""docs/cli.md, generated from the click commands themselves so it cannot drift from them:
every command's `--help`, in the order a reader meets them.

``python -m podtwin.runner.cli_doc > docs/cli.md`` (``make docs``); a unit test fails when
the file and the commands differ.
"""
from __future__ import annotations

import click

from podtwin.runner.cli import main

WIDTH = 100

HEADER = """# podtwin command line

Generated from the commands' own help by `make docs` (`python -m podtwin.runner.cli_doc`);
a unit test fails when this page and the commands differ. Exit codes are in the
[README](../README.md#exit-codes); the config keys in [config.md](config.md).
"""


def _walk(command: click.Command, path: list[str], parent: click.Context | None):
    ctx = click.Context(command, info_name=path[-1], parent=parent, max_content_width=WIDTH, terminal_width=WIDTH,
                        help_option_names=["-h", "--help"])
    yield " ".join(path), command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), [*path, name], ctx)


def render() -> str:
    out = [HEADER]
    for name, text in _walk(main, ["podtwin"], None):
        out += [f"## `{name}`", "", "```", text.rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
