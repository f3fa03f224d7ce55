"""The generated kernel sources in csrc/selective_scan_reset/ still are what their generator (make_fork.py) makes from
mamba-ssm 2.3.2.post1: regenerated into a temp dir from the extract of the sdist kept beside them, compared byte for
byte. Edit make_fork.py and rerun it, never the generated files."""
from __future__ import annotations

import filecmp
import hashlib
import importlib.util
import os
import tarfile

import pytest

from conftest import REPO

FORK = os.path.join(REPO, "csrc", "selective_scan_reset")


def _make_fork():
    spec = importlib.util.spec_from_file_location("make_fork", os.path.join(FORK, "make_fork.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_match_their_generator(tmp_path):
    make_fork = _make_fork()
    written = make_fork.main(str(make_fork.UPSTREAM), str(tmp_path))
    assert len(written) == 13
    _, mismatch, errors = filecmp.cmpfiles(FORK, tmp_path, written, shallow=False)
    assert not mismatch and not errors, (f"csrc/selective_scan_reset/{mismatch + errors} differ from what make_fork.py "
                                         "generates: change make_fork.py and rerun it instead of editing them")


def test_the_kept_extract_is_the_sdists(tmp_path):
    """Where mamba-ssm's sdist is at hand (JAMBATRAIN_MAMBA_SSM_SDIST, or the device wheelhouse of this project's
    machines), the extract kept in the repo holds its files byte for byte."""
    sdist = os.environ.get("JAMBATRAIN_MAMBA_SSM_SDIST") or \
        "/work/shared/device-wheelhouse/sdists/mamba_ssm-2.3.2.post1.tar.gz"
    if not os.path.isfile(sdist):
        pytest.skip(f"mamba-ssm 2.3.2.post1 sdist not at {sdist} (set JAMBATRAIN_MAMBA_SSM_SDIST to check the extract)")
    make_fork = _make_fork()

    def digests(path):
        with tarfile.open(path) as tar:
            return {m.name.split("/", 1)[-1]: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                    for m in tar.getmembers() if m.isfile() and m.name.split("/", 1)[-1] in make_fork.NEEDED}

    kept = digests(str(make_fork.UPSTREAM))
    assert sorted(kept) == sorted(make_fork.NEEDED)
    assert kept == {k: v for k, v in digests(sdist).items() if k in kept}
