"""The one registry helper behind models, data sets and measures."""

import pytest

from repguide._registry import Registry


class Box:
    def __init__(self, size: int = 1, colour: str = "red") -> None:
        self.size, self.colour = size, colour


def test_one_builder_serves_several_names_with_their_own_defaults():
    reg = Registry("box")
    reg.register("small_box", Box, size=2)
    reg.register("big_box", Box, size=9)
    assert reg.get("small_box").build().size == 2
    assert reg.get("big_box").build().size == 9
    assert reg.get("big_box").build(size=3, colour="blue").__dict__ == {"size": 3, "colour": "blue"}
    assert reg.get("big_box").accepted_kwargs() == {"size", "colour"}


def test_register_as_a_decorator_returns_what_it_decorates():
    reg = Registry("box")

    @reg.register("box", colour="green")
    def make(size: int = 1, colour: str = "red") -> Box:
        return Box(size, colour)

    assert make().colour == "red"  # the function itself is unchanged
    assert reg.get("box").build().colour == "green"


def test_unknown_name_suggests_the_closest_and_lists_all():
    reg = Registry("box")
    reg.register("small_box", Box)
    reg.register("big_box", Box)
    with pytest.raises(ValueError, match=r"^unknown box 'smal_box'; available: big_box, small_box\. Did you mean 'small_box'\?$"):
        reg.get("smal_box")


def test_a_taken_name_is_refused_until_unregistered():
    reg = Registry("box")
    reg.register("box", Box)
    with pytest.raises(ValueError, match="a box named 'box' is already registered"):
        reg.register("box", Box)
    reg.unregister("box")
    assert reg.list() == [] and "box" not in reg
    reg.register("box", Box)
    assert reg.list() == ["box"]


def test_restore_on_exit_undoes_registrations_and_removals_made_inside_it():
    reg = Registry("box")
    reg.register("kept", Box)
    reg.register("dropped", Box)
    with reg.restore_on_exit() as inside:
        assert inside is reg
        reg.register("temporary", Box)
        reg.unregister("dropped")
        assert reg.list() == ["kept", "temporary"]
    assert reg.list() == ["dropped", "kept"]
    with pytest.raises(RuntimeError), reg.restore_on_exit():  # an error inside restores too
        reg.register("temporary", Box)
        raise RuntimeError
    assert reg.list() == ["dropped", "kept"]


def test_measures_use_the_registry_with_their_own_error_and_messages():
    from repguide import similarity
    from repguide.errors import MeasureError

    assert isinstance(similarity.MEASURES, Registry) and similarity.MEASURES.list() == similarity.list_measures()
    with pytest.raises(MeasureError, match=r"^unknown similarity measure 'ckaa'; available: .*\. Did you mean 'cka'\?$"):
        similarity.get_measure("ckaa")
    with pytest.raises(MeasureError, match="^a similarity measure named 'cka' is already registered$"):
        similarity.register_measure("cka")(lambda x, y: x.sum())


def test_did_you_mean_fills_its_form_with_the_closest_choices_or_gives_nothing():
    from repguide._registry import did_you_mean

    choices = ["width", "depth", "num_classes"]
    assert did_you_mean("widht", choices) == " Did you mean width?"
    assert did_you_mean("widht", choices, show=repr) == " Did you mean 'width'?"
    assert did_you_mean(["dept", "widht"], choices) == " Did you mean depth, width?"  # one for each name
    assert did_you_mean("colour", choices) == ""
    assert did_you_mean("layer1", ["layer1.0", "layer1.1", "layer2", "fc"], " Closest: {}.", n=3, cutoff=0.5) == (
        " Closest: layer1.1, layer1.0, layer2."
    )
