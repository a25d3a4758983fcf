"""The demo path of ``make demo`` (README's first command), end to end, in CI.

Runs ``hack/demo.py`` as a user would, against a local cluster of its own with a real node
(containerd + kubelet; in a temp state directory, so it never touches a developer's
``.local-cluster/``), with fewer training steps than the interactive default. It asserts what
the demo promises: both images built, the operator from its image through the chart, the
trainer pod run from the trainer image as uid 1000 with a read-only root and its logs read
through the kubelet, the QLoRAJob completes, the eval loss goes down, and base and base +
adapter answer the held-out prompt differently. The cluster is stopped afterwards, leaving
nothing behind (marker ``realnode``: one real node per machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Steps of the CI run (the interactive default is examples/demo.yaml's maxSteps).
CI_STEPS = 12


@pytest.mark.cluster
@pytest.mark.realnode
@pytest.mark.slow
@pytest.mark.timeout(2100)
def test_demo_runs_end_to_end(tmp_path):
    state = tmp_path / "cluster"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "hack"), os.environ.get("PYTHONPATH", "")]),
               QLORA_DEMO_MAX_STEPS=str(CI_STEPS), QLORA_DEMO_TIMEOUT="1500", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "hack" / "demo.py"), "--state-dir", str(state)],
                              env=env, capture_output=True, text=True, timeout=1800)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"make demo's script failed:\n{output[-6000:]}"
        for step in ("[1] Build the operator and trainer images", "[2] Start the local cluster",
                     "[4] Install the Helm chart", "kubectl apply -f examples/demo.yaml",
                     "The trainer pod on the real node", "Results: artifacts"):
            assert step in output, f"the demo did not show the step {step!r}:\n{output[-4000:]}"
        assert re.search(rf"\b\d+/{CI_STEPS}\b", output), "the live status never showed step/total"
        result = json.loads((state / "demo-result.json").read_text())
        assert result["evalLossAfter"] < result["evalLossBefore"], result
        assert result["adapterAnswer"] != result["baseAnswer"], result
        # issue 16: the trainer ran from its image under the real kubelet
        pod = result["trainerPod"]
        assert result["node"] == "real" and pod["image"] == result["images"]["trainer"], result
        assert pod["containerId"].startswith("containerd://"), pod
        assert pod["runAsUser"] == 1000 and pod["readOnlyRootFilesystem"] is True, pod
        assert pod["logTail"] and "kubectl logs" in output, pod
        assert result["artifacts"]["adapterUri"] == "s3://artifacts/demo/run-1/adapter/"
        # issue 17: the GGUF q8_0 export and the loss curve, downloaded and used by the demo
        assert [(e["format"], e["quantization"]) for e in result["artifacts"]["exports"]] == [("gguf", "q8_0")]
        assert result["artifacts"]["exports"][0]["uri"] == "s3://artifacts/demo/run-1/export/gguf-q8_0/"
        assert Path(result["gguf"]).stat().st_size > 50 * 2**20 and result["ggufAnswer"], result
        assert Path(result["lossPlot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "llama-cli -m" in output and "loss curve:" in output
    finally:
        down = subprocess.run([sys.executable, "-m", "localcluster", "down", "--dir", str(state)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"cluster-down left processes behind: {down.stdout}{down.stderr}"
