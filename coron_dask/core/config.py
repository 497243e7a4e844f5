"""coron-dask's defaults in dask's configuration (namespace ``coron_dask``), as dask-jobqueue
keeps its own: made from the parameter spec (``core.parameters``), overridden by the user's
dask YAML files or by ``DASK_CORON_DASK__...`` environment variables; and the parameters of
a run resolved from them and checked."""

import json
import textwrap

import dask.config

from coron_dask.core.parameters import EXECUTION, SPEC, STEPS, defaults, defaults_of

dask.config.update_defaults({"coron_dask": defaults()})


def get(key: str) -> object:
    """The configured value of ``coron_dask.<key>``, e.g. ``get("klip.truncate")``."""
    return dask.config.get(f"coron_dask.{key}")


def resolve_parameters(**given: object) -> dict:
    """``build_products``' parameters (``core.parameters.STEPS``) with None replaced by the
    configured defaults, each read and checked: CoronInputError names the first bad one."""
    unknown = set(given) - {parameter.name for parameter in STEPS}
    if unknown:
        raise TypeError(f"unexpected parameters {sorted(unknown)}")
    resolved = {}
    for parameter in STEPS:
        value = given.get(parameter.name)
        value = get(parameter.key) if value is None else value
        if value is not None or parameter.none is None:
            value = parameter.read(value, parameter.name)
        resolved[parameter.name] = value
    return resolved


def read_execution(**given: object) -> dict:
    """The execution options given (None: not given, left None), each read and checked."""
    readers = {parameter.name: parameter.read for parameter in EXECUTION}
    unknown = set(given) - set(readers)
    if unknown:
        raise TypeError(f"unexpected execution options {sorted(unknown)}")
    return {
        name: value if value is None or readers[name] is None else readers[name](value, name)
        for name, value in given.items()
    }


def _yaml_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)
    return repr(value)


def yaml_text() -> str:
    """``coron_dask.yaml``: the defaults as a YAML file to read or copy, each with its help."""
    lines = [
        "# coron-dask's defaults, loaded into dask's configuration under \"coron_dask\" (made",
        "# from coron_dask/core/parameters.py: python -m coron_dask.core.config).",
        "# Override them the dask way: a YAML file in ~/.config/dask/ (or $DASK_CONFIG), or",
        "# environment variables such as DASK_CORON_DASK__KLIP__TRUNCATE=20.",
        "coron_dask:",
    ]
    written: set[str] = set()
    for parameter in SPEC:
        if parameter.key is None:
            continue
        *sections, leaf = parameter.key.split(".")
        for depth in range(len(sections)):
            section = ".".join(sections[: depth + 1])
            if section not in written:
                written.add(section)
                lines.append(f"{'  ' * (depth + 1)}{sections[depth]}:")
        entry = f"{'  ' * (len(sections) + 1)}{leaf}: {_yaml_value(defaults_of(parameter))}"
        comment = parameter.help + (f" (null: {parameter.none})" if parameter.none else "")
        wrapped = textwrap.wrap(comment, 96 - 36) or [""]
        lines.append(f"{entry:<34} # {wrapped[0]}")
        lines.extend(f"{'':<34} # {more}" for more in wrapped[1:])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(yaml_text(), end="")
