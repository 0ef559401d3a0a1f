"""Which coconut_scale wrote a checkpoint (the `coconut_scale` field of its manifest), and the refusal of what a
newer version wrote that this one cannot read: a key this version does not know, in a checkpoint from a newer
version, is not a typo to accept with checkpoint.allow_changes but a feature this version lacks."""

from __future__ import annotations

from pathlib import Path

from coconut_scale import file_manifest
from coconut_scale.errors import UserError


class NewerVersionError(UserError):
    """A checkpoint written by a newer coconut_scale holds what this version does not know."""


def written_by(checkpoint: str | Path) -> str | None:
    """The coconut_scale version recorded in the checkpoint's (or export's) manifest; None before versions were."""
    try:
        version = file_manifest.read_manifest(checkpoint).get("coconut_scale")
    except file_manifest.ManifestProblem:
        return None
    return version if isinstance(version, str) else None


def is_newer(version: str | None, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    if version is None:
        return False
    try:
        return Version(version) > Version(than)
    except InvalidVersion:
        return version != than


def refuse_unknown(checkpoint: str | Path, what: str, unknown: list[str]) -> None:
    """Raise NewerVersionError when `unknown` (keys of `what` this version does not know) is not empty and the
    checkpoint came from a newer version. Otherwise return: the caller treats the keys as it always did."""
    this = file_manifest.coconut_scale_version()
    version = written_by(checkpoint)
    if unknown and is_newer(version, this):
        raise NewerVersionError(
            f"checkpoint {checkpoint} was written by coconut_scale {version}, newer than this coconut_scale {this}: "
            f"its {what} has {', '.join(unknown)}, which this version does not know. Resume it with coconut_scale "
            f"{version} or newer")
