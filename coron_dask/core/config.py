"""coron-dask's defaults in dask's configuration (namespace ``coron_dask``), as dask-jobqueue
keeps its own: made from the parameter spec (``core.parameters``), overridden by the user's
dask YAML files or by ``DASK_CORON_DASK__...`` environment variables; and the parameters of
a run resolved from them and checked."""

import dask.config

from coron_dask.core.parameters import EXECUTION, STEPS, defaults

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
