"""ARC voting evaluator: exact pass@k on hand-made predictions, denominators, inversion, dedupe, merge, files."""

from __future__ import annotations

import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch

from trm_lightning.data.arc import ArcTask
from trm_lightning.data.augment import Augmentation, augmentation_for
from trm_lightning.data.tokenize import crop_canvas, grid_to_canvas
from trm_lightning.vocab import PAD
from trm_lightning.evaluation import (
    ARCVoteEvaluator,
    PassAtK,
    evaluation_augmentations,
    validate_submission,
)

S = 6  # canvas side
SEED = 7


def g(rows) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


def make_task(task_id: str, outputs, inputs=None) -> ArcTask:
    outputs = [None if o is None else g(o) for o in outputs]
    inputs = inputs or [g([[1, 2], [3, 4]]) for _ in outputs]
    demo = (g([[1, 0], [0, 1]]), g([[0, 1], [1, 0]]))
    return ArcTask(task_id=task_id, train=(demo,), test=tuple(zip(inputs, outputs)), source="hand-made")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class Rows:
    """Builds add_batch arguments: each vote is (task, query, aug, grid in the original frame, sigmoid q)."""

    def __init__(self, tasks, seed=SEED):
        self.tasks, self.seed = tasks, seed
        self.rows: list[tuple[int, int, int, np.ndarray, float]] = []

    def vote(self, t, q, a, grid, p=0.5):
        self.rows.append((t, q, a, g(grid), p))
        return self

    def batch(self, rows=None):
        rows = self.rows if rows is None else rows
        preds = []
        for t, _, a, grid, _ in rows:
            aug = augmentation_for(self.seed, self.tasks[t].task_id, a)
            preds.append(grid_to_canvas(aug.apply(grid), S))
        return (
            np.array([r[0] for r in rows]),
            np.array([r[1] for r in rows]),
            np.array([r[2] for r in rows]),
            np.stack(preds),
            np.array([logit(r[4]) for r in rows]),
        )


# ------------------------------------------------------------------------------- the 3-task case
A0 = [[1, 2, 3], [4, 5, 6]]  # task_a, test input 0
A1 = [[7, 7], [0, 8], [9, 1]]  # task_a, test input 1
B0 = [[2, 0, 2]]
C0 = [[5, 5], [5, 6]]
WRONG1 = [[1, 1, 1], [1, 1, 1]]
WRONG2 = [[3]]
WRONG3 = [[2, 2], [2, 2]]


def three_tasks():
    return [make_task("task_a", [A0, A1]), make_task("task_b", [B0]), make_task("task_c", [C0])]


def three_task_rows(tasks, b_correct_q=0.9, b_wrong_q=0.6):
    r = Rows(tasks)
    # task_a input 0: the true output wins the vote 3 to 1 -> solved at k=1
    for a in range(3):
        r.vote(0, 0, a, A0, 0.2)
    r.vote(0, 0, 3, WRONG1, 0.99)
    # task_a input 1: a wrong grid wins 3 to 2 -> solved at k=2 only (q does not beat counts)
    for a in range(3):
        r.vote(0, 1, a, WRONG1, 0.1)
    for a in range(3, 5):
        r.vote(0, 1, a, A1, 0.95)
    # task_b: 2 votes each, the tie broken by mean sigmoid(q); a third grid with 1 vote and high q
    r.vote(1, 0, 0, B0, b_correct_q).vote(1, 0, 1, B0, b_correct_q)
    r.vote(1, 0, 2, WRONG2, b_wrong_q).vote(1, 0, 3, WRONG2, b_wrong_q)
    r.vote(1, 0, 4, WRONG3, 0.999)
    # task_c: never solved
    r.vote(2, 0, 0, WRONG3, 0.9).vote(2, 0, 1, WRONG2, 0.8).vote(2, 0, 2, WRONG3, 0.7)
    return r


def test_three_tasks_exact_pass_at_k():
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED)
    rows = three_task_rows(tasks)
    ev.add_batch(*rows.batch(rows.rows[:7]))  # two batches, split mid-task
    ev.add_batch(*rows.batch(rows.rows[7:]))
    res = ev.results()
    assert sorted(res) == [1, 2, 5, 10]
    assert (res[1].solved, res[1].tasks) == (1.5, 3)
    assert (res[2].solved, res[2].tasks) == (2.0, 3)
    assert (res[10].solved, res[10].tasks) == (2.0, 3)
    assert res[1].percent == pytest.approx(50.0)
    assert str(res[1]) == "ARC/pass@1 = 1.5/3 tasks (50.00%), 95% CI [12.5%, 87.5%]"
    assert str(res[2]) == "ARC/pass@2 = 2/3 tasks (66.67%), 95% CI [20.8%, 93.9%]"

    # the ranking itself: counts, mean q, order
    ranked = ev.ranked(0, 1)
    assert [c for _, c, _ in ranked] == [3, 2]
    np.testing.assert_array_equal(ranked[0][0], g(WRONG1))
    np.testing.assert_array_equal(ranked[1][0], g(A1))
    assert ranked[1][2] == pytest.approx(0.95)
    tie = ev.ranked(1, 0)
    assert [(c, round(q, 6)) for _, c, q in tie] == [(2, 0.9), (2, 0.6), (1, 0.999)]
    np.testing.assert_array_equal(tie[0][0], g(B0))
    assert ev.ranked(2, 0)[0][1] == 2 and len(ev.ranked(2, 0)) == 2

    details = {d["task_id"]: d for d in ev.details()}
    assert details["task_a"]["score"] == {"1": 0.5, "2": 1.0, "5": 1.0, "10": 1.0}
    assert details["task_a"]["test_inputs"][1]["correct_rank"] == 2
    assert details["task_a"]["test_inputs"][1]["solved"]["1"] is False
    assert details["task_c"]["test_inputs"][0]["correct_rank"] is None
    assert details["task_b"]["test_inputs"][0]["candidates"][0]["count"] == 2


def test_tie_flips_with_q():
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED, k_values=(1, 2))
    ev.add_batch(*three_task_rows(tasks, b_correct_q=0.6, b_wrong_q=0.9).batch())
    res = ev.results()
    assert (res[1].solved, res[2].solved) == (0.5, 2.0)  # task_b now only at k=2
    assert str(res[1]) == "ARC/pass@1 = 0.5/3 tasks (16.67%), 95% CI [1.8%, 69.0%]"


def test_torch_inputs_and_bf16_logits():
    tasks = three_tasks()
    ref = ARCVoteEvaluator(tasks, seed=SEED)
    ev = ARCVoteEvaluator(tasks, seed=SEED)
    batch = three_task_rows(tasks).batch()
    ref.add_batch(*batch)
    t, q, a, p, z = batch
    ev.add_batch(
        torch.from_numpy(t), torch.from_numpy(q), torch.from_numpy(a), torch.from_numpy(p).long(),
        torch.from_numpy(z).to(torch.bfloat16),
    )
    assert {k: (r.solved, r.tasks) for k, r in ev.results().items()} == {
        k: (r.solved, r.tasks) for k, r in ref.results().items()
    }


def test_subset_of_7_of_10_divides_by_7(tmp_path):
    outputs = [[[i % 10, 1], [2, 3]] for i in range(10)]
    tasks = [make_task(f"t{i:02d}", [outputs[i]]) for i in range(10)]
    ev = ARCVoteEvaluator(tasks, seed=SEED, k_values=(1, 2))
    r = Rows(tasks)
    for i in range(7):  # tasks 0..6 evaluated; 0..3 right, 4..6 wrong
        r.vote(i, 0, 0, outputs[i] if i < 4 else [[9]], 0.5)
        r.vote(i, 0, 1, outputs[i] if i < 4 else [[9]], 0.5)
    ev.add_batch(*r.batch())
    res = ev.results()
    assert (res[1].solved, res[1].tasks) == (4.0, 7)
    assert str(res[1]) == "ARC/pass@1 = 4/7 tasks (57.14%), 95% CI [25.0%, 84.2%]"
    assert ev.evaluated_task_indices == list(range(7))
    sub = ev.submission()
    assert sorted(sub) == [t.task_id for t in tasks]  # Kaggle wants every task, evaluated or not
    assert sub["t09"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}]
    assert sub["t00"] == [{"attempt_1": outputs[0], "attempt_2": outputs[0]}]
    validate_submission(sub, tasks)


def test_unvoted_test_input_counts_unsolved():
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED, k_values=(1,))
    ev.add_batch(*Rows(tasks).vote(0, 0, 0, A0).batch())  # task_a input 1 never predicted
    assert (ev.results()[1].solved, ev.results()[1].tasks) == (0.5, 1)


def _aug_indices_per_dihedral(task_id: str) -> dict[int, int]:
    found: dict[int, int] = {}
    a = 1
    while len(found) < 8:
        aug = augmentation_for(SEED, task_id, a)
        if aug.dihedral not in found and aug.colour_perm != tuple(range(10)):
            found[aug.dihedral] = a
        a += 1
    return found


@pytest.mark.parametrize("shape", [(2, 3), (6, 4), (1, 6), (6, 6)])
def test_crop_invert_round_trip_every_dihedral(shape):
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    original = rng.integers(0, 10, size=shape).astype(np.uint8)
    # direct: every dihedral x 3 random colour maps
    for t in range(8):
        for _ in range(3):
            aug = Augmentation(t, (0, *(int(c) for c in rng.permutation(9) + 1)))
            canvas = grid_to_canvas(aug.apply(original), S)
            np.testing.assert_array_equal(aug.invert(crop_canvas(canvas)), original)
    # through the evaluator: one augmentation index per dihedral, each with its own random colour map
    task = make_task("round_trip", [original.tolist()])
    per_dihedral = _aug_indices_per_dihedral(task.task_id)
    ev = ARCVoteEvaluator([task], seed=SEED, k_values=(1,))
    r = Rows([task])
    for a in [0, *per_dihedral.values()]:
        r.vote(0, 0, a, original, 0.5)
    ev.add_batch(*r.batch())
    ranked = ev.ranked(0, 0)
    assert len(ranked) == 1 and ranked[0][1] == 9
    np.testing.assert_array_equal(ranked[0][0], original)
    assert ev.results()[1].solved == 1.0


def test_duplicates_count_once():
    tasks = three_tasks()
    rows = three_task_rows(tasks)
    ref = ARCVoteEvaluator(tasks, seed=SEED)
    ref.add_batch(*rows.batch())
    ev = ARCVoteEvaluator(tasks, seed=SEED)
    ev.add_batch(*rows.batch())
    ev.add_batch(*rows.batch())  # the whole batch again
    ev.add_batch(*rows.batch(rows.rows[:3] + rows.rows[:3]))  # repeats inside one batch
    # a repeated (task, query, aug) with another prediction is still the same row: ignored
    ev.add_batch(*Rows(tasks).vote(0, 1, 0, A1, 0.99).batch())
    assert len(ev) == len(ref) == len(rows.rows)
    assert [c for _, c, _ in ev.ranked(0, 1)] == [3, 2]
    assert {k: r.solved for k, r in ev.results().items()} == {k: r.solved for k, r in ref.results().items()}


def _summary(ev):
    ranked = {
        (t, q): [(grid.tobytes(), grid.shape, c, mq) for grid, c, mq in ev.ranked(t, q)]
        for t in range(len(ev.tasks))
        for q in range(len(ev.tasks[t].test))
    }
    return ranked, {k: (r.solved, r.tasks) for k, r in ev.results().items()}, ev.submission()


def test_merge_of_two_half_states_equals_one_evaluator():
    tasks = three_tasks()
    rows = three_task_rows(tasks)
    # more rows with varied q so the means must match exactly
    rng = np.random.default_rng(0)
    for a in range(5, 25):
        rows.vote(2, 0, a, [WRONG3, C0, WRONG2][a % 3], float(rng.uniform(0.01, 0.99)))
    full = ARCVoteEvaluator(tasks, seed=SEED)
    full.add_batch(*rows.batch())
    rank0 = ARCVoteEvaluator(tasks, seed=SEED)
    rank1 = ARCVoteEvaluator(tasks, seed=SEED)
    rank0.add_batch(*rows.batch(rows.rows[0::2]))
    rank1.add_batch(*rows.batch(rows.rows[1::2] + rows.rows[:2]))  # DDP padding repeats rank 0's first rows
    states = [pickle.loads(pickle.dumps(s.state())) for s in (rank0, rank1)]
    merged = ARCVoteEvaluator(tasks, seed=SEED)
    merged.merge(states)
    rank0.merge(states)  # a rank merging the gathered states, its own included
    assert _summary(merged) == _summary(full) == _summary(rank0)
    merged.merge(states)  # idempotent
    assert _summary(merged) == _summary(full)
    assert merged.results()[1].solved == 1.5

    other_seed = ARCVoteEvaluator(tasks, seed=SEED + 1)
    with pytest.raises(ValueError, match="never pooled"):
        merged.merge([other_seed.state()])
    other_tasks = ARCVoteEvaluator(tasks[:2], seed=SEED)
    with pytest.raises(ValueError, match="never pooled"):
        merged.merge([other_tasks.state()])


def test_gather_is_a_noop_in_one_process():
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED)
    ev.add_batch(*three_task_rows(tasks).batch())
    before = _summary(ev)
    ev.gather(None)

    class OneDevice:
        world_size = 1

    ev.gather(OneDevice())
    assert _summary(ev) == before


def test_empty_crop_votes_but_never_enters_the_submission():
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED, k_values=(1, 2))
    blank = np.full((3, S * S), PAD, dtype=np.int64)
    ev.add_batch(np.array([2, 2, 2]), np.zeros(3, int), np.array([0, 1, 2]), blank, np.zeros(3))
    ev.add_batch(*Rows(tasks).vote(2, 0, 3, WRONG2).batch())
    ranked = ev.ranked(2, 0)
    assert ranked[0][0].shape == (0, 0) and ranked[0][1] == 3
    assert ev.submission()["task_c"] == [{"attempt_1": WRONG2, "attempt_2": WRONG2}]
    assert (ev.results()[1].solved, ev.results()[1].tasks) == (0.0, 1)


def test_bad_rows_raise():
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED)
    with pytest.raises(ValueError, match="task_index 3"):
        ev.add_batch(np.array([3]), np.array([0]), np.array([0]), np.zeros((1, S * S)), np.zeros(1))
    with pytest.raises(ValueError, match="query_index 1"):
        ev.add_batch(np.array([1]), np.array([1]), np.array([0]), np.zeros((1, S * S)), np.zeros(1))
    with pytest.raises(ValueError, match="same number of rows"):
        ev.add_batch(np.array([1, 1]), np.array([0]), np.array([0]), np.zeros((1, S * S)), np.zeros(1))


def test_write_and_validate_submission(tmp_path):
    tasks = three_tasks()
    ev = ARCVoteEvaluator(tasks, seed=SEED)
    ev.add_batch(*three_task_rows(tasks).batch())
    paths = ev.write(tmp_path / "run")
    assert set(paths) == {"submission", "details"}
    assert paths["submission"].name == "submission.json" and paths["details"].name == "eval_details.json"
    sub = json.loads(paths["submission"].read_text())
    validate_submission(sub, tasks)
    assert sub["task_a"] == [
        {"attempt_1": A0, "attempt_2": WRONG1},
        {"attempt_1": WRONG1, "attempt_2": A1},
    ]
    assert sub["task_b"] == [{"attempt_1": B0, "attempt_2": WRONG2}]
    details = json.loads(paths["details"].read_text())
    assert details["tasks_evaluated"] == 3 and details["rows"] == 17
    assert details["pass_at_k"]["2"]["summary"] == "ARC/pass@2 = 2/3 tasks (66.67%), 95% CI [20.8%, 93.9%]"
    assert [t["task_id"] for t in details["tasks"]] == ["task_a", "task_b", "task_c"]

    def broken(edit):
        bad = json.loads(json.dumps(sub))
        edit(bad)
        return bad

    cases = [
        (broken(lambda s: s.pop("task_b")), "missing task.*task_b"),
        (broken(lambda s: s.update(extra=[])), "unknown task.*extra"),
        (broken(lambda s: s["task_a"].pop()), "task 'task_a': 1 entries but the task has 2"),
        (broken(lambda s: s["task_a"][1].pop("attempt_2")), "task 'task_a' test input 1: missing attempt_2"),
        (broken(lambda s: s["task_b"][0]["attempt_1"].append([1])), "task_b' test input 0 attempt_1: ragged rows"),
        (broken(lambda s: s["task_c"][0].update(attempt_2=[[1, 10]])), "attempt_2: colour 10 outside 0..9 at cell"),
        (broken(lambda s: s["task_c"][0].update(attempt_1=[[True]])), "attempt_1: cell \\(0, 0\\) is True"),
        (broken(lambda s: s["task_c"][0].update(attempt_1=[])), "attempt_1: empty grid"),
        (broken(lambda s: s.update(task_c={"attempt_1": [[1]]})), "task 'task_c': expected a list"),
        ([sub], "expected an object keyed by task id"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_submission(bad, tasks)


def test_wilson_interval():
    r = PassAtK(k=2, solved=0, tasks=77)
    lo, hi = r.wilson_ci()
    z = 1.96
    assert lo == 0.0
    assert hi == pytest.approx(100 * z * z / (77 + z * z))  # the formula at p = 0
    assert (round(lo, 1), round(hi, 1)) == (0.0, 4.8)
    assert str(r) == "ARC/pass@2 = 0/77 tasks (0.00%), 95% CI [0.0%, 4.8%]"
    # the general formula at p = 31/400
    n, p = 400, 31 / 400
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    r = PassAtK(k=2, solved=31, tasks=400)
    assert r.wilson_ci() == pytest.approx((100 * (centre - half), 100 * (centre + half)))
    assert str(r) == "ARC/pass@2 = 31/400 tasks (7.75%), 95% CI [5.5%, 10.8%]"
    assert PassAtK(k=1, solved=0, tasks=0).percent == 0.0


def test_evaluation_augmentations():
    assert evaluation_augmentations("identity") == [0]
    assert evaluation_augmentations(8) == list(range(8))
    assert evaluation_augmentations("8", start=1000) == [0, *range(1000, 1007)]
    assert len(evaluation_augmentations("trm")) == 1000
    for bad in (0, "dihedral_x", True):
        with pytest.raises(ValueError):
            evaluation_augmentations(bad)


def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tasks = three_tasks()
        rows = three_task_rows(tasks)
        mine = rows.rows[rank::world_size] + rows.rows[:1]  # rank 1 repeats row 0, as DDP padding does
        ev = ARCVoteEvaluator(tasks, seed=SEED)
        ev.add_batch(*rows.batch(mine))

        class Strategy:
            world_size = 2

        ev.gather(Strategy())
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(_summary(ev), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")
def test_gather_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse the imported torch (spawn would re-import it, several seconds on 2 cores)
    mp.start_processes(
        _gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    tasks = three_tasks()
    full = ARCVoteEvaluator(tasks, seed=SEED)
    full.add_batch(*three_task_rows(tasks).batch())
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            assert pickle.load(f) == _summary(full)


def test_named_augmentation_modes():
    from trm_lightning.data.augment import augmentation_for
    from trm_lightning.evaluation import evaluation_augmentations

    assert evaluation_augmentations("identity") == [0]
    dihedral = [augmentation_for(0, "task", i) for i in evaluation_augmentations("dihedral")]
    assert [a.dihedral for a in dihedral] == list(range(8))
    assert all(a.colour_perm == tuple(range(10)) for a in dihedral)
    by_colour = [augmentation_for(0, "task", i) for i in evaluation_augmentations("dihedral_x3")]
    assert len(by_colour) == 24 and len({(a.dihedral, a.colour_perm) for a in by_colour}) == 24
    assert by_colour[0] == Augmentation.identity() and sum(a.colour_perm == tuple(range(10)) for a in by_colour) == 8
    assert len(evaluation_augmentations("trm")) == 1000 and evaluation_augmentations(5) == [0, 1, 2, 3, 4]
    for bad in ("dihedral_x0", "dihedral_xk", "sideways", 0):
        with pytest.raises(ValueError):
            evaluation_augmentations(bad)
