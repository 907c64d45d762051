"""lorakit.lora_config: LoRA's knobs in one object. Checked when built (the loose arguments' messages), the same
layers from loose arguments, a LoRAConfig or a peft LoraConfig, and clear errors for conflicts and for peft
settings the kit does not build."""

import copy
import dataclasses
import warnings

import pytest
import torch
from peft import LoraConfig
from torch import nn

from lorakit import dora, loftq, lora, qlora
from lorakit.lora import LoRAConfig, lora_scaling


class Tiny(nn.Module):
    """Three named linear layers, 64 wide (a multiple of NF4's block of 64)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj, self.v_proj, self.up_proj = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 128)

    def forward(self, x):
        return self.up_proj(self.q_proj(x) + self.v_proj(x))


def peft_config(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig(**kw)


KNOBS = dict(r=4, alpha=16, dropout=0.1, use_rslora=True)
CONFIG = LoRAConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=["v_proj", "q_proj"])
PEFT = peft_config(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=["q_proj", "v_proj"])


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def all_equal(group, x) -> bool:
    """The same state (B drawn non-zero under one seed, so the adapter path counts) and the same output."""
    for m in group:
        torch.manual_seed(2)
        for mod in m.modules():
            if isinstance(mod, lora.LoRALinear):
                nn.init.normal_(mod.lora_B.weight)
        m.eval()
    return all(same_state(group[0], m) and torch.equal(group[0](x), m(x)) for m in group[1:])


# ------------------------------------------------------------------------------------- the object itself

@pytest.mark.parametrize("loose, field, words", [
    (dict(r=0), dict(r=0), "r (the LoRA rank) must be a positive integer"),
    (dict(r=2.5), dict(r=2.5), "r (the LoRA rank) must be a positive integer"),
    (dict(alpha=0), dict(lora_alpha=0), "alpha must be a positive number"),
    (dict(dropout=1.0), dict(lora_dropout=1.0), "dropout is a probability in [0, 1)"),
])
def test_bad_values_get_the_loose_arguments_messages(loose, field, words):
    with pytest.raises(ValueError) as from_config:
        LoRAConfig(**field)
    with pytest.raises(ValueError) as from_layer:
        lora.LoRALinear(nn.Linear(8, 8), **loose)
    assert words in str(from_config.value) and str(from_config.value) == str(from_layer.value)


@pytest.mark.parametrize("targets, error, words", [
    ([], ValueError, "target_modules is empty"), (5, TypeError, "a list of module names"),
    (["q_proj", ""], TypeError, "a list of module names")])
def test_bad_target_modules_are_explained(targets, error, words):
    with pytest.raises(error, match=words):
        LoRAConfig(target_modules=targets)


def test_use_rslora_is_true_or_false_and_the_config_is_frozen():
    with pytest.raises(TypeError, match="use_rslora is True or False"):
        LoRAConfig(use_rslora="yes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONFIG.r = 8
    with pytest.raises(ValueError, match="positive integer"):   # a changed copy is checked again
        dataclasses.replace(CONFIG, r=0)


def test_defaults_are_the_functions_defaults_and_scaling_is_lora_scaling():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.target_modules) == (8, 8, 0.0, False, None)
    layer = lora.LoRALinear(nn.Linear(8, 8))
    assert (layer.r, layer.lora_alpha, layer.scaling, layer.use_rslora) == (8, 8, cfg.scaling, False)
    assert CONFIG.scaling == lora_scaling(4, 16, True) == 8.0
    assert LoRAConfig(r=4, lora_alpha=16).scaling == 4.0


def test_peft_round_trip_and_target_modules_kept_sorted_as_peft_keeps_a_set():
    assert CONFIG.target_modules == ("q_proj", "v_proj")
    assert LoRAConfig.from_peft(PEFT) == CONFIG
    theirs = CONFIG.to_peft()
    assert isinstance(theirs, LoraConfig) and LoRAConfig.from_peft(theirs) == CONFIG
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, theirs.use_rslora) == (4, 16, 0.1, True)
    assert CONFIG.to_peft(use_dora=True).use_dora
    regex = LoRAConfig(target_modules=r".*\.(q|v)_proj")
    assert LoRAConfig.from_peft(regex.to_peft()) == regex


# ---------------------------------------------------------------- the same layers, whichever way it is said

def test_lora_layer_and_injection_are_bit_identical_from_loose_args_lora_config_and_peft_config():
    x = torch.randn(3, 64)
    layers = []
    for kw in (KNOBS, dict(config=CONFIG), dict(config=PEFT)):
        torch.manual_seed(0)
        layers.append(lora.LoRALinear(nn.Linear(64, 64), **kw))
    models, counts = [], []
    for args, kw in (((["q_proj", "v_proj"], 4, 16, 0.1, True), {}), ((), dict(config=CONFIG)),
                     ((), dict(config=PEFT))):
        model = Tiny()
        torch.manual_seed(1)
        counts.append(lora.inject_lora(model, *args, **kw))
        models.append(model)
    assert all_equal(layers, x) and all_equal(models, x)
    assert len(set(counts)) == 1 and layers[0].scaling == layers[2].scaling == 8.0


def test_qlora_layer_and_injection_are_bit_identical():
    x = torch.randn(3, 64)
    lin = nn.Linear(64, 64)
    made = []
    for make in (lambda: qlora.QLoRALinear(copy.deepcopy(lin), 4, 16, 0.1, use_rslora=True),
                 lambda: qlora.QLoRALinear(copy.deepcopy(lin), config=CONFIG),
                 lambda: qlora.QLoRALinear.from_linear(copy.deepcopy(lin), config=PEFT)):
        torch.manual_seed(0)
        made.append(make())
    models = []
    for kw in (dict(target_modules=["q_proj", "v_proj"], r=4, alpha=16, dropout=0.1, use_rslora=True),
               dict(config=CONFIG), dict(config=PEFT)):
        model = Tiny()
        torch.manual_seed(1)
        qlora.quantize_and_inject(model, compute_dtype=torch.float32, **kw)
        models.append(model)
    assert all_equal(made, x) and all_equal(models, x)


def test_dora_is_bit_identical_and_takes_peft_use_dora():
    x = torch.randn(3, 64)
    dora_peft = peft_config(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                            target_modules=["q_proj", "v_proj"], use_dora=True)
    layers, models = [], []
    for kw in (KNOBS, dict(config=CONFIG), dict(config=PEFT), dict(config=dora_peft)):
        torch.manual_seed(0)
        layers.append(dora.DoRALinear(nn.Linear(64, 64), **kw))
        model = Tiny()
        torch.manual_seed(1)
        dora.inject_dora(model, **({"target_modules": ["q_proj", "v_proj"]} | kw if "r" in kw else kw))
        models.append(model)
    assert all_equal(layers, x) and all_equal(models, x)


def test_loftq_is_bit_identical_and_reads_r_and_alpha_over_r():
    W = torch.randn(64, 128)
    cfg = LoRAConfig(r=4, lora_alpha=8)                                  # scaling 2
    loose, ours, theirs = (loftq.loftq_init(W, 4, 2.0, num_iter=2), loftq.loftq_init(W, config=cfg, num_iter=2),
                           loftq.loftq_init(W, num_iter=2, config=peft_config(r=4, lora_alpha=8)))
    for other in (ours, theirs):
        assert torch.equal(loose.packed, other.packed) and torch.equal(loose.lora_A, other.lora_A)
        assert torch.equal(loose.lora_B, other.lora_B) and loose.errors == other.errors
    one = loftq.loftq_iteration(W, None, None, 4, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(one[2:], loftq.loftq_iteration(W, None, None, config=cfg)[2:]))
    assert all(torch.equal(a, b) for a, b in zip(loftq.low_rank(W, 4, 2.0), loftq.low_rank(W, config=cfg)))


def test_a_peft_loftq_config_gives_its_iterations_and_bits():
    W = torch.randn(64, 128)
    cfg = peft_config(r=4, lora_alpha=4)
    cfg.init_lora_weights, cfg.loftq_config = "loftq", {"loftq_bits": 4, "loftq_iter": 3}  # (peft asks for scipy)
    assert len(loftq.loftq_init(W, config=cfg).errors) == 3
    with pytest.raises(ValueError, match="num_iter=2 and a peft config with loftq_iter=3"):
        loftq.loftq_init(W, num_iter=2, config=cfg)
    cfg.loftq_config = {"loftq_bits": 2, "loftq_iter": 1}
    with pytest.raises(ValueError, match="4-bit NF4"):
        loftq.loftq_init(W, config=cfg)
    with pytest.raises(TypeError, match="needs the LoRA rank"):
        loftq.loftq_init(W)


# ---------------------------------------------------------------------------------------------- errors

def test_loose_arguments_that_agree_with_the_config_are_fine_and_conflicts_say_what_to_drop():
    base = nn.Linear(64, 64)
    lora.LoRALinear(copy.deepcopy(base), 4, 16, config=CONFIG)          # the same values: no conflict
    for call, words in [
        (lambda: lora.LoRALinear(copy.deepcopy(base), r=8, config=CONFIG), "drop r=8"),
        (lambda: lora.LoRALinear(copy.deepcopy(base), alpha=8, config=PEFT), "drop alpha=8"),
        (lambda: lora.inject_lora(Tiny(), ["up_proj"], config=CONFIG), "drop target_modules=['up_proj']"),
        (lambda: qlora.QLoRALinear(copy.deepcopy(base), dropout=0.0, config=CONFIG), "drop dropout=0.0"),
        (lambda: dora.inject_dora(Tiny(), use_rslora=False, config=CONFIG), "drop use_rslora=False"),
        (lambda: loftq.loftq_init(torch.randn(64, 64), scaling=1.0, config=CONFIG), "drop scaling=1.0"),
    ]:
        with pytest.raises(ValueError, match="or drop config=") as e:
            call()
        assert words in str(e.value)
    with pytest.raises(ValueError, match=r"LoRALinear got config= with r=4 and also r=8"):
        lora.LoRALinear(copy.deepcopy(base), r=8, config=CONFIG)


@pytest.mark.parametrize("setting, words", [
    (dict(use_dora=True), "use_dora=True, which lorakit's layers do not build. For DoRA use lorakit.dora"),
    (dict(bias="all"), "bias='all'"),
    (dict(init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
    (dict(init_lora_weights=False), "init_lora_weights=False"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern={'q_proj': 2}"),
    (dict(modules_to_save=["up_proj"]), "modules_to_save=['up_proj']"),
])
def test_peft_settings_the_kit_does_not_build_are_refused_by_name(setting, words):
    cfg = peft_config(r=4, target_modules=["q_proj"], **setting)
    for call in (lambda: lora.LoRALinear(nn.Linear(64, 64), config=cfg), lambda: lora.inject_lora(Tiny(), config=cfg),
                 lambda: qlora.quantize_and_inject(Tiny(), config=cfg)):
        with pytest.raises(ValueError, match="or build the model with peft's get_peft_model") as e:
            call()
        assert words in str(e.value)


def test_bookkeeping_peft_sets_is_no_setting_and_all_linear_and_other_objects_are_explained():
    cfg = peft_config(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    cfg.base_model_name_or_path, cfg.inference_mode = "some/model", True  # what get_peft_model and loading set
    assert LoRAConfig.from_peft(cfg) == LoRAConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="'all-linear' is a peft shortcut"):
        lora.inject_lora(Tiny(), config=peft_config(target_modules="all-linear"))
    with pytest.raises(TypeError, match="a lorakit.lora.LoRAConfig or a peft LoraConfig; got dict"):
        lora.LoRALinear(nn.Linear(8, 8), config={"r": 4})
