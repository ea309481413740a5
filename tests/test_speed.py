"""Speed-up switches (guided_diffusion/run/speed.py) against ADM's and ADM-ES's reference vectors, and
the measuring code of benchmarks/ against independent counts.

torch.compile is checked in the benchmark only: compiling even the tiny reference UNet took
4.7 minutes on the 2-core CI machine. CUDA graphs and float16 need a GPU: their test here skips
without one, and benchmarks/gpu_check.sh checks them on the real configurations.
"""

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from guided_diffusion.run import speed
from guided_diffusion.run.speed import AUTOCAST_REL_TOL, FLOAT32_ATOL, optimize_for_sampling, parse_autocast_dtype
from adm_reference import assert_loop_close, golden_diffusion, golden_network
from benchmarks import bench_sampling, measure, report, variants

FLOAT32_SWITCHES = [
    dict(fused_attention=False, inference_mode=False),  # plain eager float32
    dict(),  # the defaults: fused attention, inference mode
    dict(channels_last=True),
    dict(channels_last=True, fused_attention=False, inference_mode=False),
]


def reference_network(adm_golden, name):
    """A private copy of a reference network (switches may convert it in place), its case, its kwargs."""
    case = adm_golden["unets"][name]
    kwargs = {"y": case["y"]} if case.get("y") is not None else {}
    return copy.deepcopy(golden_network(name)), case, kwargs


class OperatorLog(TorchDispatchMode):
    """Names of the aten operators that run (after composite operators have decomposed)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("switches", FLOAT32_SWITCHES, ids=lambda s: "+".join(f"{k}={v}" for k, v in s.items()) or "defaults")
@pytest.mark.parametrize("name", ["u32_new_order", "c32_legacy_heads", "u32_plain"])
def test_float32_switches_reproduce_adm_outputs(adm_golden, name, switches):
    net, case, kwargs = reference_network(adm_golden, name)
    out = optimize_for_sampling(net, **switches)(case["x"], case["t"], **kwargs)
    assert out.dtype == torch.float32 and out.is_contiguous() and not out.is_inference()
    torch.testing.assert_close(out, case["out"], atol=FLOAT32_ATOL, rtol=0)


def test_bf16_autocast_runs_in_reduced_precision_within_its_documented_tolerance(adm_golden):
    net, case, kwargs = reference_network(adm_golden, "c32_legacy_heads")
    out = optimize_for_sampling(net, autocast_dtype="bf16")(case["x"], case["t"], **kwargs)
    rel = ((out - case["out"]).norm() / case["out"].norm()).item()
    assert out.dtype == torch.float32
    # bfloat16 keeps 8 bits: an error far above float32 rounding shows it really ran in bfloat16.
    assert 1e-4 < rel <= AUTOCAST_REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("fused", [True, False])
def test_fused_attention_switch_chooses_the_kernel(adm_golden, fused):
    net, case, kwargs = reference_network(adm_golden, "u32_new_order")
    # Outside inference mode the dispatcher shows which kernel scaled_dot_product_attention picks.
    model = optimize_for_sampling(net, fused_attention=fused, inference_mode=False)
    with OperatorLog() as log:
        out = model(case["x"], case["t"], **kwargs)
    fused_kernels = {n for n in log.names if n.startswith("aten._scaled_dot_product_")}
    if fused:
        assert fused_kernels and "aten.bmm.default" not in log.names
    else:
        # The math backend: softmax(q k^T / sqrt(d)) v as two batched matrix products.
        assert not fused_kernels and "aten.bmm.default" in log.names
    torch.testing.assert_close(out, case["out"], atol=FLOAT32_ATOL, rtol=0)


@pytest.mark.parametrize("inference", [True, False])
def test_inference_mode_switch_and_an_ordinary_result(adm_golden, inference):
    net, case, kwargs = reference_network(adm_golden, "u32_new_order")
    seen = []
    net.input_blocks[0].register_forward_hook(
        lambda *_: seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    )
    out = optimize_for_sampling(net, inference_mode=inference)(case["x"], case["t"], **kwargs)
    assert seen == [(inference, False)]
    # Classifier guidance differentiates through the samples: the result must be an ordinary tensor.
    assert not out.is_inference()
    out.requires_grad_(True).sum().backward()


def test_channels_last_converts_the_weights_and_hands_back_the_standard_layout(adm_golden):
    net, case, kwargs = reference_network(adm_golden, "c32_legacy_heads")
    layouts = []
    net.input_blocks[0].register_forward_hook(
        lambda module, args, _: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    out = optimize_for_sampling(net, channels_last=True)(case["x"], case["t"], **kwargs)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert layouts == [True] and out.is_contiguous()
    torch.testing.assert_close(out, case["out"], atol=FLOAT32_ATOL, rtol=0)


@pytest.mark.parametrize("which", ["adm", "admes"])
@pytest.mark.parametrize("index", [0, 1])
def test_sampling_loops_with_switches_reproduce_adm_and_admes(adm_golden, admes_golden, which, index):
    case = (adm_golden if which == "adm" else admes_golden)["diffusion"][index]
    name = "u32_new_order" if case["learn_sigma"] else "u32_plain"
    model = optimize_for_sampling(copy.deepcopy(golden_network(name)), channels_last=True)
    diffusion = golden_diffusion(case, eps_scale=case.get("eps_scale"))
    sample = diffusion.ddim_sample_loop(model, case["x"].shape, noise=case["x"], clip_denoised=True, eta=0.0)
    assert_loop_close(sample, case["ddim_eta0"], f"{which} case {index}")


def test_bad_arguments_raise_one_clear_error(adm_golden):
    net, _, _ = reference_network(adm_golden, "u32_new_order")
    with pytest.raises(ValueError, match="model.eval"):
        optimize_for_sampling(copy.deepcopy(net).train())
    with pytest.raises(ValueError, match="CUDA device"):
        optimize_for_sampling(net, cuda_graphs=True)
    with pytest.raises(ValueError, match="float16, bfloat16 or None"):
        optimize_for_sampling(net, autocast_dtype="int8")
    with pytest.raises(ValueError, match="torch.nn.Module"):
        optimize_for_sampling(lambda x, t: x)
    half = copy.deepcopy(net)
    half.convert_to_fp16()
    with pytest.raises(ValueError, match="convert_to_fp32"):
        optimize_for_sampling(half, autocast_dtype=torch.bfloat16)
    assert parse_autocast_dtype("fp16") is torch.float16 and parse_autocast_dtype("bfloat16") is torch.bfloat16
    assert parse_autocast_dtype(None) is None and parse_autocast_dtype("float32") is None
    assert parse_autocast_dtype("None") is None and parse_autocast_dtype("FP32") is None  # as typed on a command line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh checks them)")
def test_cuda_graphs_replay_new_inputs_and_new_shapes(adm_golden):
    net, case, kwargs = reference_network(adm_golden, "c32_legacy_heads")
    net = net.cuda()
    eager = optimize_for_sampling(copy.deepcopy(net), fused_attention=False, inference_mode=False)
    graphed = optimize_for_sampling(net, cuda_graphs=True)
    x, t, y = case["x"].cuda(), case["t"].cuda(), kwargs["y"].cuda()
    with torch.backends.cudnn.flags(allow_tf32=False):
        for inputs in [(x, t, y), (-x, t.flip(0), y.flip(0)), (x[:1], t[:1], y[:1])]:
            out = graphed(inputs[0], inputs[1], y=inputs[2])
            torch.testing.assert_close(out, eager(inputs[0], inputs[1], y=inputs[2]), atol=FLOAT32_ATOL, rtol=0)
    assert len(graphed._graphs) == 2


# ---------------------------------------------------------------- the benchmark's measuring code


def test_flop_count_equals_an_independent_count_from_layer_shapes():
    workload = measure.Workload.load("tiny")
    counted = workload.flops_per_image()
    model = workload.network(torch.device("cpu"))
    total = []

    def conv_or_linear(module, args, out):
        weight = module.weight
        per_output = weight[0].numel()  # input channels per group x kernel size
        total.append(2 * out.numel() * per_output)

    def attention(module, args, out):
        qkv = args[0]
        batch, width, tokens = qkv.shape
        channels = width // 3  # all heads together
        total.append(2 * 2 * batch * tokens * tokens * channels)  # q k^T and (weights) v

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(conv_or_linear)
        elif type(module).__name__ in ("QKVAttention", "QKVAttentionLegacy"):
            module.register_forward_hook(attention)
    x, t, kwargs = workload.inputs(3, torch.device("cpu"))
    with torch.no_grad():
        model(x, t, **kwargs)
    assert counted["total"] == sum(total) / 3 > 0
    assert counted["parameters"] == sum(p.numel() for p in model.parameters())


def test_output_comparison_applies_each_tolerance():
    ref = torch.linspace(-1, 1, 1000)
    assert variants.compare_outputs(ref + 5e-5, ref, "float32")["equal"]
    assert not variants.compare_outputs(ref + 2e-4, ref, "float32")["equal"]
    assert variants.compare_outputs(ref * 1.02, ref, "bfloat16")["equal"]  # relative error 2e-2
    assert not variants.compare_outputs(ref * 1.02, ref, "float16")["equal"]
    nan = ref.clone()
    nan[0] = float("nan")
    assert not variants.compare_outputs(nan, ref, "bfloat16")["equal"]


def test_variant_names_parse_and_refuse_nonsense():
    variant = variants.Variant.parse("sdpa+channels_last+bf16")
    assert variant.switches == {"sdpa", "channels_last", "bf16"} and variant.precision == "bfloat16"
    assert variants.Variant.parse("adm_fp16+graphs").precision == "float16"
    assert variants.Variant.parse("graphs").skip_reason(torch.device("cpu")) is not None
    assert variants.Variant.parse("sdpa").skip_reason(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown switch 'turbo'"):
        variants.Variant.parse("sdpa+turbo")
    with pytest.raises(ValueError, match="more than one"):
        variants.Variant.parse("bf16+fp16")
    with pytest.raises(ValueError, match="start with eager"):
        variants.parse_variants("sdpa,eager")


def test_peak_memory_sees_an_allocation_of_known_size():
    with measure.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20)  # 256 MiB, every page written
        del block
    assert memory.record["peak_mib"] - memory.record["before_mib"] >= 250


def test_sampling_measurement_runs_the_real_loop_and_counts_network_time():
    workload = measure.Workload.load("tiny")
    base = workload.network(torch.device("cpu"))
    entry, samples = measure.measure_sampling(workload, base, variants.Variant.parse("eager"), 2, 3, torch.device("cpu"))
    # The same images as the plain loop with the same per-image noise.
    from guided_diffusion.image_noise import ImageNoise, image_labels

    y = image_labels(0, [0, 1], workload.flags["num_classes"])
    expected = workload.diffusion(3).p_sample_loop(base, samples.shape, model_kwargs={"y": y}, generator=ImageNoise(0, [0, 1]))
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=0)
    assert entry["network_calls"] == 3
    assert isinstance(entry["network_seconds"], float) and isinstance(entry["seconds"], float)


def test_cpu_target_is_judged_against_the_matmul_kernels_of_the_same_rounds():
    row = dict(config="cifar10_uncond_admes", batch=16, precision="float32", variant="sdpa", tflops=0.09,
               fraction_of_fp32_peak=0.9, window_peak=dict(tflops=dict(mm=0.1, conv1x1=0.11, conv3x3=0.12)))
    lines = report.target_lines(dict(forward=[row], machine=dict(cpu="x")))
    assert "torch.mm (MKL sgemm) timed in the same rounds: 90% (sdpa): met." in lines[0]
    assert "1x1-convolution GEMM timed in the same rounds: 82% (sdpa): NOT met." in lines[1]
    assert lines[2].endswith("reached 75% of it.")


def test_cpu_peak_probe_counts_each_kernels_flops(monkeypatch):
    probe = measure.CpuPeakProbe(n=64)
    seconds = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])  # each kernel's (start, end)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(seconds))
    probe.sample()
    assert probe.best["mm"] == pytest.approx(2 * 64**3 / 2 / 1e12)
    assert probe.best["conv1x1"] == pytest.approx(2 * 4096 * 1024 * 1024 / 1 / 1e12)
    assert probe.best["conv3x3"] == pytest.approx(2 * 16 * 16 * 16 * 256 * 256 * 9 / 4 / 1e12)
    assert probe.record()["peak_tflops"] == probe.best["conv1x1"]  # the matmul kernels only


def test_script_check_rows_render_as_a_table():
    rows = [dict(variant="plain", batch=4, seconds=8.3, ok=True, bytes_equal=True, max_abs_uint8_diff=0,
                 mean_abs_uint8_diff=0.0),
            dict(variant="cuda_graphs", batch=4, seconds=1.0, ok=False, error="error: --cuda_graphs True needs a CUDA GPU")]
    text = report.render_markdown(dict(title="t", script_checks=rows))
    assert "| plain | 4 | 8.3 | yes | yes | 0 | 0 |  |" in text
    assert "| cuda_graphs | 4 | 1 | NO | - | - | - | error: --cuda_graphs True needs a CUDA GPU |" in text


def test_strip_flags_removes_both_spellings():
    argv = ["run", "--processes", "2", "--threads=1", "--json", "a.json", "--configs=tiny", "--markdown=m.md"]
    stripped = bench_sampling._strip_flags(argv, ("--processes", "--threads", "--json", "--markdown"))
    assert stripped == ["run", "--configs=tiny"]


def test_processes_run_the_same_measurement_at_once_and_add_up_the_machine(tmp_path):
    bench_sampling.main(["run", "--configs=tiny", "--batch_sizes=2", "--variants=eager", "--repeats=1", "--min_seconds=0",
            "--device=cpu", "--processes=2", f"--json={tmp_path / 'r.json'}", f"--markdown={tmp_path / 'r.md'}"])
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["processes"] == 2 and len(record["runs"]) == 2
    rates = [run["forward"][0]["images_per_s"] for run in record["runs"]]
    assert record["total_images_per_s"]["tiny batch 2 eager"] == pytest.approx(sum(rates))
    assert all(run["machine"]["torch_threads"] == record["threads"] for run in record["runs"])
    assert "## Process 1: " in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        bench_sampling.main(["run", "--configs=tiny", "--processes=0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("probes,native", [
    ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False),  # an AVX2-only CPU
    ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True),
    ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True),
    ({}, True),  # a torch without the probes: no warning rather than a false one
])
def test_bf16_autocast_on_a_cpu_without_bfloat16_hardware_is_warned_of(monkeypatch, capsys, probes, native):
    from argparse import Namespace

    from guided_diffusion.run import pipeline

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if name in probes:
            monkeypatch.setattr(torch.cpu, name, lambda value=probes[name]: value, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, name, raising=False)
    assert speed.cpu_has_native_bfloat16() is native
    net = torch.nn.Conv2d(3, 3, 1).eval()
    for dtype in ("bf16", "none"):
        capsys.readouterr()
        pipeline.sampling_network(net, Namespace(autocast_dtype=dtype))
        warned = "no bfloat16 hardware" in capsys.readouterr().out
        assert warned is (dtype == "bf16" and not native), dtype
