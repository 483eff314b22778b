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
    assert ("| cosmetics | 2 | 50.00 / 100.00 | 50.00 / 100.00 | 100.00 / 100.00 | 100.00 / 100.00 "
            "| 100.00 / 100.00 | 100.00 / 100.00 | 100.00 / 100.00 | 0.500 | 87.87 / 93.71 | 93.88 / 99.03 |") in text
    assert "paper" not in table3_markdown(rows, paper=None)
    assert PAPER_TABLE3["resnet34+apinet"]["liquor"] == (96.47, 99.33)


def test_table3_without_the_parts_leaves_their_columns_empty(general, specialist_preds):
    ensemble = combine(general, specialist_preds, route(general.topk, CLASSES, SPECIALISTS), SPECIALISTS)
    (row, _) = table3(general, ensemble, CLASSES, SPECIALISTS)
    assert row["restricted_top1"] is None and row["routing_recall"] is None and row["ensemble_top1"] == 50.0
    assert row["mass_top1"] is None and row["mass_precision"] is None and row["mass_threshold"] is None
    assert "| liquor | 2 | 0.00 / 100.00 | – | – | 50.00 / 100.00 | – | – | – | – |" in table3_markdown([row], paper=None)
    # a row written before (e) existed (an older ensemble.json) renders with its cells empty
    old = {k: v for k, v in row.items() if not k.startswith("mass") and k != "routing_precision"}
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


def test_the_verdict_says_whether_the_specialists_helped_and_why_not():
    from rp2k_dist.evaluation.ensemble import verdict

    row = {"meta_category": "liquor", "general_top1": 33.33, "restricted_top1": 38.1, "specialist_top1": 47.62,
           "ensemble_top1": 42.86, "mass_top1": 33.33, "routing_recall": 85.71, "routing_precision": 81.82,
           "mass_recall": 66.67, "mass_precision": 93.33}
    cosmetics = {**row, "meta_category": "cosmetics", "general_top1": 54.55, "restricted_top1": 54.55,
                 "specialist_top1": 72.73, "ensemble_top1": 72.73, "mass_top1": 72.73}
    assert verdict([row, cosmetics]) == (
        "The specialists helped (the top-1 routed ensemble (d) against the general model (a)): liquor (d) 42.9 % "
        "and (e) 33.3 % vs (a) 33.3 % top-1, because routing loses the gain of (c) 47.6 % over (b) 38.1 %: (e) sends "
        "66.67 % of the category's images to the specialist (precision 93.33 %); cosmetics (d) 72.7 % and (e) 72.7 % "
        "vs (a) 54.5 % top-1.")
    no_gain = {**cosmetics, "specialist_top1": 50.0, "ensemble_top1": 50.0, "mass_top1": 54.55}
    assert verdict([row, no_gain]) == (
        "The specialists helped on liquor only (the top-1 routed ensemble (d) against the general model (a)): "
        "liquor (d) 42.9 % and (e) 33.3 % vs (a) 33.3 % top-1, because routing loses the gain of (c) 47.6 % over "
        "(b) 38.1 %: (e) sends 66.67 % of the category's images to the specialist (precision 93.33 %); cosmetics "
        "(d) 50.0 % and (e) 54.5 % vs (a) 54.5 % top-1, because the specialist alone is no better than the general "
        "model among the category's classes ((c) 50.0 % vs (b) 54.5 %).")
    # without (e) (an ensemble.json written before it existed) only (d) is given
    older = {k: v for k, v in row.items() if not k.startswith("mass")}
    assert verdict([{**older, "ensemble_top1": 30.0}]) == (
        "The specialists did not help (the top-1 routed ensemble (d) against the general model (a)): liquor (d) "
        "30.0 % vs (a) 33.3 % top-1, because routing loses the gain of (c) 47.6 % over (b) 38.1 %: (d) sends "
        "85.71 % of the category's images to the specialist (precision 81.82 %).")
