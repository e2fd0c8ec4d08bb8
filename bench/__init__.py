from pathlib import Path

import orjson


def save(path: Path, result: dict) -> None:
    """Write a replay's result as indented JSON and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2)
    path.write_bytes(data)
    print(data.decode())
