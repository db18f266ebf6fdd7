import pytest

from gatesearch.backbones import BACKBONES
from gatesearch.policies import POLICIES
from gatesearch.registry import Registry, UnknownNameError


def test_unknown_name_lists_known():
    with pytest.raises(UnknownNameError) as e:
        POLICIES.get("gumbal")
    msg = str(e.value)
    assert "unknown gate 'gumbal'" in msg and "input_norm" in msg and "dense" in msg


def test_unknown_backbone_lists_known():
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet9000'; known: .*tiny"):
        BACKBONES.get("resnet9000")


def test_register_twice_is_refused():
    reg = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(int)


def test_list_pattern_and_explicit_names():
    reg = Registry("thing")

    @reg.register("resnet18")
    def some_function_name():
        pass

    reg.register("tiny")(int)
    assert reg.list("resnet*") == ["resnet18"]
    assert "some_function_name" not in reg
    assert list(reg) == ["resnet18", "tiny"]


def test_builtin_entries():
    assert {"dense", "input_norm", "output_norm"} <= set(POLICIES)
    assert "tiny" in BACKBONES
