"""What the `rae sample` and `rae eval` commands print: one JSON object (optionally written to a file too)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_json(result: dict[str, Any], path: str | None = None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
