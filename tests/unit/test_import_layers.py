"""The import layering of ``.importlinter`` holds (import-linter, static: nothing is imported).

Contracts: the operator's layers (api -> render/objects -> attempts -> decision -> status ->
kube/plan/fitcheck/metrics -> reconcile -> handlers -> cli, with one documented exception),
the pod contract and the trainer config light (no ML stack, no Kubernetes client, no
operator), the contract standard-library only, and the operator free of the ML stack. ``test_import_boundaries`` checks the same at run
time for a few entry modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[2]


def lint(config: Path) -> int:
    """import-linter's exit status for ``config`` (0: every contract kept); the report goes to stdout."""
    return lint_imports(config_filename=str(config), no_cache=True, no_logo=True)


def test_the_import_contracts_are_kept(capsys):
    code = lint(REPO / ".importlinter")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 kept, 0 broken" in out, out


@pytest.mark.parametrize(
    "contract",
    [
        "type = layers\nlayers =\n    qlora_operator.api\n    qlora_operator.reconcile\n",
        "type = forbidden\nsource_modules =\n    qlora_operator.status\nforbidden_modules =\n    qlora_trainer.contract\n",
    ],
    ids=["upside-down layers", "forbidden import that exists"],
)
def test_a_broken_contract_fails(tmp_path, capsys, contract):
    # guard against a checker that can never fail: these contain imports the code really has
    config = tmp_path / "importlinter.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    qlora_operator\n    qlora_trainer\n\n"
        f"[importlinter:contract:broken]\nname = broken on purpose\n{contract}"
    )
    assert lint(config) != 0, capsys.readouterr().out
