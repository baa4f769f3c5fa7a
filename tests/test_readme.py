"""The README's Python example runs as written (only its data line filled in, the attack budget
cut, and the overrides that point it at the tiny test nets: their artifacts path and smaller score net)."""

from __future__ import annotations

import re

import torch

from advpure.data.readers import read_idx
from conftest import FMNIST_DIR, ROOT, needs_fmnist


def _example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use the pieces without Lightning", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@needs_fmnist
def test_the_readme_python_example_runs_as_written(tiny_artifacts):
    code = _example()
    assert "x, y = ..." in code and 'load_defense("fmnist", ["defense.sigma=0.25"])' in code
    assert "iters=40, eot=15" in code
    code = code.replace("x, y = ...", "x, y = X, Y").replace("iters=40, eot=15", "iters=3, eot=2")  # time
    code = code.replace(
        '["defense.sigma=0.25"]', f'["defense.sigma=0.25", "paths.artifacts={tiny_artifacts}", "score.ngf=8"]'
    )
    x = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")[:4].float().unsqueeze(1) / 255
    y = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:4].long()
    scope = {"X": x, "Y": y}
    exec(compile(code, "README.md", "exec"), scope)
    probs, adv, correct = scope["probs"], scope["adv"], scope["correct"]
    assert probs.shape == (4, 10) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.15 + 1e-6 and 0 <= adv.min() <= adv.max() <= 1
    assert set(correct) == {"softmax", "logits", "vote"} and correct["softmax"].shape == (10, 4)
