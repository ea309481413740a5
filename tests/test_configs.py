"""Every shipped config builds the network of its released checkpoint, key for key, shape for shape."""

import argparse
from pathlib import Path

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.run import configs, eps_choice
from guided_diffusion.eps_scaling import parse_eps_scale
from adm_common.errors import UsageError

CONFIGS = sorted(p.stem for p in configs.CONFIG_DIR.glob("*.yaml"))
ADM_CONFIGS = [name for name in CONFIGS if configs.load_config(name).get("kind") != "edm"]

# The ES paper (Ning et al., ICLR 2024), ADM rows: uniform lambda at 100/50/20 steps, linear at 20.
PAPER_LAMBDA = {
    "cifar10_uncond_admes": ({100: 1.017, 50: 1.017, 20: 1.017}, (0.0025, 1.0)),
    "lsun_tower64_admes": ({100: 1.006, 50: 1.007, 20: 1.011}, (0.0008, 1.0034)),
    "ffhq128_admes": ({100: 1.005, 50: 1.007, 20: 1.008}, (0.0004, 1.0042)),
    "imagenet64_cond": ({100: 1.006, 50: 1.006, 20: 1.006}, (0.0002, 1.0041)),
    "imagenet128_cond": ({100: 1.004, 50: 1.004, 20: 1.005}, (0.00022, 1.00291)),
}


def build(config):
    flags = config["flags"]
    kind = config.get("kind", "diffusion")
    with torch.device("meta"):
        if kind == "classifier":
            args = {**su.classifier_defaults(), **flags}
            return su.create_classifier(**{k: args[k] for k in su.classifier_defaults()})
        if kind == "upsampler":
            args = {**su.sr_model_and_diffusion_defaults(), **flags}
            return su.sr_create_model_and_diffusion(**{k: args[k] for k in su.sr_model_and_diffusion_defaults()})[0]
        args = {**su.model_and_diffusion_defaults(), **flags}
        return su.create_model_and_diffusion(**{k: args[k] for k in su.model_and_diffusion_defaults()})[0]


def test_there_is_a_config_for_every_released_layout(checkpoint_layouts):
    covered = {configs.load_config(name).get("layout") for name in CONFIGS}
    assert set(checkpoint_layouts) - covered == set()


@pytest.mark.parametrize("name", ADM_CONFIGS)
def test_config_builds_the_released_layout(name, checkpoint_layouts):
    config = configs.load_config(name)
    model = build(config)
    layout = config.get("layout")
    if layout is None:  # no released layout to compare with: check what the flags promise
        keys = model.state_dict()
        flags = config["flags"]
        if config.get("kind") != "classifier":
            assert keys["out.2.weight"].shape[0] == (6 if flags.get("learn_sigma") else 3)
            assert ("label_emb.weight" in keys) == bool(flags.get("class_cond"))
        assert keys["time_embed.0.weight"].shape[1] == flags.get("num_channels", flags.get("classifier_width"))
        return
    expected = checkpoint_layouts[layout]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_lambdas_parse(name):
    config = configs.load_config(name)
    for kind, table in (config.get("eps_scale") or {}).items():
        for steps, value in table.items():
            parse_eps_scale(value).validate(int(steps))


@pytest.mark.parametrize("name", sorted(PAPER_LAMBDA))
def test_config_lambdas_are_the_papers(name):
    uniform, (k, b) = PAPER_LAMBDA[name]
    config = configs.load_config(name)
    for steps, value in uniform.items():
        assert parse_eps_scale(config["eps_scale"]["uniform"][steps]).b == pytest.approx(value, abs=1e-12)
    linear = parse_eps_scale(config["eps_scale"]["linear"][20])
    assert (linear.k, linear.b) == pytest.approx((k, b), abs=1e-12)


# The ES paper's EDM table: lambda for Heun at 18, 11, 7 noise levels and Euler at 35, 21, 13 steps.
EDM_LAMBDA = {
    "edm_cifar10_32x32_uncond_vp": {"heun": {18: 1.0005, 11: 0.9985, 7: 1.0060}, "euler": {35: 1.0034, 21: 1.0043, 13: 1.0048}},
    "edm_cifar10_32x32_cond_vp": {"heun": {18: 1.0006, 11: 0.9983, 7: 1.0070}, "euler": {35: 1.0035, 21: 1.0045, 13: 1.0051}},
}


@pytest.mark.parametrize("name", sorted(EDM_LAMBDA))
def test_edm_config_lambdas_are_the_papers(name):
    config = configs.load_config(name)
    for solver, table in EDM_LAMBDA[name].items():
        for steps, value in table.items():
            assert parse_eps_scale(config["eps_scale"][solver][steps]).b == pytest.approx(value, abs=1e-12)


def test_paper_lambda_is_used_unless_the_flag_is_given():
    config = configs.load_config("cifar10_uncond_admes")
    schedule, source = eps_choice.sampling_eps_scale(None, config, 100)
    assert schedule.b == pytest.approx(1.017) and source.startswith("paper")
    schedule, source = eps_choice.sampling_eps_scale("1.0", config, 100)
    assert schedule.is_identity and source == "--eps_scale"
    schedule, _ = eps_choice.sampling_eps_scale("paper:linear", config, 20)
    assert (schedule.k, schedule.b) == pytest.approx((0.0025, 1.0))
    schedule, source = eps_choice.sampling_eps_scale(None, config, 37)
    assert schedule.is_identity and source.startswith("default")
    with pytest.raises(UsageError, match="no published uniform lambda for 37 steps"):
        eps_choice.sampling_eps_scale("paper", config, 37)


def test_edm_lambda_is_read_from_the_solvers_table():
    config = configs.load_config("edm_cifar10_32x32_cond_vp")
    schedule, source = eps_choice.sampling_eps_scale(None, config, 18, table="heun")
    assert schedule.b == pytest.approx(1.0006) and "heun, 18 steps" in source  # ES paper, EDM cond, Heun 35 NFE
    assert eps_choice.sampling_eps_scale("paper", config, 35, table="euler")[0].b == pytest.approx(1.0035)
    with pytest.raises(UsageError, match="no published euler lambda for 18 steps"):
        eps_choice.sampling_eps_scale("paper", config, 18, table="euler")


def test_typed_flags_win_over_the_config_even_abbreviated_or_aliased():
    parser = su.argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(su.model_and_diffusion_defaults(), num_samples=10, batch_size=16))
    su.add_sampling_args(parser)
    args, _, typed = configs.parse_args_with_config(
        parser, ["--config", "imagenet64_cond", "--num_sample", "7", "--timestep_resp=20", "--eps_scaler", "1.01"])
    # the config's sample_flags say num_samples 100, timestep_respacing 250, batch_size 4
    assert (args.num_samples, args.timestep_respacing, args.batch_size) == (7, "20", 4)
    assert {"num_samples", "timestep_respacing", "eps_scaler", "config"} <= typed and "batch_size" not in typed
    # with the model flags' ADM-ES key, --eps_scaler is ADM-ES's number; it decides lambda over the config
    assert args.eps_scaler == 1.01 and eps_choice.eps_scale_flag(args) == "1.01"
    plain = su.argparse.ArgumentParser()
    su.add_sampling_args(plain)  # no model flags (the diffusers script): --eps_scaler is --eps_scale's alias
    args, _, typed = configs.parse_args_with_config(plain, ["--eps_scaler", "linear:k=0.001,b=1.0"])
    assert args.eps_scale == "linear:k=0.001,b=1.0" and "eps_scale" in typed


def test_unknown_config_is_one_clear_error():
    with pytest.raises(UsageError, match="config 'imagenet65' not found; known configs: .*imagenet64_cond"):
        configs.load_config("imagenet65")


def test_bad_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("flags: [unclosed")
    with pytest.raises(UsageError, match="not valid YAML"):
        configs.load_config(str(bad))
    no_flags = tmp_path / "noflags.yaml"
    no_flags.write_text("name: x\n")
    with pytest.raises(UsageError, match="no 'flags' mapping"):
        configs.load_config(str(no_flags))


def test_configs_and_shipped_weights_are_package_data():
    package = Path(su.__file__).resolve().parent
    assert configs.CONFIG_DIR == package / "configs" and (configs.CONFIG_DIR / "README.md").is_file()
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(model_path=""))
    su.add_sampling_args(parser)
    for name in ("digits_uncond", "digits_cond"):
        args, config, _ = configs.parse_args_with_config(parser, ["--config", name])
        assert Path(args.model_path) == package / "assets" / f"{name}.safetensors"
        assert Path(args.model_path).is_file()
    classifier = configs.load_config("digits_classifier")
    assert (package / classifier["checkpoint_path"]).is_file()
    args, _, _ = configs.parse_args_with_config(parser, ["--config", "digits_uncond", "--model_path", "mine.pt"])
    assert args.model_path == "mine.pt"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_with_published_fids_records_the_protocol_of_each_cell(name):
    config = configs.load_config(name)
    protocol = config.get("protocol")
    assert (protocol is not None) == bool(config.get("paper_fid"))
    if protocol is None:
        return
    es = config["paper_fid"]["es"]
    published = ({f"{solver}_{steps}" for solver, table in es.items() for steps in table}
                 if config["kind"] == "edm" else {str(k) for k in es})
    assert {str(k) for k in protocol["cells"]} == published and str(protocol["default_cell"]) in published
    assert protocol["num_samples"] == 50000  # every FID of the ES paper is of 50,000 images
    # EDM's protocol: rounded pixels, the minimum over 3 seed sets; ADM's: floored pixels, one set
    edm = config["kind"] == "edm"
    assert (protocol["quantization"], protocol["seed_sets"], protocol["aggregate"]) == (
        ("edm", 3, "minimum") if edm else ("adm", 1, "single"))
    assert protocol["labels"] == ("uniform" if config["flags"]["class_cond"] else "none")
    for key, cell in protocol["cells"].items():
        if edm:
            assert cell["network_evaluations"] == (2 * cell["steps"] - 1 if cell["solver"] == "heun" else cell["steps"])
        else:
            assert cell["timestep_respacing"] == str(cell["steps"]) and str(key).startswith(str(cell["steps"]))
