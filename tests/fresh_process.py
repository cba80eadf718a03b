"""Run a script in a fresh Python process where protoquant_hf cannot be imported: what a Hub user without the
package gets from ``trust_remote_code=True``."""

import subprocess
import sys
import textwrap

_HIDE_PACKAGE = """
import sys, importlib.abc
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "protoquant_hf":
            raise ImportError("protoquant_hf is hidden in this test")
sys.meta_path.insert(0, _Hide())
"""


def run_without_package(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `script` (dedented) offline, with a fresh Hugging Face cache and the package hidden."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", _HIDE_PACKAGE + textwrap.dedent(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
