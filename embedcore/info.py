"""`python -m embedcore.info`: versions, the backends available and, for each missing one, why."""
import platform

import torch

from embedcore.backends import backend_status


def report() -> str:
    lines = [f"embedcore {_version()}", f"python {platform.python_version()} ({platform.machine()})",
             f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})"]
    for pkg in ("triton", "transformers", "safetensors", "peft", "sentence_transformers"):
        try:
            mod = __import__(pkg)
            lines.append(f"{pkg} {getattr(mod, '__version__', '?')}")
        except ImportError:
            lines.append(f"{pkg} not installed")
    lines.append("backends:")
    for name, (ok, why) in backend_status().items():
        lines.append(f"  {name:7s} {'available' if ok else 'missing: ' + why}")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("embedcore")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    print(report())
