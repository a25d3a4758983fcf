"""``python -m qlora_operator``: the ``qlora-operator`` command."""

from qlora_operator.cli import app

app(prog_name="qlora-operator")
