"""The options of ``coron-dask run``, ``contrast`` and ``demo``, made from the parameter spec
(``core.parameters.SPEC``): each parameter's option, read and checked as the Python API reads
it, its help showing the default as configured."""

import argparse
from collections.abc import Callable

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError
from coron_dask.core.parameters import SPEC, Parameter, shown
from coron_dask.core.readers import dq_bits, text

#: Readers of a text's content: the command line hands the text on as it is, and the run
#: checks it (as it checks the configured value), naming the parameter.
TEXTS = (dq_bits, text)


def _argument_type(parameter: Parameter) -> Callable[[str], object]:
    """The parameter's reader as argparse's ``type``: a bad value is a usage error."""

    def read(text: str) -> object:
        try:
            return parameter.read(text, parameter.name)
        except CoronInputError as error:
            raise argparse.ArgumentTypeError(error.problem) from None

    read.__name__ = parameter.name
    return read


def _help(parameter: Parameter) -> str:
    """The option's help, with its default (the configured one, for a configured setting)."""
    if parameter.option_help:  # an option that says no: the default is yes
        return parameter.option_help
    default = config.get(parameter.key) if parameter.key else parameter.default
    if parameter.required or (default is None and parameter.none is None):
        return parameter.help
    return f"{parameter.help} (default: {shown(default, parameter.none)})"


def _options(command: str) -> list[Parameter]:
    return [
        p for p in SPEC if p.role != "setting" and p.option is not None and command in p.commands
    ]


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``command``'s options (run, contrast or demo), in groups; None where not given, so
    that the configured defaults apply."""
    groups: dict[str, object] = {}
    for parameter in _options(command):
        group = groups.get(parameter.group)
        if group is None:
            group = groups[parameter.group] = parser.add_argument_group(parameter.group)
        if parameter.exclusive:
            key = f"exclusive {parameter.exclusive}"
            if key not in groups:
                groups[key] = group.add_mutually_exclusive_group()
            group = groups[key]
        options: dict = {"dest": parameter.name, "help": _help(parameter)}
        if parameter.action == "store_false" and parameter.key:  # None: the configured one
            options.update(action="store_const", const=False, default=None)
        elif parameter.action in ("store_false", "store_true"):  # a flag
            options.update(action=parameter.action)
        else:
            options.update(default=None if parameter.key else parameter.default)
            if parameter.action:
                options["action"] = parameter.action
            if parameter.choices:
                options["choices"] = parameter.choices
            elif parameter.read is not None and parameter.read not in TEXTS:
                options["type"] = _argument_type(parameter)
            if not parameter.choices:
                options["metavar"] = parameter.metavar or parameter.flag[2:].upper().replace(
                    "-", "_"
                )
            if parameter.required is True or command in (parameter.required or ()):
                options["required"] = True
        group.add_argument(parameter.flag, **options)


def given(args: argparse.Namespace, command: str, role: str) -> dict:
    """The values of ``command``'s options of ``role`` (step, execution, injection) on the
    command line, by their names in Python (None: not given)."""
    return {p.name: getattr(args, p.name) for p in _options(command) if p.role == role}
