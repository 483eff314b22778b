"""The Table 3 ensemble on a case small enough to work out by hand.

Classes: 0, 1 liquor; 2, 3 cosmetics; 4, 5 dairy. Specialists for liquor (labels 0, 1 =
classes 0, 1) and cosmetics (labels 0, 1 = classes 3, 2: not the global order).

sample  true  general top-5     route          specialist top  ensemble top-5
s0      0     1 0 4 5 2         liquor         0 1             0 1 | 4 5 2
s1      1     4 1 0 5 3         general (misrouted: top-1 is dairy)
s2      2     3 2 5 4 0         cosmetics      2 3             2 3 | 5 4 0
s3      3     3 2 4 5 1         cosmetics      3 2             3 2 | 4 5 1
s4      4     0 4 5 1 2         liquor (wrong) 0 1             0 1 | 4 5 2
s5      5     5 4 3 2 1         general
"""

from __future__ import annotations

import numpy as np
import pytest

from rp2k_dist.errors import ConfigError
from rp2k_dist.evaluation import (
    PAPER_TABLE3,
    Predictions,
    Specialist,
    combine,
    route,
    table3,
    table3_markdown,
    within_category,
)

CLASSES = [
    {"index": c, "name": f"c{c}", "type": t, "shape": "bottle" if c % 2 else "box"}
    for c, t in enumerate(["liquor", "liquor", "cosmetics", "cosmetics", "dairy", "dairy"])
]
LIQUOR = Specialist("liquor", "type", (0, 1))
COSMETICS = Specialist(meta_category="cosmetics", classes=(3, 2))
SPECIALISTS = [LIQUOR, COSMETICS]
KEYS = [f"s{i}" for i in range(6)]
GENERAL_TOPK = np.array(
    [[1, 0, 4, 5, 2], [4, 1, 0, 5, 3], [3, 2, 5, 4, 0], [3, 2, 4, 5, 1], [0, 4, 5, 1, 2], [5, 4, 3, 2, 1]]
)
GENERAL_SCORES = np.tile(np.array([0.5, 0.2, 0.1, 0.06, 0.04], np.float32), (6, 1))
LABELS = np.arange(6)


@pytest.fixture()
def general() -> Predictions:
    return Predictions(KEYS, LABELS, GENERAL_TOPK, GENERAL_SCORES)


@pytest.fixture()
def specialist_preds() -> dict[int, Predictions]:
    # in each specialist's own label space; "s9" was never routed and must be ignored
    liquor = Predictions.from_logits(["s4", "s0", "s9"], [-1, 0, 1], np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))
    cosmetics = Predictions.from_logits(["s2", "s3"], [1, 0], np.array([[0.0, 3.0], [1.0, 0.0]]))
    return {0: liquor, 1: cosmetics}


def test_route_top1_follows_the_general_top1_category():
    np.testing.assert_array_equal(route(GENERAL_TOPK, CLASSES, SPECIALISTS), [0, -1, 1, 1, 0, -1])


def test_route_top5_majority_breaks_ties_by_rank():
    topk = np.array(
        [
            [0, 4, 5, 1, 2],  # liquor 2, dairy 2: liquor ranks first
            [4, 0, 5, 2, 1],  # dairy 2, liquor 2: dairy first -> no specialist
            [4, 0, 1, 2, 3],  # dairy 1, liquor 2, cosmetics 2: liquor ranks before cosmetics
            [2, 0, 3, 4, 5],  # cosmetics 2, dairy 2: cosmetics first
            [4, 2, 3, 5, 1],  # dairy 2, cosmetics 2: dairy first
            [1, 2, 3, 4, 5],  # cosmetics 2, dairy 2 beat liquor's top-1 -> cosmetics (rank 1)
        ]
    )
    np.testing.assert_array_equal(route(topk, CLASSES, SPECIALISTS, rule="top5-majority"), [0, -1, 0, 1, -1, 1])


def test_route_rejects_an_unknown_rule_and_duplicate_specialists():
    with pytest.raises(ConfigError, match="rule"):
        route(GENERAL_TOPK, CLASSES, SPECIALISTS, rule="oracle")
    with pytest.raises(ConfigError, match="same meta-category"):
        route(GENERAL_TOPK, CLASSES, [LIQUOR, Specialist("liquor", classes=(1, 0))])


def test_route_by_shape_and_first_specialist_wins():
    bottles = Specialist("bottle", "shape", (1, 3, 5))
    np.testing.assert_array_equal(route(GENERAL_TOPK, CLASSES, [bottles]), [0, -1, 0, 0, -1, 0])
    np.testing.assert_array_equal(route(GENERAL_TOPK, CLASSES, [bottles, LIQUOR]), [0, -1, 0, 0, 1, 0])


def test_combine_replaces_exactly_the_routed_samples(general, specialist_preds):
    routes = route(general.topk, CLASSES, SPECIALISTS)
    ensemble = combine(general, specialist_preds, routes, SPECIALISTS)
    expected = np.array(
        [[0, 1, 4, 5, 2], [4, 1, 0, 5, 3], [2, 3, 5, 4, 0], [3, 2, 4, 5, 1], [0, 1, 4, 5, 2], [5, 4, 3, 2, 1]]
    )
    np.testing.assert_array_equal(ensemble.topk, expected)
    assert ensemble.keys == KEYS
    np.testing.assert_array_equal(ensemble.labels, LABELS)
    kept = routes == -1
    np.testing.assert_array_equal(ensemble.scores[kept], general.scores[kept])
    # s0: the specialist's two probabilities, then the general model's for classes 4, 5, 2
    p = np.exp(2.0) / (np.exp(2.0) + 1)
    np.testing.assert_allclose(ensemble.scores[0], [p, 1 - p, 0.1, 0.06, 0.04], rtol=1e-6)


def test_combine_narrower_k_truncates(general, specialist_preds):
    routes = route(general.topk, CLASSES, SPECIALISTS)
    ensemble = combine(general, specialist_preds, routes, SPECIALISTS, k=1)
    np.testing.assert_array_equal(ensemble.topk[:, 0], [0, 4, 2, 3, 0, 5])


def test_combine_needs_predictions_for_every_routed_sample(general, specialist_preds):
    routes = route(general.topk, CLASSES, SPECIALISTS)
    partial = {0: specialist_preds[0].subset(np.array([1])), 1: specialist_preds[1]}  # s4 missing
    with pytest.raises(ValueError, match="s4"):
        combine(general, partial, routes, SPECIALISTS)
    with pytest.raises(ValueError, match="cosmetics"):
        combine(general, {0: specialist_preds[0]}, routes, SPECIALISTS)


def test_within_category_selects_by_true_class(general):
    assert within_category(general, CLASSES, LIQUOR).keys == ["s0", "s1"]
    assert within_category(general, CLASSES, COSMETICS).keys == ["s2", "s3"]


def _restricted() -> dict[int, Predictions]:
    # the general model among each category's classes, in the specialist's label space
    liquor = Predictions.from_logits(["s0", "s1"], [0, 1], np.array([[0.0, 1.0], [0.0, 1.0]]))  # class 1 twice
    cosmetics = Predictions.from_logits(["s2", "s3"], [1, 0], np.array([[1.0, 0.0], [1.0, 0.0]]))  # class 3 twice
    return {0: liquor, 1: cosmetics}


def _specialists_alone(specialist_preds) -> dict[int, Predictions]:
    # every image of the category given to its specialist (s1 too, which routing keeps away)
    liquor = Predictions.from_logits(["s0", "s1", "s4"], [0, 1, -1], np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    return {0: liquor, 1: specialist_preds[1]}


#: The general model's probability on (liquor, cosmetics) per sample, from GENERAL_SCORES:
#: s0 top-5 1 0 4 5 2 -> liquor .5 + .2; s1 4 1 0 5 3 -> liquor .2 + .1, cosmetics .04 (class 3) ...
MASS = np.array([[0.7, 0.04], [0.3, 0.04], [0.04, 0.7], [0.04, 0.7], [0.56, 0.04], [0.04, 0.16]], np.float32)
THRESHOLDS = [0.25, 0.5]


def test_route_by_mass_by_hand():
    from rp2k_dist.evaluation.ensemble import route_by_mass

    # s1 (liquor, general top-1 dairy) now reaches the liquor specialist; s4 (dairy) still does
    np.testing.assert_array_equal(route_by_mass(MASS, THRESHOLDS), [0, 0, 1, 1, 0, -1])
    # a mass equal to the threshold routes; of two categories over their thresholds the larger mass wins
    np.testing.assert_array_equal(route_by_mass([[0.3, 0.45], [0.3, 0.2], [0.2, 0.2]], [0.3, 0.3]), [1, 0, -1])
    with pytest.raises(ValueError, match="one column per threshold"):
        route_by_mass(MASS, [0.5])


def test_the_threshold_misroutes_the_fewest_validation_images():
    from rp2k_dist.evaluation.ensemble import calibrate_threshold

    # category images at .9 .6 .3, others at .5 .2 .1; candidates halfway between distinct
    # masses: .05 (3 errors), .15 (2), .25 (1: the other at .5 routed), .4 (2), .55 (1: .3 missed),
    # .75 (2), inf (3); of the two best the lower one
    mass = [0.9, 0.6, 0.3, 0.5, 0.2, 0.1]
    inside = [True, True, True, False, False, False]
    assert calibrate_threshold(mass, inside) == pytest.approx(0.25)
    assert calibrate_threshold([0.8, 0.1], [True, False]) == pytest.approx(0.45)  # separable: the midpoint
    assert calibrate_threshold([0.8, 0.1], [False, False]) == float("inf")  # no category image: route none
    assert calibrate_threshold([0.3, 0.3], [True, True]) == pytest.approx(0.15)  # all inside: below the lowest


def test_table3_by_hand(general, specialist_preds):
    from rp2k_dist.evaluation.ensemble import route_by_mass

    routes = route(general.topk, CLASSES, SPECIALISTS)
    ensemble = combine(general, specialist_preds, routes, SPECIALISTS)
    alone = _specialists_alone(specialist_preds)
    mass_routes = route_by_mass(MASS, THRESHOLDS)
    by_mass = combine(general, alone, mass_routes, SPECIALISTS)
    rows = table3(general, ensemble, CLASSES, SPECIALISTS, routes, _restricted(), alone, by_mass, mass_routes, THRESHOLDS)
    # every column has its interval and the deciding comparisons are paired differences
    liquor_d = rows[0]["differences"]["(d)-(a)"]
    assert (liquor_d["estimate"], liquor_d["only_a"], liquor_d["only_b"], liquor_d["n"]) == (50.0, 1, 0, 2)
    assert set(rows[0]["differences"]) == {"(b)-(a)", "(c)-(b)", "(d)-(a)", "(e)-(a)"}
    assert rows[1]["specialist_top1_ci"][0] <= 100.0 == rows[1]["specialist_top1_ci"][1]
    intervals = [{k: row.pop(k) for k in list(row) if k.endswith("_ci") or k == "differences"} for row in rows]
    assert rows == [
        # (a) s0, s1 wrong; (b) among {0, 1} the general model says 1 twice: s1 right; (c) the
        # specialist fixes s0, breaks s1; (d) s0 routed and fixed, s1 kept by the general model
        # (its top-1 is dairy): recall 50 %; s4 (dairy) is routed in: precision 50 %;
        # (e) by mass s1 is routed too (liquor .3 >= .25), where the specialist gets it wrong,
        # and s4 (liquor .56) still: recall 100 %, precision 2 of 3
        {"meta_category": "liquor", "samples": 2, "general_top1": 0.0, "general_top5": 100.0,
         "restricted_top1": 50.0, "restricted_top5": 100.0, "specialist_top1": 50.0, "specialist_top5": 100.0,
         "ensemble_top1": 50.0, "ensemble_top5": 100.0, "mass_top1": 50.0, "mass_top5": 100.0,
         "routing_recall": 50.0, "routing_precision": 50.0, "routed_in": 1,
         "mass_recall": 100.0, "mass_precision": pytest.approx(200 / 3), "mass_routed_in": 1, "mass_threshold": 0.25},
        # s2 fixed by the specialist (label 1 = class 2), s3 right in all
        {"meta_category": "cosmetics", "samples": 2, "general_top1": 50.0, "general_top5": 100.0,
         "restricted_top1": 50.0, "restricted_top5": 100.0, "specialist_top1": 100.0, "specialist_top5": 100.0,
         "ensemble_top1": 100.0, "ensemble_top5": 100.0, "mass_top1": 100.0, "mass_top5": 100.0,
         "routing_recall": 100.0, "routing_precision": 100.0, "routed_in": 0,
         "mass_recall": 100.0, "mass_precision": 100.0, "mass_routed_in": 0, "mass_threshold": 0.5},
    ]
    text = table3_markdown(rows)
    assert ("| liquor | 2 | 0.00 / 100.00 | 50.00 / 100.00 | 50.00 / 100.00 | 50.00 / 100.00 | 50.00 / 100.00 "
            "| 50.00 / 50.00 | 100.00 / 66.67 | 0.250 | 76.99 / 96.44 | 96.47 / 99.33 |") in text
    with_ci = table3_markdown([{**row, **extra} for row, extra in zip(rows, intervals)])
    low, high = intervals[0]["general_top1_ci"]
    assert f"| liquor | 2 | 0.00 [{low:.1f}, {high:.1f}] / 100.00 |" in with_ci
    assert ("| cosmetics | 2 | 50.00 / 100.00 | 50.00 / 100.00 | 100.00 / 100.00 | 100.00 / 100.00 "
            "| 100.00 / 100.00 | 100.00 / 100.00 | 100.00 / 100.00 | 0.500 | 87.87 / 93.71 | 93.88 / 99.03 |") in text
    assert "paper" not in table3_markdown(rows, paper=None)
    assert PAPER_TABLE3["resnet34+apinet"]["liquor"] == (96.47, 99.33)


def test_table3_without_the_parts_leaves_their_columns_empty(general, specialist_preds):
    ensemble = combine(general, specialist_preds, route(general.topk, CLASSES, SPECIALISTS), SPECIALISTS)
    (row, _) = table3(general, ensemble, CLASSES, SPECIALISTS)
    assert row["restricted_top1"] is None and row["routing_recall"] is None and row["ensemble_top1"] == 50.0
    assert row["mass_top1"] is None and row["mass_precision"] is None and row["mass_threshold"] is None
    assert ("| liquor | 2 | 0.00 [0.0, 0.0] / 100.00 | – | – | 50.00 [0.0, 100.0] / 100.00 | – | – | – | – |"
            in table3_markdown([row], paper=None))
    # a row written before (e) existed (an older ensemble.json) renders with its cells empty
    old = {k: v for k, v in row.items() if not k.startswith("mass") and k != "routing_precision"
           and not k.endswith("_ci") and k != "differences"}
    assert "| liquor | 2 | 0.00 / 100.00 | – | – | 50.00 / 100.00 | – | – | – | – |" in table3_markdown([old], paper=None)
    with pytest.raises(ValueError, match="restricted \\(liquor\\) has no predictions for 1"):
        table3(general, ensemble, CLASSES, SPECIALISTS, restricted={0: _restricted()[0].subset([0])})


def test_predictions_keep_the_groups_probability_mass():
    logits = np.log(np.array([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]]))
    preds = Predictions.from_logits(["b", "a"], [0, 5], logits, groups=[(0, 1), (3, 2)])
    np.testing.assert_allclose(preds.mass, [[0.7, 0.2], [0.2, 0.2]], rtol=1e-6)
    merged = Predictions.concat([preds.subset([0]), preds.subset([1])])
    assert merged.keys == ["a", "b"]
    np.testing.assert_allclose(merged.mass, [[0.2, 0.2], [0.7, 0.2]], rtol=1e-6)
    assert Predictions.from_logits(["a"], [0], logits[:1]).mass is None


def test_oracle_routing_by_true_labels(general, specialist_preds):
    routes = route(general.labels[:, None], CLASSES, SPECIALISTS)
    np.testing.assert_array_equal(routes, [0, 0, 1, 1, -1, -1])
    liquor = Predictions.from_logits(["s0", "s1"], [0, 1], np.array([[2.0, 0.0], [0.0, 1.0]]))
    ensemble = combine(general, {0: liquor, 1: specialist_preds[1]}, routes, SPECIALISTS)
    np.testing.assert_array_equal(ensemble.topk[1], [1, 0, 4, 5, 3])
    assert table3(general, ensemble, CLASSES, SPECIALISTS)[0]["ensemble_top1"] == 100.0


def test_specialist_for_meta_category_and_validation():
    assert Specialist.for_meta_category(CLASSES, "cosmetics") == Specialist("cosmetics", "type", (2, 3))
    assert Specialist.for_meta_category(CLASSES, "bottle", system="shape").classes == (1, 3, 5)
    with pytest.raises(ValueError):
        Specialist("liquor")
    with pytest.raises(ValueError):
        Specialist("liquor", "flavour", (0,))


def test_meta_categories_match_in_any_case(general):
    shouting = [Specialist("LIQUOR", "type", (0, 1)), Specialist(" Cosmetics", classes=(3, 2))]
    assert Specialist.for_meta_category(CLASSES, "Cosmetics") == Specialist("cosmetics", "type", (2, 3))
    mixed = [{**c, "type": c["type"].upper()} for c in CLASSES]  # a class table in capitals
    np.testing.assert_array_equal(route(GENERAL_TOPK, mixed, shouting), route(GENERAL_TOPK, CLASSES, SPECIALISTS))
    assert within_category(general, mixed, shouting[0]).keys == within_category(general, CLASSES, LIQUOR).keys


def _row(name: str, n: int, general: int, restricted: int, specialist: int, ensemble: int) -> dict:
    """A Table 3 row whose columns get the given number of the category's n images right
    (the first ones), with its paired differences."""
    from rp2k_dist.evaluation.table3_text import DIFFERENCES
    from rp2k_dist.evaluation.stats import paired_difference

    hits = {key: np.arange(n) < right for key, right in (("general", general), ("restricted", restricted),
                                                          ("specialist", specialist), ("ensemble", ensemble))}
    row = {"meta_category": name, "samples": n, "routing_recall": 90.0, "routing_precision": 80.0}
    row.update({f"{key}_top1": 100 * h.mean() for key, h in hits.items()})
    row["differences"] = {label: paired_difference(hits[a], hits[b]).to_dict()
                          for label, a, b in DIFFERENCES if a in hits and b in hits}
    return row


def test_the_verdict_says_helped_only_when_the_interval_excludes_zero():
    from rp2k_dist.evaluation.table3_text import verdict

    # a planted 15-point gain on 200 images is detected; one image more on 19 is not
    planted = _row("liquor", 200, general=100, restricted=110, specialist=140, ensemble=130)
    one_image = _row("cosmetics", 19, general=10, restricted=10, specialist=10, ensemble=11)
    text = verdict([planted, one_image])
    assert text.startswith("The specialists helped on liquor (the top-1 routed ensemble (d) against the general "
                           "model (a), paired on the same images): liquor (d) - (a) helped: +15.0 points [")
    assert "on 200 images" in text
    assert "cosmetics (d) - (a) no difference detectable on 19 images (+5.3 points, CI [" in text
    # why not: the specialist alone is no detectable gain on the category's classes
    assert "the specialist alone is not detectably better than the general model among the category's classes " \
           "((c) - (b) +0.0 points, CI [0.0, 0.0])" in text
    assert verdict([one_image]).startswith("No effect of the specialists is detectable")
    # a detected loss is called one, and a specialist that gains while routing loses it says so
    lost = _row("liquor", 200, general=120, restricted=125, specialist=160, ensemble=95)
    text = verdict([lost])
    assert text.startswith("The specialists hurt on liquor") and "hurt: -12.5 points" in text
    assert "routing loses the specialist's gain ((c) - (b) +17.5 points" in text
    # rows of an ensemble.json written before intervals existed: point estimates, said so
    older = {k: v for k, v in planted.items() if k != "differences"}
    assert "(point estimates, no interval)" in verdict([older])
