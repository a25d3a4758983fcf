"""Importing the operator must not load torch; the trainer's config loads neither torch nor kopf.

Each check runs in a fresh interpreter, so modules other tests imported do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
for name in {modules!r}:
    __import__(name)
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""


def loaded_after(*modules: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(modules=list(modules))], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "modules,forbidden",
    [
        (("qlora_operator",), {"torch", "transformers", "peft", "bitsandbytes", "trl"}),
        (("qlora_operator.api",), {"torch", "transformers", "kopf", "kubernetes"}),
        (("qlora_operator.crd",), {"torch", "transformers", "kopf", "kubernetes"}),
        (("qlora_trainer.config",), {"torch", "kopf", "transformers", "kubernetes"}),
        (("qlora_trainer.contract",), {"torch", "kopf", "transformers", "kubernetes", "pydantic", "qlora_operator"}),
        (("qlora_trainer.estimate",), {"torch", "kopf", "transformers", "kubernetes"}),
    ],
    ids=["operator", "operator.api", "operator.crd", "trainer.config", "trainer.contract", "trainer.estimate"],
)
def test_import_does_not_load(modules: tuple[str, ...], forbidden: set[str]):
    loaded = loaded_after(*modules)
    assert modules[0].split(".")[0] in loaded
    assert not loaded & forbidden, f"importing {modules[0]} loaded {sorted(loaded & forbidden)}"


def test_probe_detects_a_loaded_module():
    # guard against a probe that can never fail
    assert "json" in loaded_after("json")
