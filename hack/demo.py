"""``make demo``: the main job, end to end, on the local cluster.

Steps (each named; a failure stops the demo and names its step):

1. build the operator and trainer images from ``Dockerfile.operator`` and
   ``Dockerfile.trainer`` with podman (``localimages.build_images()``; a warm run builds nothing);
2. start the local cluster (control plane, MinIO and one real node: containerd, runc, CNI,
   kubelet, kube-proxy, with a fake ``nvidia.com/gpu`` capacity), or reuse the one already
   up in ``.local-cluster/``, and import both images into the node's containerd (skipped
   when there);
3. build the embedded SmolLM2-135M-Instruct model and the chatterbot-corpus chat
   data (cached), upload both to the local S3 server;
4. install the Helm chart (CRD, RBAC, operator Deployment from the operator image, the
   trainer image as the default of every job) into ``qlora-system``;
5. create the namespace ``qlora-demo`` (Pod Security ``restricted``) and the S3
   credentials Secret;
6. ``kubectl apply -f examples/demo.yaml`` (endpoint filled in), then show the job's
   status live, as ``kubectl get qj -w`` would;
7. show the trainer pod's image, its uid / read-only root, the container in containerd
   (``ctr``) and the end of ``kubectl logs`` through the real kubelet;
8. print the artifact URIs, the eval loss before and after training (from the
   adapter's manifest) and one held-out prompt answered by the base model and by
   base + adapter;
9. download ``loss.png`` (train/eval loss and learning rate by step) and the GGUF q8_0
   export (``spec.output.export``), answer the prompt with the GGUF through
   transformers' GGUF loader, and print where they are and how to open/load them.

The GGUF export runs llama.cpp's ``convert_hf_to_gguf.py``, which the trainer image carries
in ``/opt/llama.cpp``.

The real node's CPU is the machine's: the trainer pod asks for ``QLORA_DEMO_CPU`` (default
``1500m``, which fits a 2-core machine beside the operator's replicas) instead of
``examples/demo.yaml``'s ``cpu: "2"``.

The cluster is left running so that the job can be inspected; ``make cluster-down``
stops it. Environment: ``QLORA_DEMO_MAX_STEPS`` overrides ``training.maxSteps``
(the CI test uses fewer steps), ``QLORA_DEMO_TIMEOUT`` bounds the wait in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "qlora-demo"
OPERATOR_NAMESPACE = "qlora-system"
RELEASE = "qlora-operator"
JOB = "demo"
MODEL_URI = "s3://models/smollm2-135m-instruct/"
DATA_PREFIX = "s3://datasets/chatterbot/"
OUTPUT_URI = "s3://artifacts/demo/"


class DemoError(RuntimeError):
    """A demo step failed; the message says what was expected."""


_step_no = 0


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Print a numbered step header; on any error, name the step and exit 1."""
    global _step_no
    _step_no += 1
    t0 = time.monotonic()
    print(f"\n==> [{_step_no}] {title}", flush=True)
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the demo's top level: report and stop
        print(f"\nDEMO FAILED at step {_step_no} ({title}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        print("The cluster is still up for inspection; `make cluster-down` stops it.", file=sys.stderr)
        sys.exit(1)
    print(f"    done in {time.monotonic() - t0:.1f}s", flush=True)


def run(argv: list[str], *, input: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; raise :class:`DemoError` with its stderr when it fails."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise DemoError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def s3_env(state_dir: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` pairs of ``<state_dir>/s3.env``."""
    out = {}
    for line in (state_dir / "s3.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return out


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for the local MinIO (path-style)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}),
    )


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def upload_dir(s3, local: Path, uri: str) -> int:
    """Upload every file under ``local`` to the ``uri`` prefix; returns the file count."""
    bucket, prefix = split_uri(uri)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    n = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, prefix + path.relative_to(local).as_posix())
            n += 1
    return n


def demo_manifest(endpoint: str, max_steps: int | None, cpu: str | None = None) -> str:
    """``examples/demo.yaml`` with the local S3 endpoint (and optional step count and CPU
    request) filled in."""
    doc = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    doc["spec"]["storage"]["endpoint"] = endpoint
    if cpu is not None:
        doc["spec"]["resources"]["cpu"] = cpu
    if max_steps is not None:
        training = doc["spec"]["training"]
        training["maxSteps"] = max_steps
        for key in ("checkpointEverySteps", "evalEverySteps"):
            training[key] = min(training.get(key, max_steps), max(1, max_steps // 2))
    return yaml.safe_dump(doc, sort_keys=False)


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    """The condition of type ``ctype`` in ``obj['status']``, if any."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return cond
    return None


def watch_job(kubectl: list[str], timeout_s: float) -> dict[str, Any]:
    """Stream ``kubectl get qj -w`` while polling until Complete or Failed; returns the final object."""
    watcher = subprocess.Popen([*kubectl, "get", "qj", JOB, "-n", NAMESPACE, "-w"], text=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            obj = json.loads(run([*kubectl, "get", "qj", JOB, "-n", NAMESPACE, "-o", "json"]))
            for ctype in ("Complete", "Failed"):
                cond = condition(obj, ctype)
                if cond and cond.get("status") == "True":
                    time.sleep(1.5)  # let the watcher print the final line (display only)
                    return obj
            if time.monotonic() > deadline:
                raise DemoError(f"QLoRAJob {JOB} not finished after {timeout_s:.0f}s: status {json.dumps(obj.get('status'))[:2000]}")
            time.sleep(2)
    finally:
        watcher.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watcher.wait(timeout=5)


def answer(model_dir: Path, adapter_dir: Path | None, messages: list[dict[str, str]], max_new_tokens: int = 40) -> str:
    """Greedy answer of the base model (or base + LoRA adapter) to a chat prompt, on CPU in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer_gguf(directory: Path, gguf_file: str, messages: list[dict[str, str]], max_new_tokens: int = 40) -> str:
    """Greedy answer of a GGUF export (transformers' GGUF loader, dequantised to fp32) to a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def show_trainer_pod(kubectl: list[str], state: Path) -> dict[str, Any]:
    """Print (and return) what shows the trainer ran from its image under the real kubelet:
    the pod's image and security context, its container in containerd (``ctr``) and the end
    of ``kubectl logs``.

    Raises:
        DemoError: no trainer pod, or it did not run as uid 1000 with a read-only root.
    """
    sys.path.insert(0, str(REPO / "hack"))
    from localcluster import nodeimages, realnode

    pods = json.loads(run([*kubectl, "get", "pods", "-n", NAMESPACE, "-l", f"job-name={JOB}-train", "-o", "json"]))
    if not pods["items"]:
        raise DemoError(f"no pod of Job {JOB}-train in {NAMESPACE}")
    name = pods["items"][-1]["metadata"]["name"]
    get = [*kubectl, "get", "pod", name, "-n", NAMESPACE, "-o"]
    image = run([*get, "jsonpath={.spec.containers[0].image}"])
    security = json.loads(run([*get, "jsonpath={.spec.containers[0].securityContext}"]) or "{}")
    pod_security = json.loads(run([*get, "jsonpath={.spec.securityContext}"]) or "{}")
    phase = run([*get, "jsonpath={.status.phase}"])
    container_id = run([*get, "jsonpath={.status.containerStatuses[0].containerID}"])
    uid = security.get("runAsUser", pod_security.get("runAsUser"))
    print(f"    $ kubectl get pod {name} -o jsonpath='{{.spec.containers[0].image}}'\n    {image}")
    print(f"    phase {phase}; containerID {container_id}")
    print(f"    runAsUser {uid}, runAsNonRoot {security.get('runAsNonRoot', pod_security.get('runAsNonRoot'))}, "
          f"readOnlyRootFilesystem {security.get('readOnlyRootFilesystem')}")
    ctr = run(nodeimages.ctr_argv(realnode.containerd_socket(state), "containers", "ls"))
    rows = [line for line in ctr.splitlines() if line.startswith("CONTAINER") or container_id.split("//")[-1] in line]
    print("    $ ctr -n k8s.io containers ls   (the trainer's container)")
    for line in rows:
        print("    " + line)
    logs = run([*kubectl, "logs", "-n", NAMESPACE, name, "--tail", "8"])
    print(f"    $ kubectl logs {name} --tail 8   (through the real kubelet)")
    for line in logs.splitlines():
        print("    | " + line[:200])
    if uid != 1000 or security.get("readOnlyRootFilesystem") is not True:
        raise DemoError(f"the trainer pod did not run as uid 1000 with a read-only root: {security} {pod_security}")
    if not logs.strip():
        raise DemoError(f"kubectl logs {name} returned nothing")
    return {"pod": name, "image": image, "runAsUser": uid, "readOnlyRootFilesystem": True,
            "containerId": container_id, "logTail": logs.splitlines()[-8:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the QLoRA demo job on the local cluster.")
    parser.add_argument("--state-dir", default=str(REPO / ".local-cluster"))
    parser.add_argument("--max-steps", type=int, default=int(os.environ.get("QLORA_DEMO_MAX_STEPS", "0")) or None)
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("QLORA_DEMO_TIMEOUT", "1800")))
    args = parser.parse_args(argv)
    state = Path(args.state_dir)
    sys.path.insert(0, str(REPO / "hack"))

    with step("Build the operator and trainer images (Dockerfile.operator, Dockerfile.trainer) with podman"):
        import localimages

        images = localimages.build_images(log=lambda m: print(f"    {m}", flush=True))
        for name, ref in images.items():
            print(f"    {name}: {ref}")

    with step("Start the local cluster (etcd, kube-apiserver, controller-manager, scheduler, MinIO, a real "
              "node: containerd, kubelet, kube-proxy, CoreDNS) and import the images"):
        run([sys.executable, "-m", "localcluster", "up", "--dir", str(state), "--node", "real"])
        kubectl = [str(state / "bin" / "kubectl"), "--kubeconfig", str(state / "kubeconfig")]
        helm = [str(state / "bin" / "helm"), "--kubeconfig", str(state / "kubeconfig")]
        for ref in images.values():
            t0 = time.monotonic()
            out = run([sys.executable, "-m", "localcluster", "import-image", "--dir", str(state), ref])
            print(f"    {out.strip()} (containerd; {time.monotonic() - t0:.1f}s)")
        print(run([*kubectl, "get", "nodes", "-o", "wide"]), end="")
        env = s3_env(state)

    with step("Build the embedded SmolLM2-135M-Instruct model and the chatterbot-corpus chat data; upload to S3"):
        import embedded

        model_dir = embedded.ensure_model()
        work = state / "demo"  # the demo's own files, next to the cluster's (no /tmp leftovers)
        shutil.rmtree(work, ignore_errors=True)
        data_dir = work / "data"
        data_dir.mkdir(parents=True)
        counts = embedded.build_corpus(data_dir)
        s3 = s3_client(env)
        n = upload_dir(s3, model_dir, MODEL_URI)
        upload_dir(s3, data_dir, DATA_PREFIX)
        bucket, _ = split_uri(OUTPUT_URI)
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        print(f"    model: {n} files -> {MODEL_URI}")
        print(f"    data: {json.dumps(counts)} -> {DATA_PREFIX}{{train,eval}}.jsonl")

    with step("Install the Helm chart (CRD, RBAC, operator) into namespace " + OPERATOR_NAMESPACE):
        # `helm upgrade` never updates a chart's CRDs: apply them first, so a rerun after
        # an API change gets the new schema.
        run([*kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds")])
        chart = ["upgrade", "--install", RELEASE, str(REPO / "helm" / "qlora-operator"),
                 "--namespace", OPERATOR_NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m"]
        # the operator from its image; the trainer image as every job's default
        for key, ref in (("image", images["operator"]), ("trainer.image", images["trainer"])):
            repository, tag = ref.rsplit(":", 1)
            chart += ["--set", f"{key}.repository={repository}", "--set", f"{key}.tag={tag}",
                      "--set", f"{key}.pullPolicy=Never"]
        run([*helm, *chart])
        print(run([*kubectl, "get", "deploy,pods", "-n", OPERATOR_NAMESPACE]), end="")

    with step(f"Create namespace {NAMESPACE} (Pod Security: restricted) and the S3 credentials Secret"):
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted"}}}
        run([*kubectl, "apply", "-f", "-"], input=json.dumps(ns))
        secret = run([*kubectl, "create", "secret", "generic", "s3-credentials", "-n", NAMESPACE,
                      f"--from-literal=AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}",
                      f"--from-literal=AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}",
                      "--dry-run=client", "-o", "yaml"])
        run([*kubectl, "apply", "-f", "-"], input=secret)
        # A rerun of the demo starts a fresh job.
        run([*kubectl, "delete", "qj", JOB, "-n", NAMESPACE, "--ignore-not-found", "--wait=true"])

    with step("kubectl apply -f examples/demo.yaml, then watch it (kubectl get qj -w)"):
        manifest = demo_manifest(env["AWS_ENDPOINT_URL"], args.max_steps,
                                 os.environ.get("QLORA_DEMO_CPU", "1500m"))
        print(run([*kubectl, "apply", "-n", NAMESPACE, "-f", "-"], input=manifest), end="")
        obj = watch_job(kubectl, args.timeout)
        failed = condition(obj, "Failed")
        if failed and failed.get("status") == "True":
            raise DemoError(f"the job failed: {failed.get('reason')}: {failed.get('message')}")

    with step("The trainer pod on the real node: image, uid and read-only root, containerd, kubectl logs"):
        pod_info = show_trainer_pod(kubectl, state.absolute())

    with step("Results: artifacts, eval loss, and a held-out prompt answered by base and base + adapter"):
        status = obj["status"]
        artifacts = status.get("artifacts") or {}
        for key, value in artifacts.items():
            print(f"    {key}: {value}")
        bucket, key = split_uri(artifacts["manifestUri"])
        manifest_doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        metrics = manifest_doc.get("metrics", {})
        before, after = metrics.get("evalLossBefore"), metrics.get("evalLossAfter")
        print(f"    eval loss before training: {before}")
        print(f"    eval loss after training:  {after}")
        adapter_local = work / "adapter"
        adapter_local.mkdir(parents=True)
        a_bucket, a_prefix = split_uri(artifacts["adapterUri"])
        for item in s3.list_objects_v2(Bucket=a_bucket, Prefix=a_prefix).get("Contents", []):
            rel = item["Key"][len(a_prefix):]
            if rel and "/" not in rel:
                s3.download_file(a_bucket, item["Key"], str(adapter_local / rel))
        first = json.loads((data_dir / "eval.jsonl").read_text().splitlines()[0])
        prompt = [m for m in first["messages"] if m["role"] != "assistant"][:1]
        base_answer = answer(model_dir, None, prompt)
        tuned_answer = answer(model_dir, adapter_local, prompt)
        print(f"    held-out prompt:    {prompt[0]['content']!r}")
        print(f"    reference answer:   {first['messages'][1]['content']!r}")
        print(f"    base model:         {base_answer!r}")
        print(f"    base + adapter:     {tuned_answer!r}")
        summary = {"evalLossBefore": before, "evalLossAfter": after, "baseAnswer": base_answer,
                   "adapterAnswer": tuned_answer, "artifacts": artifacts, "node": "real",
                   "images": images, "trainerPod": pod_info}
        (state / "demo-result.json").write_text(json.dumps(summary, indent=2))
        if before is None or after is None or not after < before:
            raise DemoError(f"eval loss did not go down: before {before}, after {after}")
        if base_answer == tuned_answer:
            raise DemoError("the adapter's answer equals the base model's")

    with step("Loss curve and the GGUF q8_0 export: download, load with transformers, and how to open them"):
        plot_uri = artifacts.get("lossPlotUri")
        if plot_uri:
            p_bucket, p_key = split_uri(plot_uri)
            png = work / "loss.png"
            s3.download_file(p_bucket, p_key, str(png))
            print(f"    loss curve:  {plot_uri}")
            print(f"                 downloaded to {png} (open it with: xdg-open {png}, or any image viewer)")
        gguf = next((e for e in artifacts.get("exports") or [] if e.get("format") == "gguf"), None)
        if gguf is None:
            raise DemoError("status.artifacts.exports lists no gguf export")
        g_bucket, g_key = split_uri(gguf["file"])
        gguf_dir = work / "gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        gguf_file = gguf_dir / g_key.rsplit("/", 1)[-1]
        s3.download_file(g_bucket, g_key, str(gguf_file))
        gguf_answer = answer_gguf(gguf_dir, gguf_file.name, prompt)
        print(f"    GGUF ({gguf['quantization']}): {gguf['file']}")
        print(f"                 downloaded to {gguf_file} ({gguf_file.stat().st_size / 2**20:.0f} MiB)")
        print(f"    GGUF answer:        {gguf_answer!r}")
        print("                        (" + ("the same as base + adapter" if gguf_answer == tuned_answer else
              "differs from base + adapter: the merge is onto the NF4-dequantised base, q8_0 rounds it") + ")")
        print("    load it with llama.cpp:  llama-cli -m " + str(gguf_file) + " -cnv")
        print("                 or serve:  llama-server -m " + str(gguf_file))
        print("    or with transformers:    AutoModelForCausalLM.from_pretrained("
              f"{str(gguf_dir)!r}, gguf_file={gguf_file.name!r})")
        summary.update(lossPlot=str(work / "loss.png") if plot_uri else None, gguf=str(gguf_file), ggufAnswer=gguf_answer)
        (state / "demo-result.json").write_text(json.dumps(summary, indent=2))

    print("\nDemo finished. Inspect with:")
    print(f"  {state / 'bin' / 'kubectl'} --kubeconfig {state / 'kubeconfig'} get qj -n {NAMESPACE} -o yaml")
    print("Stop the local cluster with: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
