"""The held-out-rule family (``family(s, c)``) and its split: determinism, disjointness, canvas fit, demos that
follow their rule, and held-out queries that only the demos can disambiguate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trm_lightning.data.augment import dihedral
from trm_lightning.data.fewshot_rules import (
    FEWSHOT_FAMILIES,
    FewshotRule,
    make_fewshot_split,
    explaining_rules,
    make_rule_tasks,
    parse_rule,
    rule_of,
    rule_params,
    split_rules,
)


def _same_tasks(a, b) -> bool:
    return len(a) == len(b) and all(
        x.task_id == y.task_id and x.source == y.source
        and all(np.array_equal(p, q) for (pi, po), (qi, qo) in zip(x.train + x.test, y.train + y.test)
                for p, q in ((pi, qi), (po, qo)))
        for x, y in zip(a, b)
    )


def test_rule_catalogue_sizes_and_names():
    sizes = {family: len(rule_params(family)) for family in FEWSHOT_FAMILIES}
    assert sizes == {"paint": 18, "outline": 36, "frame": 36, "recolour": 72, "dihedral": 63, "gravity": 36,
                     "lines": 36, "fill": 18, "size": 18, "tile": 36}
    rule = FewshotRule("dihedral", 4, 7)
    assert rule.name == "dihedral(4,7)" and parse_rule(rule.name) == rule
    with pytest.raises(ValueError, match="no parameters"):
        FewshotRule("recolour", 3, 3)  # recolouring a colour into itself changes nothing
    with pytest.raises(ValueError, match="unknown rule family"):
        FewshotRule("crop", 0, 1)


def test_rules_on_hand_made_grids():
    g = np.array([[1, 0, 2], [0, 3, 0]], dtype=np.uint8)
    assert FewshotRule("paint", 0, 6).apply(g).tolist() == [[6, 0, 6], [0, 6, 0]]
    assert FewshotRule("paint", 1, 6).apply(g).tolist() == [[1, 6, 2], [6, 3, 6]]
    dot = np.zeros((3, 4), np.uint8)
    dot[1, 1] = 3
    assert FewshotRule("outline", 0, 5).apply(dot).tolist() == [[0, 5, 0, 0], [5, 3, 5, 0], [0, 5, 0, 0]]
    assert FewshotRule("outline", 1, 5).apply(dot).tolist() == [[5, 0, 5, 0], [0, 3, 0, 0], [5, 0, 5, 0]]
    assert FewshotRule("outline", 2, 5).apply(dot).tolist() == [[0, 0, 0, 0], [5, 3, 5, 0], [0, 0, 0, 0]]
    assert FewshotRule("outline", 3, 5).apply(dot).tolist() == [[0, 5, 0, 0], [0, 3, 0, 0], [0, 5, 0, 0]]
    assert FewshotRule("frame", 0, 5).apply(dot).tolist() == [[5, 5, 5, 5], [5, 3, 0, 5], [5, 5, 5, 5]]
    assert FewshotRule("frame", 1, 5).apply(dot).tolist() == [[5, 5, 5, 5], [0, 3, 0, 0], [5, 5, 5, 5]]
    assert FewshotRule("frame", 2, 5).apply(dot).tolist() == [[5, 0, 0, 5], [5, 3, 0, 5], [5, 0, 0, 5]]
    assert FewshotRule("frame", 3, 5).apply(dot).tolist() == [[5, 0, 0, 5], [0, 3, 0, 0], [5, 0, 0, 5]]
    assert FewshotRule("recolour", 2, 5).apply(g).tolist() == [[1, 0, 5], [0, 3, 0]]
    assert np.array_equal(FewshotRule("dihedral", 4, 9).apply(g), np.where(dihedral(g, 4) != 0, 9, 0))
    assert FewshotRule("gravity", 0, 4).apply(g).tolist() == [[0, 0, 0], [4, 4, 4]]
    assert FewshotRule("gravity", 2, 4).apply(g).tolist() == [[4, 4, 0], [4, 0, 0]]
    assert FewshotRule("lines", 3, 6).apply(np.array([[0, 2, 0, 0], [0, 0, 0, 0]], np.uint8)).tolist() == [
        [0, 2, 6, 6], [0, 0, 0, 0]]
    ring = np.zeros((5, 5), np.uint8)
    ring[1:4, 1:4] = 8
    ring[2, 2] = 0
    inside, outside = FewshotRule("fill", 0, 3).apply(ring), FewshotRule("fill", 1, 3).apply(ring)
    assert inside[2, 2] == 3 and (inside == 3).sum() == 1
    assert outside[2, 2] == 0 and (outside == 3).sum() == 25 - 9
    blobs = np.array([[7, 7, 0, 7], [7, 7, 0, 0]], np.uint8)
    assert FewshotRule("size", 0, 2).apply(blobs).tolist() == [[2, 2, 0, 7], [2, 2, 0, 0]]
    assert FewshotRule("size", 1, 2).apply(blobs).tolist() == [[7, 7, 0, 2], [7, 7, 0, 0]]
    assert FewshotRule("tile", 2, 1).apply(np.array([[4, 0]], np.uint8)).tolist() == [[4, 1, 1, 4]]


def test_split_is_deterministic_disjoint_and_compositional():
    train, heldout = split_rules(seed=3)
    again = split_rules(seed=3)
    assert (train, heldout) == again
    assert split_rules(seed=4) != (train, heldout)
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == sum(len(rule_params(f)) for f in FEWSHOT_FAMILIES) == 369
    for family in FEWSHOT_FAMILIES:
        fam_train = [r for r in train if r.family == family]
        fam_held = [r for r in heldout if r.family == family]
        assert len(fam_held) == round(0.25 * len(rule_params(family)))
        # every part of a held-out rule is shown by training: its s with another colour, its c with another s
        for rule in fam_held:
            assert any(r.s == rule.s for r in fam_train) and any(r.c == rule.c for r in fam_train), rule.name
    # a family's split does not depend on which other families are chosen
    sub_train, sub_heldout = split_rules(["tile", "fill"], seed=3)
    assert set(sub_train) == {r for r in train if r.family in ("fill", "tile")}
    assert set(sub_heldout) == {r for r in heldout if r.family in ("fill", "tile")}


def test_fewshot_split_tasks_deterministic_fit_the_canvas_and_follow_their_rule():
    train_rules, heldout_rules = split_rules(seed=0)
    n_held = len(heldout_rules)
    train, heldout = make_fewshot_split(140, n_held, seed=0, n_demos=3, n_test=2, max_side=6)
    again_train, again_heldout = make_fewshot_split(140, n_held, seed=0, n_demos=3, n_test=2, max_side=6)
    assert _same_tasks(train, again_train) and _same_tasks(heldout, again_heldout)
    assert not _same_tasks(heldout, make_fewshot_split(140, n_held, seed=1, n_demos=3, n_test=2)[1])
    assert {rule_of(t) for t in train} <= set(train_rules)
    assert len({rule_of(t) for t in train}) == 140  # 278 training rules: no rule twice before every rule once
    assert {rule_of(t) for t in heldout} == set(heldout_rules)  # one task per held-out rule: each rule once
    assert len({t.task_id for t in train + heldout}) == len(train) + len(heldout)
    for task in train + heldout:
        rule = rule_of(task)
        assert len(task.train) == 3 and len(task.test) == 2
        assert task.max_side <= 8  # canvas 8 holds every grid, tile outputs included
        for inp, out in task.train + task.test:
            assert inp.dtype == np.uint8 and out.dtype == np.uint8 and out.max() <= 9
            assert np.array_equal(rule.apply(inp), out), (task.task_id, rule.name)
            assert not np.array_equal(inp, out)  # every pair shows the rule at work


def test_inputs_do_not_depend_on_the_rule_parameters():
    # the input sampler of a family reads the family only: same rng state, same input, whatever (s, c) is
    for family in FEWSHOT_FAMILIES:
        grids = [FewshotRule(family, s, c).sample_input(np.random.default_rng(7), 3, 6)
                 for s, c in rule_params(family)[:: max(1, len(rule_params(family)) // 5)]]
        assert all(np.array_equal(grids[0], g) for g in grids[1:]), family


def test_heldout_rules_are_ambiguous_without_demos():
    """Two held-out rules of one family give different outputs for the same input: a model that sees only the
    query input cannot tell which to produce."""
    _, heldout = make_fewshot_split(10, len(split_rules(seed=0)[1]), seed=0)
    by_family: dict[str, list] = {}
    for task in heldout:
        by_family.setdefault(rule_of(task).family, []).append(task)
    checked = 0
    for family, tasks in by_family.items():
        assert len(tasks) >= 2, family
        for a, b in itertools.combinations(tasks, 2):
            ra, rb = rule_of(a), rule_of(b)
            assert ra != rb
            query = a.test[0][0]
            # b's rule applied to a's query: a different answer than a's own (when b's rule changes it at all)
            other = rb.apply(query)
            if not np.array_equal(other, query):
                assert not np.array_equal(other, a.test[0][1]), (ra.name, rb.name)
                checked += 1
    assert checked >= 200  # most pairs of held-out rules disagree on real queries


def test_make_rule_tasks_covers_rules_evenly_and_checks_arguments():
    rules = [FewshotRule("recolour", 1, 2), FewshotRule("gravity", 0, 3), FewshotRule("tile", 1, 4)]
    tasks = make_rule_tasks(rules, 7, seed=0, prefix="x")
    counts = [sum(rule_of(t) == r for t in tasks) for r in rules]
    assert sorted(counts) == [2, 2, 3] and tasks[0].task_id == "x0000"
    with pytest.raises(ValueError, match="at least one rule"):
        make_rule_tasks([], 3, seed=0, prefix="x")
    with pytest.raises(ValueError, match="max_side >= 4"):
        make_rule_tasks(rules, 3, seed=0, prefix="x", max_side=3)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_rules(heldout_fraction=1.0)


def _brute_force_explaining(task, rules):
    pairs = [(i, o) for i, o in task.train + task.test if o is not None]
    found = []
    for rule in rules:
        try:
            if all(np.array_equal(rule.apply(i), o) for i, o in pairs):
                found.append(rule)
        except ValueError:
            pass
    return found


def test_explaining_rules_is_exact():
    """The fast search (one application per (family, s), a cheap filter first) finds exactly the rules that map
    every pair, on tasks of every family against every rule (each task's own rule among them)."""
    train_rules, heldout_rules = split_rules(seed=0)
    rules = train_rules + heldout_rules
    train, heldout = make_fewshot_split(300, 60, seed=5)
    for task in train + heldout:
        found = explaining_rules(task, rules)
        assert rule_of(task) in found
        assert found == _brute_force_explaining(task, rules), task.task_id


def test_no_task_shows_a_rule_of_the_other_split():
    """Across families a task can follow another rule by coincidence (``fill(1, c)`` = ``paint(1, c)`` on grids
    without enclosed background): no training task follows a held-out rule and no held-out task a training rule."""
    for seed in (0, 1, 2):
        train_rules, heldout_rules = split_rules(seed=seed)
        train, heldout = make_fewshot_split(1500, 2 * len(heldout_rules), seed=seed)
        assert not [t.task_id for t in train if explaining_rules(t, heldout_rules)]
        assert not [t.task_id for t in heldout if explaining_rules(t, train_rules)]
