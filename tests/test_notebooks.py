"""Notebook hygiene: one notebook per figure, stored clean, with the project's parameter cell.
(nbval executes every notebook at smoke scale: `pytest notebooks --nbval-lax`.)"""
import ast
import json
import re

import pytest

from numgan import paths
from numgan.figures import notebooks

NOTEBOOKS = sorted((paths.ROOT / "notebooks").glob("*.ipynb"))
REQUIRED = {"scale", "device", "seed", "out_dir", "force"}


def test_one_notebook_per_figure():
    assert sorted(notebooks()) == list(range(1, 15))
    assert len(NOTEBOOKS) == 14


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parametrised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None, "stored with outputs"
    assert "widgets" not in nb.get("metadata", {})
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(params[0]["source"]))
    names = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant), \
            "the parameters cell holds literals only"
        names[node.targets[0].id] = node.value.value
    assert REQUIRED <= set(names)
    assert names["scale"] == "smoke" and names["out_dir"] == "" and names["force"] is False
    first = "".join(nb["cells"][0]["source"])
    fig = int(re.match(r"fig(\d+)_", path.name).group(1))
    assert nb["cells"][0]["cell_type"] == "markdown" and f"Figure {fig}" in first
    following = "".join(code[code.index(params[0]) + 1]["source"])
    assert "SCALES" in following, "the cell after the parameters derives settings from one SCALES table"
    assert "assert" in "".join(code[-1]["source"]), "the last cell asserts the result"


def test_figures_cli_rejects_unknown_figures_and_scales(capsys):
    from numgan.figures import main

    for argv, message in ((["--figures", "99"], "no notebook for figure(s) [99]"),
                          (["--scale", "huge"], "invalid choice: 'huge'"),
                          (["--figures", "two"], "takes numbers or 'all'")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
