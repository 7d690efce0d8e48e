"""Make the registry's CUDA-built torchvision wheel importable on CPU-only torch.

Why: the only torchvision 0.28 wheel on the registry is a CUDA build. On CPU torch its C++ ops
library cannot load, yet ``torchvision/_meta_registrations.py`` still calls
``torch.library.register_fake("torchvision::nms")`` at import time, which raises
``RuntimeError: operator torchvision::nms does not exist`` and makes ``import torchvision`` (and so
the Qwen2.5-VL processor, whose video processor needs torchvision) fail. We guard those calls with
``torchvision.extension._has_ops()``, exactly as the same file already guards ``register_meta``.
The pure-Python parts the image and video processors use (transforms v2) then work.

Only applied when needed: it does nothing when ``import torchvision`` already works (GPU machines,
CUDA torch) and it is idempotent. Run by ``make env``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# safemt-moderator: register_fake guarded for CPU torch"
GUARD = f"""
{MARKER}
def _register_fake_if_ops(op_name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(op_name)
    return lambda fn: fn

"""


def torchvision_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return probe.returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed: nothing to patch")
        return 0
    if torchvision_imports():
        print("torchvision imports cleanly: no patch needed")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER not in text:
        anchor = "import torchvision.extension  # noqa: F401\n"
        if anchor not in text:
            print(f"error: {path} has an unexpected layout; cannot patch", file=sys.stderr)
            return 1
        text = text.replace(anchor, anchor + GUARD, 1)
        text = text.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
        path.write_text(text)
    if not torchvision_imports():
        print(f"error: torchvision still fails to import after patching {path}", file=sys.stderr)
        return 1
    print(f"patched {path}: torchvision imports on CPU torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
