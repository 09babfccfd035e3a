"""Dependency floors: pyproject.toml pins what the code imports, and an older install fails with a clear message."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from loratune.runtime import require

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# The oldest versions that have what loratune imports (checked against each project's changelog) and that
# the suite has run on; the installed ones are what CI tests.
NEEDED = {
    "transformers": "5.0",   # AttentionMaskInterface + masking_utils.sdpa_mask are 4.53+; 5.0.0 is the oldest the suite ran on
    "ray": "2.60",           # ray._private.ray_constants.ENABLE_RAY_CLUSTER, ray._raylet.Config.initialize (auth)
}


def declared() -> dict[str, Requirement]:
    doc = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    reqs = [Requirement(r) for r in doc["project"]["dependencies"]]
    reqs += [Requirement(r) for extra in doc["project"]["optional-dependencies"].values() for r in extra]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize("dist", sorted(NEEDED))
def test_floors_cover_what_is_imported(dist: str) -> None:
    spec = declared()[dist].specifier
    floors = [Version(s.version) for s in spec if s.operator == ">="]
    assert floors and min(floors) >= Version(NEEDED[dist]), f"{dist}{spec}: the floor must be >= {NEEDED[dist]}"
    assert spec.contains(metadata.version(dist), prereleases=True), f"the installed {dist} is outside {spec}"


def test_an_older_install_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "4.45.0" if d == "transformers" else real(d))
    with pytest.raises(ImportError, match=r"loratune needs transformers>=.* but transformers 4\.45\.0 is installed: "
                                          r"pip install 'transformers"):
        require.__wrapped__("transformers")
    require.__wrapped__("numpy")                   # in range: nothing raised
