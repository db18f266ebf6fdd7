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


def test_unregister_and_describe():
    reg = Registry("thing")

    @reg.register("a")
    class A:
        """First line.

        More."""

    assert reg.describe("a") == "First line."
    assert reg.unregister("a") is A and "a" not in reg
    with pytest.raises(UnknownNameError, match="unknown thing 'a'"):
        reg.unregister("a")


def test_a_gate_that_breaks_the_contract_cannot_register():
    """The declarations are checked when the gate registers: each refusal is one line naming the gate."""
    from gatesearch.policies import Policy, register_policy
    from gatesearch.spaces import Param

    knob = Param(name="gain", kind=float, low=0.0, default={"low": 0.5, "high": 1.5}, doc="")

    class NoKeepAll(Policy):
        params = (knob,)

    class TakesLr(Policy):
        params = (Param(name="lr", kind=float, default=0.1, doc=""),)

        @classmethod
        def keep_all(cls):
            return {"lr": 0.1}

    class BadKeepAll(Policy):
        params = (knob,)

        @classmethod
        def keep_all(cls):
            return {"gain": -1.0}

    for cls, message in [
        (NoKeepAll, "gate 'broken': defines no keep_all()"),
        (TakesLr, "gate 'broken': knob 'lr' is a parameter every trial has"),
        (BadKeepAll, "gate 'broken': gain: must be >= 0.0"),
    ]:
        with pytest.raises((TypeError, ValueError), match=f"^{message}"):
            register_policy("broken")(cls)
        assert "broken" not in POLICIES
