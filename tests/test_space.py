import optuna
import pytest

from gatesearch.spaces import SpaceError, TrialConfig, load_search_config, parse_search_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(cfg, n=40):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, cfg.space.suggest(trial)))
    return out


def test_conditional_sampling():
    cfg = parse_search_config({"space": {
        "gate": ["dense", "input_norm", "output_norm"],
        "block_size": [2, 4],
        "gates": {"output_norm": {"threshold": {"low": 5.0, "high": 50.0, "log": True}}},
    }})
    seen = set()
    for trial, tc in sample(cfg):
        seen.add(tc.gate)
        assert isinstance(tc, TrialConfig)
        if tc.gate == "dense":
            assert tc.knobs == {}
            assert not any(k.endswith("threshold") for k in trial.params)
        else:
            assert tc.knobs["block_size"] in (2, 4)
            assert f"{tc.gate}.threshold" in trial.params
        if tc.gate == "output_norm":
            assert 5.0 <= tc.knobs["threshold"] <= 50.0
        if tc.gate == "input_norm":
            assert 0.01 <= tc.knobs["threshold"] <= 10.0  # the policy's default range
        assert 1e-3 <= tc.lr <= 1e-2 and tc.clip_length in (2, 4, 8)
    assert seen == {"dense", "input_norm", "output_norm"}


def test_suggest_has_no_side_effects_and_round_trips():
    cfg = parse_search_config(
        {"space": {"gate": "input_norm", "threshold": 0.5, "block_size": 4, "lr": 0.01, "clip_length": 4}}
    )
    study = optuna.create_study(directions=["maximize", "minimize"])
    tc = cfg.space.suggest(study.ask())
    assert tc == TrialConfig.from_dict(tc.to_dict())
    assert tc.knobs == {"threshold": 0.5, "block_size": 4}
    assert cfg.space.define_by_run(study.ask()) == {"trial": tc.to_dict()}


def test_gate_options_are_searched_only_when_named():
    """``reference`` / ``per_value`` are options of the norm gates: left out, trials keep the gate's default
    (absent from the trial's knobs); named in the YAML, they are sampled and reach the policy."""
    plain = parse_search_config({"space": {"gate": "input_norm"}})
    for _, tc in sample(plain, 5):
        assert set(tc.knobs) == {"threshold", "block_size"}
    cfg = parse_search_config({"space": {"gate": ["input_norm", "gumbel"], "reference": ["frame", "block"],
                                         "gates": {"input_norm": {"per_value": True}}}})
    seen = set()
    for trial, tc in sample(cfg):
        if tc.gate == "gumbel":
            assert "reference" not in tc.knobs
            continue
        seen.add(tc.knobs["reference"])
        assert tc.knobs["per_value"] is True
        assert trial.params["input_norm.reference"] == tc.knobs["reference"]
    assert seen == {"frame", "block"}


@pytest.mark.parametrize("raw, message", [
    ({"space": {"gate": "input_norm", "reference": "blocks"}},
     r"^space.reference: 'blocks' is not one of frame, block"),
    ({"space": {"gate": "input_norm", "per_value": "yes"}}, r"^space.per_value: expected true or false, got 'yes'"),
    ({"space": {"gate": "gumbel", "reference": "block"}},
     r"^space.reference: not taken by any searched gate \(gumbel\)"),
    ({"space": {"gate": "input_norm", "gates": {"input_norm": {"per_value": [False, True]}}}},
     r"^space.gates.input_norm.per_value: true or false, not both"),
    ({"trails": 3}, r"^trails: unknown key"),
    ({"trials": "many"}, r"^trials: expected int, got 'many'"),
    ({"trials": 0}, r"^trials: must be >= 1"),
    ({"objective": "energy"}, r"^objective: 'energy' is not one of latency, macs"),
    ({"space": {"gate": ["dense", "gumbal"]}}, r"^space.gate: unknown gate 'gumbal'; known: .*input_norm"),
    ({"space": {"tresh": 1}}, r"^space.tresh: unknown parameter"),
    ({"space": {"gate": "dense", "threshold": 0.1}}, r"^space.threshold: not taken by any searched gate \(dense\)"),
    ({"space": {"gate": ["input_norm"], "block_size": [3]}}, r"^space.block_size\[0\]: 3 is not one of 1, 2, 4, 8"),
    ({"space": {"gate": ["input_norm"], "threshold": {"low": -1.0, "high": 1.0}}},
     r"^space.threshold.low: must be >= 0.0"),
    ({"space": {"gate": ["input_norm"], "threshold": {"low": 0.0, "high": 1.0, "log": True}}}, r"needs low > 0"),
    ({"space": {"gate": ["input_norm"], "threshold": {"low": 2.0, "high": 1.0}}}, r"low 2.0 is greater than high 1.0"),
    ({"space": {"lr": {"low": 0.1, "hi": 0.2}}}, r"^space.lr: unknown range key 'hi'"),
    ({"space": {"clip_length": 5}}, r"^space.clip_length: 5 is not one of 2, 4, 8, 16"),
    ({"model": {"from_scratch": True}, "space": {"epochs": 2.5}}, r"^space.epochs: expected int, got 2.5"),
    ({"space": {"epochs": 2}}, r"^space.epochs: trials start from the trained dense network; set model.finetune_"),
    ({"space": {"width": {"low": 0.5, "high": 1.0}}}, r"^space.width: trials share one trained network per width"),
    ({"model": {"wieghts": "w.pt"}}, r"^model.wieghts: unknown key; known: weights, prefix_map"),
    ({"model": {"weights": "absent.pt"}}, r"^model.weights: absent.pt: no such file"),
    ({"model": {"prefix_map": {"fc.": None}}}, r"^model.prefix_map: only used with model.weights"),
    ({"model": {"finetune_epochs": -1}}, r"^model.finetune_epochs: must be >= 0"),
    ({"model": {"train": {"epochs": 0}}}, r"^model.train.epochs: must be >= 1"),
    ({"model": {"train": {"lr": "fast"}}}, r"^model.train.lr: expected float"),
    ({"plugins": "my_models.py"}, r"^plugins: expected a list"),
    ({"space": {"backbone": "resnet9000"}}, r"^space.backbone: unknown backbone 'resnet9000'"),
    ({"space": {"task": ["classification", "heatmap"]}}, r"^space.task: one task per search"),
    ({"space": {"gate": ["dense"], "gates": {"input_norm": {"threshold": 1.0}}}},
     r"^space.gates.input_norm: gate 'input_norm' is not searched"),
    ({"space": {"gate": ["input_norm"], "gates": {"input_norm": {"beta": 1.0}}}},
     r"^space.gates.input_norm.beta: gate 'input_norm' does not take 'beta'"),
    ({"space": {"backbone": ["resnet18_tiny", "tiny"], "gate": ["input_norm", "dstep"]}},
     r"^space.gate: backbone 'tiny' cannot take gate 'dstep': .*residual blocks"),
    ({"space": {"backbone": "r2plus1d_tiny", "gate": ["vared2", "gumbel"]}},
     r"^space.gate: backbone 'r2plus1d_tiny' cannot take gate 'gumbel': .*Conv2d"),
    ({"space": {"backbone": "r2plus1d_tiny", "task": "heatmap"}}, r"^space.backbone: 'r2plus1d_tiny': .*heatmap"),
    ({"space": {"backbone": ["tiny", "r2plus1d_tiny"], "gate": ["dstep", "input_norm"]}}, r"^space.gate: backbone"),
    ({"data": {"synthetic": {"heigth": 64}}}, r"^data.synthetic: .*heigth"),
    ({"data": {"train_clips": 0}}, r"^data.train_clips: must be >= 1"),
    ({"evaluation": {"frames": "16"}}, r"^evaluation.frames: expected int"),
    ({"evaluation": {"reference_every": -1}}, r"^evaluation.reference_every: expected clip_length or an int >= 0"),
    ({"evaluation": {"reference_every": "often"}}, r"^evaluation.reference_every"),
])
def test_validation_errors_name_the_key(raw, message):
    from gatesearch.plugins import PluginError

    with pytest.raises((SpaceError, PluginError), match=message) as e:
        parse_search_config(raw)
    assert "\n" not in str(e.value)


def test_all_gates_by_default_means_those_that_fit_every_backbone():
    """Leaving ``gate`` out searches every registered gate that can convert the searched backbones."""
    from gatesearch.policies import POLICIES

    assert set(parse_search_config({"space": {"backbone": "resnet18_tiny"}}).space.gate.values) == set(POLICIES)
    assert set(parse_search_config({"space": {"backbone": "r2plus1d_tiny"}}).space.gate.values) == {"dense", "vared2"}
    assert "dstep" not in parse_search_config({"space": {"backbone": ["tiny", "resnet18_tiny"]}}).space.gate.values


def test_yaml_file_errors(tmp_path):
    with pytest.raises(SpaceError, match="no such file"):
        load_search_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_search_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("trials: 3\nspace:\n  gate: [dense]\n")
    assert load_search_config(ok, trials=5).trials == 5


def test_builtin_quick_config_is_valid():
    from gatesearch.cli import BUILTIN_CONFIGS

    cfg = load_search_config(BUILTIN_CONFIGS / "quick.yaml")
    assert cfg.trials >= 12 and set(cfg.space.gate.values) >= {"dense", "input_norm", "output_norm"}


def test_reference_every():
    assert parse_search_config({}).evaluation.reset_every(4) == 4
    assert parse_search_config({"evaluation": {"reference_every": 8}}).evaluation.reset_every(4) == 8
    assert parse_search_config({"evaluation": {"reference_every": 0}}).evaluation.reset_every(4) is None


def test_warm_start_points_become_the_optuna_params_of_their_configuration():
    cfg = parse_search_config({"space": {"gate": ["dense", "input_norm"], "block_size": [2, 4]},
                               "model": {"finetune_all": True},  # so that lr is sampled for a norm gate too
                               "warm_start": [{"gate": "dense"},
                                              {"gate": "input_norm", "threshold": 1.0, "block_size": 4, "lr": 0.005}]})
    assert cfg.warm_start[1] == {"gate": "input_norm", "threshold": 1.0, "block_size": 4, "lr": 0.005}
    params = cfg.space.enqueue_params(cfg.warm_start[1], "warm_start[1]")
    assert params == {"gate": "input_norm", "input_norm.threshold": 1.0, "input_norm.block_size": 4, "lr": 0.005}
    study = optuna.create_study(directions=["maximize", "minimize"])
    for point in cfg.warm_start:
        study.enqueue_trial(cfg.space.enqueue_params(point, "w"))
    first, second = (cfg.space.suggest(study.ask()) for _ in range(2))
    assert first.gate == "dense"
    assert (second.gate, second.knobs["threshold"], second.knobs["block_size"], second.lr) == \
        ("input_norm", 1.0, 4, 0.005)


@pytest.mark.parametrize("point, message", [
    ({"gate": "gumbel"}, "warm_start[0].gate: expected one of the searched gates (dense, input_norm), got 'gumbel'"),
    ({"threshold": 1.0}, "warm_start[0].gate: expected one of the searched gates"),
    ({"gate": "input_norm", "threshold": 1e9}, "warm_start[0].threshold: 1000000000.0 is outside the searched domain"),
    ({"gate": "dense", "threshold": 1.0}, "warm_start[0].threshold: not a parameter of gate 'dense' in this search"),
    ({"gate": "input_norm", "block_size": "4"}, "warm_start[0].block_size: expected int"),
])
def test_bad_warm_start_is_one_line_naming_the_point(point, message):
    with pytest.raises(SpaceError) as e:
        parse_search_config({"space": {"gate": ["dense", "input_norm"]}, "warm_start": [point]})
    assert str(e.value).startswith(message)
