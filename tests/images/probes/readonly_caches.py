"""Inside the trainer image as the pod user: the root is read-only, the emptyDirs and every cache are writable.

Prints one JSON object: ``writes`` (path -> ``"ok"`` or the errno name of the failed
write), ``caches`` (library -> the directory it resolves and writes to; each is created
and written, or the errno name), ``tempdir`` and ``home``.
"""

import errno
import json
import os
import tempfile
from pathlib import Path


def try_write(path: Path) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("probe")
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


writes = {p: try_write(Path(p)) for p in ("/probe", "/opt/venv/probe", "/opt/venv/bin/probe", "/etc/probe",
                                          "/usr/local/lib/probe", "/tmp/probe", "/cache/probe")}

import datasets.config  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import torch.hub  # noqa: E402
import torch.utils.cpp_extension  # noqa: E402
import triton.knobs  # noqa: E402
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir  # noqa: E402

locations = {
    "huggingface_hub": huggingface_hub.constants.HF_HUB_CACHE,
    "datasets": str(datasets.config.HF_DATASETS_CACHE),
    "torch.hub": torch.hub.get_dir(),
    "torch_extensions": torch.utils.cpp_extension.get_default_build_root(),
    "triton": triton.knobs.cache.dir,
    "triton_dump": triton.knobs.cache.dump_dir,
    "triton_home": os.path.join(triton.knobs.cache.home_dir, ".triton"),
    "inductor": inductor_cache_dir(),
    "cuda_kernels": os.environ.get("CUDA_CACHE_PATH", os.path.expanduser("~/.nv/ComputeCache")),
}
try:
    import matplotlib

    locations["matplotlib_config"] = matplotlib.get_configdir()
    locations["matplotlib_cache"] = matplotlib.get_cachedir()
except ImportError:
    pass
caches = {name: {"dir": str(d), "write": try_write(Path(d) / "probe")} for name, d in locations.items()}
print(json.dumps({"writes": writes, "caches": caches, "tempdir": tempfile.gettempdir(),
                  "home": os.path.expanduser("~"), "uid": os.getuid(), "gid": os.getgid()}))
