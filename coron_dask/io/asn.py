"""JWST level-3 association files: which exposures are science and which are PSF references."""

import json
from dataclasses import dataclass
from pathlib import Path

from coron_dask.core.errors import CoronInputError


@dataclass(frozen=True)
class Association:
    """The parts of an ASN that calwebb_coron3 uses; member paths resolved to the ASN's folder."""

    path: Path
    asn_id: str
    product_name: str
    science: tuple[Path, ...]
    psf: tuple[Path, ...]


def read_association(path: str | Path) -> Association:
    """Parse and check an association; members of exptype other than science and psf are ignored."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise CoronInputError(path, "association file not found") from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise CoronInputError(path, f"cannot read association: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise CoronInputError(path, f"cannot read association: {error}") from None
    except json.JSONDecodeError as error:
        raise CoronInputError(path, f"not valid JSON: {error}") from None
    if not isinstance(table, dict):
        raise CoronInputError(path, "association is not a JSON object")
    asn_id = table.get("asn_id")
    if not isinstance(asn_id, str) or not asn_id:
        raise CoronInputError(path, "association has no 'asn_id'")
    products = table.get("products")
    if not isinstance(products, list) or not products or not isinstance(products[0], dict):
        raise CoronInputError(path, "association has no 'products'")
    product = products[0]
    name = product.get("name")
    if not isinstance(name, str) or not name:
        raise CoronInputError(path, "association product has no 'name'")
    members = product.get("members")
    if not isinstance(members, list):
        raise CoronInputError(path, "association product has no 'members' list")
    groups: dict[str, list[Path]] = {"science": [], "psf": []}
    for number, member in enumerate(members, start=1):
        if not isinstance(member, dict) or not isinstance(member.get("expname"), str):
            raise CoronInputError(path, f"member {number} has no 'expname'")
        exptype = str(member.get("exptype", "")).lower()
        if exptype in groups:
            groups[exptype].append(path.parent / member["expname"])
    for exptype, found in groups.items():
        if not found:
            raise CoronInputError(path, f"association has no {exptype} members")
    return Association(
        path=path,
        asn_id=asn_id,
        product_name=name,
        science=tuple(groups["science"]),
        psf=tuple(groups["psf"]),
    )
