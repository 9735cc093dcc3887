import pytest

from repguide.pairing import Pair, resolve_pairs, stretch


def names(prefix, k):
    return [f"{prefix}{i}" for i in range(k)]


def test_stretch_matches_the_official_mapping_for_deep_fcn_from_resnet18():
    # The official code's mapping: 21 guide layers over 48 target layers.
    pairs = stretch(names("t", 48), names("g", 21))
    assert [int(p.target[1:]) for p in pairs] == [
        0, 2, 5, 7, 9, 12, 14, 16, 19, 21, 24, 26, 28, 31, 33, 35, 38, 40, 42, 45, 47
    ]
    assert [p.guide for p in pairs] == names("g", 21)


def test_stretch_matches_the_official_mapping_for_wide_fcn_from_resnet18():
    # S > T: every target layer gets one guide layer, first to first, last to last.
    pairs = stretch(names("t", 3), names("g", 21))
    assert [(p.target, p.guide) for p in pairs] == [("t0", "g0"), ("t1", "g10"), ("t2", "g20")]


def test_stretch_keeps_every_pair_when_the_guide_is_deeper():
    pairs = stretch(names("t", 4), names("g", 20))
    assert len(pairs) == 4
    assert len({p.target for p in pairs}) == 4


def test_stretch_is_one_to_one_for_equal_depths():
    pairs = stretch(names("t", 7), names("g", 7))
    assert [(p.target[1:], p.guide[1:]) for p in pairs] == [(str(i), str(i)) for i in range(7)]


def test_stretch_with_a_single_layer_pairs_the_first_layers():
    assert stretch(["a", "b", "c"], ["g"]) == [Pair("a", "g")]
    assert stretch(["a"], ["g", "h"]) == [Pair("a", "g")]


def test_stretch_rejects_empty_lists():
    with pytest.raises(ValueError, match="non-empty"):
        stretch([], ["g"])


def test_explicit_pairs_are_kept_in_order_with_weights():
    pairs = resolve_pairs([("a", "x"), ("b", "y", 0.5), Pair("c", "z")], ["a", "b", "c"], ["x", "y", "z"])
    assert pairs == [Pair("a", "x"), Pair("b", "y", 0.5), Pair("c", "z")]


def test_unknown_layer_name_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"Closest: blocks\.1\.linear"):
        resolve_pairs([("blocks.1.linaer", "g")], ["blocks.0.linear", "blocks.1.linear"], ["g"])


def test_patterns_select_layers_then_stretch():
    target = ["blocks.0.linear", "blocks.0.act", "blocks.1.linear", "blocks.1.act", "head"]
    guide = ["stem", "layer1.conv", "layer2.conv", "fc"]
    pairs = resolve_pairs({"target": "blocks.*.act", "guide": ["layer*.conv"]}, target, guide)
    assert pairs == [Pair("blocks.0.act", "layer1.conv"), Pair("blocks.1.act", "layer2.conv")]


def test_pattern_without_a_match_is_an_error():
    with pytest.raises(ValueError, match="no guide layer matches"):
        resolve_pairs({"guide": "nothing*"}, ["a"], ["g"])


def test_empty_and_duplicate_pairings_are_errors():
    with pytest.raises(ValueError, match="empty"):
        resolve_pairs([])
    with pytest.raises(ValueError, match="twice"):
        resolve_pairs([("a", "g"), ("a", "g")])


def test_malformed_pairs_and_unknown_spec_are_errors():
    with pytest.raises(ValueError, match="explicit pair"):
        resolve_pairs([("a",)])
    with pytest.raises(ValueError, match="unknown pairing"):
        resolve_pairs("diagonal", ["a"], ["b"])
    with pytest.raises(ValueError, match="a finite number >= 0, got -1.0"):
        resolve_pairs([("a", "g", -1.0)])
