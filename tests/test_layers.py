"""The layering the design promises: a stage never imports another stage; what two stages share lives below them."""

import ast
from pathlib import Path

import stillhouse

STAGES = ("generate", "curate", "train", "evaluate", "audit", "report")


def test_no_stage_imports_another():
    root = Path(stillhouse.__file__).parent
    found = []
    for stage in STAGES:
        for path in sorted((root / stage).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "stillhouse" and len(parts) > 1 and parts[1] in STAGES and parts[1] != stage:
                        found.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    assert found == []
