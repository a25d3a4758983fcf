"""Fixtures for the image tests: the images built from the Dockerfiles (what ``make images`` builds).

The ``images`` fixture calls ``localimages.build.build_images()``: a no-op when the keyed
tags are up to date, minutes when cold (it installs podman with apt-get when missing).
It fails, never skips, when podman is missing or cannot build or run: these tests are
part of ``make test``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

from localimages import build, engine  # noqa: E402


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """``{"operator": ref, "trainer": ref}`` of the images built from the Dockerfiles."""
    try:
        return build.build_images(log=lambda msg: print(f"[images] {msg}", flush=True))
    except engine.EngineError as exc:
        pytest.fail(f"the images could not be built with podman (make images): {exc}", pytrace=False)
