"""Help that teaches: ``boltstream --help`` lists the commands by group in the order a new user needs them, and
every ``boltstream COMMAND --help`` ends with an example that the command's own parser accepts."""

from __future__ import annotations

import re
import shlex

import pytest

from boltstream.infra.cli import COMMANDS, GROUPS, build_parser, main


def test_a_bare_boltstream_lists_the_commands_by_group(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    titles = [line.removesuffix(":") for line in out.splitlines() if line.endswith(":") and line[0] != " "]
    assert titles == [*GROUPS, "options"]
    listed = [line.split()[0] for line in out.splitlines() if re.match(r"  [a-z]+ {2,}\w", line)]
    assert listed == [name for group in GROUPS.values() for name in group]
    assert "`boltstream COMMAND --help` shows a command's options and an example." in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_ends_with_an_example_its_parser_accepts(name, capsys):
    parser = build_parser(name)
    with pytest.raises(SystemExit):
        parser.parse_args([name, "--help"])
    *_, heading, example = capsys.readouterr().out.rstrip().splitlines()
    assert heading == f"example, {COMMANDS[name].example_does}:"
    argv = shlex.split(example)
    assert argv[:2] == ["boltstream", name]
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`boltstream {name}` rejects its own example: {example}")
    assert args.command == name
