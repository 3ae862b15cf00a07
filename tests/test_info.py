"""embedcore.info: installed versions next to the lock file's, and a warning on a difference."""
from embedcore import info


def test_the_suite_runs_in_the_locked_environment():
    # make installs with the lock as constraints; a difference here means an install step ignored it
    locked = info.read_lock()
    assert locked is not None and "torch" in locked and "transformers" in locked and "kernels" in locked
    assert "embedcore" not in locked
    assert info.lock_mismatches(locked, info.installed_versions()) == []
    assert "WARNING" not in info.report()


def test_a_version_that_differs_from_the_lock_is_warned(tmp_path):
    lock = tmp_path / "requirements-lock.txt"
    lock.write_text("# comment\ntorch==0.0.1\nnot-a-package-embedcore-test==1.0\n")
    installed = info.installed_versions()
    assert info.lock_mismatches(info.read_lock(str(lock)), installed) == [
        "not-a-package-embedcore-test not installed, locked 1.0", f"torch {installed['torch']}, locked 0.0.1"]
    text = info.report(str(lock))
    assert "WARNING: 2 installed version(s) differ" in text and "<-- differs" in text


def test_local_version_labels_are_ignored():
    assert info.lock_mismatches({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"}) == []
    assert info.read_lock("/nonexistent/requirements-lock.txt") is None


def test_every_public_op_is_listed_with_the_backends_that_run_here():
    import embedcore

    text = info.report()
    ops = text[text.index("ops (backends"):].splitlines()[1:]
    listed = {line.split()[0]: line.split(None, 1)[1] for line in ops}
    assert set(listed) == set(info.OPS) and all(callable(getattr(embedcore, op)) for op in listed)
    assert "maxsim_contrastive_loss" in listed
    assert all(v.startswith("torch, cpp") for v in listed.values())  # make builds the extension


def test_import_embedcore_stays_cheap_for_other_trainers():
    """A drop-in kernel package: importing it must not import triton (nor the trainer)."""
    import subprocess
    import sys

    code = "import sys, embedcore; print(sorted(m for m in ('triton', 'embedcore.train', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
