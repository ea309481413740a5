"""Training: learning on digits, exact resume, microbatches, DDPM-IP, atomic checkpoints, scripts."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion import dist_util, logger, train_util
from adm_common.errors import UsageError
from guided_diffusion.digits.data import digits_arrays
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import LossSecondMomentResampler
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion
from guided_diffusion.train_util import (
    ClassifierTrainLoop,
    TrainLoop,
    input_perturbed_losses,
    parse_ema_rates,
    parse_resume_step_from_filename,
    seed_step,
)
from training_setup import REPO, STEPS, TINY_FLAGS, cli_status, load, make_loop, tiny_model_and_diffusion, train_command

pytest.importorskip("sklearn")

@pytest.fixture(autouse=True)
def cpu_one_thread_quiet_logger(tmp_path_factory, monkeypatch):
    # CPU even where a GPU is present: exact-resume checks need deterministic kernels, and the
    # two-rank test forks, which CUDA does not survive
    monkeypatch.setattr(dist_util, "dev", lambda: torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger.configure(dir=str(tmp_path_factory.mktemp("log")), format_strs=(), rank=0)
    yield
    torch.set_num_threads(threads)


# -- learning -------------------------------------------------------------------------------------


def test_loss_decreases_on_digits(tmp_path):
    loop = make_loop(tmp_path, data=load_data(data_dir="digits", batch_size=16, image_size=8, seed=1),
                     batch_size=16, lr=2e-3, max_steps=20)
    x0 = digits_arrays(8)[0][::50][:32]
    gen = torch.Generator().manual_seed(123)
    t = torch.arange(32) * STEPS // 32
    noise = torch.randn(x0.shape, generator=gen)

    def eval_loss():
        with torch.no_grad():
            return loop.diffusion.training_losses(loop.model, x0, t, noise=noise)["loss"].mean().item()

    before = eval_loss()
    assert before == pytest.approx(float(noise.pow(2).mean()), rel=1e-6)  # ADM's output layer starts at zero
    loop.run_loop()
    after = eval_loss()
    assert loop.step == 20
    assert after < 0.6 * before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint000020.json", "ema_0.9_000020.pt", "model000020.pt",
                                           "opt000020.pt"]


def test_resume_continues_bit_identically(tmp_path):
    common = dict(class_cond=True, ema_rate="0.9,0.99", microbatch=3, input_perturbation=0.1, lr_anneal_steps=20)
    straight = make_loop(tmp_path / "straight", max_steps=5, **common)
    straight.run_loop()
    first = make_loop(tmp_path / "first", max_steps=3, **common)
    first.run_loop()
    resume_from = tmp_path / "first" / "model000003.pt"
    resumed = make_loop(tmp_path / "resumed", max_steps=5, resume=resume_from, **common)
    # ADM's counters: resume_step before this run, step within it
    assert (resumed.resume_step, resumed.step) == (3, 0)
    assert resumed.opt.param_groups[0]["lr"] == first.opt.param_groups[0]["lr"]
    resumed.run_loop()
    assert (resumed.resume_step, resumed.step, resumed.completed_steps) == (3, 2, 5)
    names = ["model000005.pt", "ema_0.9_000005.pt", "ema_0.99_000005.pt"]
    for name in names:
        a, b = load(tmp_path / "straight" / name), load(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    start = load(tmp_path / "first" / "model000003.pt")
    assert any(not torch.equal(start[k], load(tmp_path / "straight" / names[0])[k]) for k in start)
    opt_a, opt_b = load(tmp_path / "straight" / "opt000005.pt"), load(tmp_path / "resumed" / "opt000005.pt")
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[s], opt_b["state"][key][s]) for s in state)
    # the EMAs differ from the model and from each other, so the test compares distinct things
    ema_a = load(tmp_path / "straight" / names[1])
    model_a = load(tmp_path / "straight" / names[0])
    assert any(not torch.equal(ema_a[k], model_a[k]) for k in ema_a)


def test_resume_without_ema_and_opt_files_warns_and_fine_tunes(tmp_path):
    loop = make_loop(tmp_path / "a", max_steps=2)
    loop.run_loop()
    only_model = tmp_path / "b" / "weights.pt"
    only_model.parent.mkdir()
    os.replace(tmp_path / "a" / "model000002.pt", only_model)
    tuned = make_loop(tmp_path / "c", resume=only_model)
    assert tuned.step == 0  # no step in the name: fine-tuning starts at 0
    weights = load(only_model)
    assert all(torch.equal(p, weights[n]) for n, p in tuned.model.named_parameters())
    assert all(torch.equal(e, p) for e, p in zip(tuned.ema_params[0], tuned.model.parameters()))


def test_bad_resume_and_flags_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loop(tmp_path, resume=tmp_path / "model000010.pt")
    loop = make_loop(tmp_path, max_steps=1)
    loop.run_loop()
    with pytest.raises(UsageError, match="model\\*.pt beside it"):
        make_loop(tmp_path, resume=tmp_path / "ema_0.9_000001.pt")
    with pytest.raises(UsageError, match="exclude each other"):
        make_loop(tmp_path, use_fp16=True, use_bf16=True)
    with pytest.raises(UsageError, match="ema_rate"):
        parse_ema_rates("0.99,fast")
    with pytest.raises(UsageError, match="not in"):
        parse_ema_rates("1.5")
    with pytest.raises(UsageError, match="input_perturbation"):
        make_loop(tmp_path, input_perturbation=-0.1)


def test_step_and_rates_from_names():
    assert parse_resume_step_from_filename("/runs/models/model012345.pt") == 12345
    assert parse_resume_step_from_filename("/runs/model000100/ema_0.9999_000100.pt") == 0
    assert parse_resume_step_from_filename("256x256_diffusion.pt") == 0
    assert parse_ema_rates("0.9999,0.999") == [0.9999, 0.999] and parse_ema_rates("") == []
    assert train_util.ema_checkpoint_name(0.9999, 42) == "ema_0.9999_000042.pt"


def test_annealed_lr_decays_with_adms_lag_and_ends_the_run(tmp_path):
    """ADM sets the rate after each step from the step just taken: lr, lr, lr (1 - 1/N), ..."""
    loop = make_loop(tmp_path, lr=1e-3, lr_anneal_steps=4, max_steps=10)
    assert [loop.lr_at(s) for s in range(5)] == pytest.approx([1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    loop.run_loop()
    assert loop.step == 4
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)  # what a resumed run starts with


# -- ADM's override points ------------------------------------------------------------------------

ADM_TRAINLOOP_ATTRIBUTES = (  # what ADM's TrainLoop.__init__ sets, and forks read
    "model", "diffusion", "data", "batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "schedule_sampler", "weight_decay", "lr_anneal_steps",
    "step", "resume_step", "global_batch", "sync_cuda", "mp_trainer", "opt", "ema_params", "use_ddp", "ddp_model",
)


class ForkLoop(TrainLoop):
    """Overrides as forks of ADM write them: warm-up in _anneal_lr from step + resume_step, an extra
    logged key (ADM-ES logs "total batch size"), a counted _update_ema."""

    def __init__(self, **kwargs):
        self.lrs, self.ema_updates = [], 0
        super().__init__(**kwargs)

    def _anneal_lr(self):
        done = self.step + self.resume_step
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (done + 1) / 4)

    def log_step(self):
        super().log_step()
        logger.logkv("total batch size", self.global_batch)
        self.lrs.append(self.opt.param_groups[0]["lr"])

    def _update_ema(self):
        self.ema_updates += 1
        super()._update_ema()


def test_adm_override_points_are_called_with_adms_counters(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    data = load_data(data_dir="digits", batch_size=8, image_size=8, seed=1)
    loop = ForkLoop(model=model, diffusion=diffusion, data=data, batch_size=8, microbatch=-1, lr=1e-3,
                    ema_rate="0.9", log_interval=3, save_interval=1000, resume_checkpoint="", seed=0,
                    checkpoint_dir=str(tmp_path / "a"), max_steps=3)
    for name in ADM_TRAINLOOP_ATTRIBUTES:
        assert hasattr(loop, name), name
    assert loop.sync_cuda == torch.cuda.is_available() and loop.fp16_scale_growth == 1e-3
    assert loop.ema_rate == [0.9] and (loop.step, loop.resume_step) == (0, 0)
    loop.run_loop()
    assert loop.lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4]) and loop.ema_updates == 3
    assert loop.step == 3
    model2, diffusion2 = tiny_model_and_diffusion()
    resumed = ForkLoop(model=model2, diffusion=diffusion2, data=data, batch_size=8, microbatch=-1, lr=1e-3,
                       ema_rate="0.9", log_interval=1, save_interval=1000, seed=0,
                       resume_checkpoint=str(tmp_path / "a" / "model000003.pt"),
                       checkpoint_dir=str(tmp_path / "b"), max_steps=5)
    assert (resumed.step, resumed.resume_step) == (0, 3)
    resumed.run_step(*next(data))
    row = logger.dumpkvs()
    assert resumed.lrs == [1e-3]  # (0 + 3 + 1) / 4: warm-up done, counted from the resumed step
    assert row["total batch size"] == 8 and row["step"] == 4


# -- one step's arithmetic ------------------------------------------------------------------------


def _grads_after_one_step(tmp_path, microbatch):
    loop = make_loop(tmp_path / f"mb{microbatch}", class_cond=True, microbatch=microbatch)
    batch, cond = next(loop.data)
    seed_step(5, 0, 0)
    loop.forward_backward(batch, cond)
    return [p.grad.clone() for p in loop.model.parameters()]


def test_microbatches_accumulate_the_full_batch_gradient(tmp_path):
    whole = _grads_after_one_step(tmp_path, -1)
    pieces = _grads_after_one_step(tmp_path, 3)  # 3 + 3 + 2
    assert sum(float(g.abs().sum()) for g in whole) > 0
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_input_perturbation_changes_the_input_not_the_target():
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="linear")
    betas = np.linspace(1e-4 * 10, 0.02 * 10, 100)  # ADM's linear schedule scaled to 100 steps
    alpha_bar = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x0, noise, extra, out = (torch.randn(3, 3, 4, 4, generator=gen) for _ in range(4))
    t = torch.tensor([0, 37, 99])
    seen = {}

    def model(x, ts):
        seen["x"], seen["t"] = x, ts
        return out

    gamma = 0.1
    losses = input_perturbed_losses(diffusion, model, x0, t, gamma, noise=noise, perturbation=extra)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    expected_input = a.sqrt() * x0 + (1 - a).sqrt() * (noise + gamma * extra)
    perturbed_input = seen["x"]
    torch.testing.assert_close(perturbed_input, expected_input, rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(losses["loss"], ((noise - out) ** 2).mean(dim=(1, 2, 3)))
    plain = diffusion.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(losses["loss"], plain["loss"])  # same target, same output
    assert not torch.allclose(perturbed_input, seen["x"])  # ... from a different input


def test_train_loop_applies_input_perturbation(tmp_path):
    def model_inputs(gamma):
        loop = make_loop(tmp_path / str(gamma), input_perturbation=gamma)
        captured = []
        loop.model.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
        batch, cond = next(loop.data)
        seed_step(9, 0, 0)
        t, _ = loop.schedule_sampler.sample(8, "cpu")
        seed_step(9, 0, 0)
        loop.forward_backward(batch, cond)
        return captured[0], t, logger.dumpkvs()["mse"]

    x_plain, t, mse_plain = model_inputs(0.0)
    x_perturbed, t2, mse_perturbed = model_inputs(0.2)
    assert torch.equal(t, t2)
    # a fresh ADM network outputs zeros, so its loss is the target's size: unchanged by the perturbation
    assert mse_perturbed == pytest.approx(mse_plain, rel=1e-6)
    sigma = torch.from_numpy(create_gaussian_diffusion(steps=STEPS).sqrt_one_minus_alphas_cumprod).float()[t]
    extra = (x_perturbed - x_plain) / (0.2 * sigma.view(-1, 1, 1, 1))
    assert abs(float(extra.mean())) < 0.15 and 0.85 < float(extra.std()) < 1.15


def test_bf16_autocast_matches_float32_closely(tmp_path):
    def mse(use_bf16):
        loop = make_loop(tmp_path / str(use_bf16), use_bf16=use_bf16)
        with torch.no_grad():
            torch.nn.init.normal_(loop.model.out[-1].weight, std=0.05)
        batch, cond = next(loop.data)
        seed_step(3, 0, 0)
        loop.forward_backward(batch, cond)
        return logger.dumpkvs()["mse"]

    full, half = mse(False), mse(True)
    assert half != full  # the network did run in bfloat16
    assert half == pytest.approx(full, rel=0.03)


def test_fp16_training_saves_float32_master_weights(tmp_path):
    loop = make_loop(tmp_path, model_and_diffusion=tiny_model_and_diffusion(use_fp16=True), use_fp16=True, max_steps=2)
    loop.run_loop()
    saved = load(tmp_path / "model000002.pt")
    ema = load(tmp_path / "ema_0.9_000002.pt")
    names = [n for n, _ in loop.model.named_parameters()]
    assert set(names) <= set(saved) and all(saved[n].dtype == torch.float32 for n in names)
    conv = "input_blocks.0.0.weight"
    assert loop.model.state_dict()[conv].dtype == torch.float16
    torch.testing.assert_close(saved[conv].half(), loop.model.state_dict()[conv])
    resumed = make_loop(tmp_path / "r", model_and_diffusion=tiny_model_and_diffusion(use_fp16=True), use_fp16=True,
                        resume=tmp_path / "model000002.pt")
    restored = resumed.mp_trainer.master_params_to_state_dict(resumed.ema_params[0])
    assert all(torch.equal(restored[n], ema[n]) for n in names)


def test_loss_aware_sampler_sees_every_loss(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    sampler = LossSecondMomentResampler(diffusion)
    loop = make_loop(tmp_path, model_and_diffusion=(model, diffusion), schedule_sampler=sampler, microbatch=3,
                     max_steps=3)
    loop.run_loop()
    assert int(sampler._loss_counts.sum()) == 3 * 8


# -- several ranks --------------------------------------------------------------------------------


def _ddp_worker(rank, world, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        dist_util.dev = lambda: torch.device("cpu")  # a spawned worker lacks the test's monkeypatch
        torch.set_num_threads(1)
        logger.configure(dir=f"{folder}/log{rank}", format_strs=(), rank=rank)

        def train(name, max_steps, resume=""):
            # each rank starts from other weights: training must adopt rank 0's
            model_and_diffusion = tiny_model_and_diffusion(class_cond=True, init_seed=100 + rank)
            loop = make_loop(f"{folder}/{name}", model_and_diffusion=model_and_diffusion, class_cond=True,
                             resume=resume, batch_size=8, microbatch=3, max_steps=max_steps, ema_rate="0.9")
            assert loop.use_ddp
            loop.run_loop()
            weights = {n: p.detach().clone() for n, p in loop.model.named_parameters()}
            torch.save(weights, f"{folder}/{name}/rank{rank}.pt")

        train("straight", 3)
        train("first", 2)
        train("resumed", 3, resume=f"{folder}/first/model000002.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_stay_in_sync_and_resume_exactly(tmp_path):
    import torch.multiprocessing as mp

    digits_arrays(8)  # import scikit-learn's loader and torch's optimizer machinery here, once
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    # fork lets the workers inherit those imports (spawning re-imports torch in each, ~10 s on a
    # busy CPU), but autograd's GPU threads do not survive a fork: spawn where CUDA is present
    start_method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method=start_method)
    for run in ("straight", "first", "resumed"):
        r0, r1 = load(tmp_path / run / "rank0.pt"), load(tmp_path / run / "rank1.pt")
        assert all(torch.equal(r0[k], r1[k]) for k in r0), run
    for name in ("model000003.pt", "ema_0.9_000003.pt"):
        a, b = load(tmp_path / "straight" / name), load(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    one_rank = tmp_path / "one_rank"
    make_loop(one_rank, model_and_diffusion=tiny_model_and_diffusion(class_cond=True, init_seed=100), class_cond=True,
              microbatch=3, max_steps=3).run_loop()
    single, double = load(one_rank / "model000003.pt"), load(tmp_path / "straight" / "model000003.pt")
    assert any(not torch.equal(single[k], double[k]) for k in single)  # rank 1's data and noise counted


# -- classifier -----------------------------------------------------------------------------------


def test_classifier_learns_digits(tmp_path):
    torch.manual_seed(0)
    classifier = create_classifier(8, False, 64, 1, "", False, False, "adaptive", classifier_channel_mult="1",
                                   num_classes=10)
    diffusion = create_gaussian_diffusion(steps=STEPS)
    data = load_data(data_dir="digits", batch_size=32, image_size=8, class_cond=True, seed=0)
    val = load_data(data_dir="digits", batch_size=32, image_size=8, class_cond=True, seed=1)
    loop = ClassifierTrainLoop(model=classifier, diffusion=diffusion, data=data, val_data=val, noised=False,
                               eval_interval=10, batch_size=32, microbatch=16, lr=3e-3, log_interval=1000,
                               save_interval=1000, resume_checkpoint="", max_steps=30, seed=0,
                               checkpoint_dir=str(tmp_path / "ckpt"))
    x, cond = next(load_data(data_dir="digits", batch_size=256, image_size=8, class_cond=True, seed=5))

    def cross_entropy():
        with torch.no_grad():
            logits = classifier(x, torch.zeros(len(x), dtype=torch.long))
        return float(torch.nn.functional.cross_entropy(logits, cond["y"]))

    assert cross_entropy() == pytest.approx(math.log(10), rel=1e-6)  # zero output layer: uniform over 10
    logger.configure(dir=str(tmp_path / "log"), format_strs=("csv",), rank=0)
    loop.run_loop()
    with open(tmp_path / "log" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["step"] == "30"
    assert {"val_loss", "val_acc@1", "train_acc@5", "train_loss_q0", "images_per_sec"} <= set(rows[0])
    assert cross_entropy() < 0.93 * math.log(10)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoint000030.json", "model000030.pt", "opt000030.pt"]


# -- scripts --------------------------------------------------------------------------------------


DIGITS = ["--data_dir", "digits", "--batch_size", "8", *TINY_FLAGS]


def test_image_train_trains_and_resumes(tmp_path, script_process_group):
    run = tmp_path / "run"
    train_command("image_train", DIGITS + ["--max_steps", "2", "--log_dir", str(run), "--class_cond", "True",
                                           "--num_classes", "10"])
    assert {"model000002.pt", "ema_0.9_000002.pt", "opt000002.pt", "progress.csv"} <= set(os.listdir(run))
    again = tmp_path / "again"
    train_command("image_train", DIGITS + ["--max_steps", "3", "--log_dir", str(again), "--class_cond", "True",
                                           "--num_classes", "10", "--resume_checkpoint", str(run / "model000002.pt")])
    assert "model000003.pt" in os.listdir(again) and "model000002.pt" not in os.listdir(again)


def test_train_errors_are_one_line(tmp_path, script_process_group, capsys):
    code, err, _ = cli_status("image_train", DIGITS + ["--data_dir", str(tmp_path / "nowhere"), "--max_steps", "1",
                                                       "--log_dir", str(tmp_path / "log2")], capsys)
    assert code == 2
    assert err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1


def test_eps_scaler_and_input_perturbation_together_are_refused_before_the_log_folder(tmp_path, script_process_group,
                                                                                    capsys):
    code, err, _ = cli_status("image_train", DIGITS + ["--eps_scaler", "0.1", "--input_perturbation", "0.1",
                                                       "--max_steps", "1", "--log_dir", str(tmp_path / "log")], capsys)
    assert code == 2 and err == ("error: --eps_scaler (ADM-ES's input perturbation) and --input_perturbation are the "
                                 "same DDPM-IP perturbation; give one of them")
    assert not (tmp_path / "log").exists()


def test_classifier_and_super_res_scripts_run(tmp_path):
    def script(name, *argv):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *argv], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]

    script("classifier_train",
           "--data_dir", "digits", "--image_size", "8", "--num_classes", "10", "--classifier_width", "64",
           "--classifier_depth", "1", "--classifier_channel_mult", "1", "--classifier_attention_resolutions", "",
           "--classifier_pool", "adaptive", "--batch_size", "8", "--iterations", "2", "--diffusion_steps", "50",
           "--log_dir", str(tmp_path / "cls"), "--val_data_dir", "digits", "--eval_interval", "1")
    assert {"model000002.pt", "opt000002.pt"} <= set(os.listdir(tmp_path / "cls"))
    script("super_res_train",
           "--data_dir", "digits:64", "--large_size", "64", "--small_size", "16", "--num_channels", "32",
           "--num_res_blocks", "1", "--attention_resolutions", "", "--diffusion_steps", "50", "--batch_size", "2",
           "--max_steps", "1", "--log_dir", str(tmp_path / "sr"))
    saved = load(tmp_path / "sr" / "model000001.pt")
    assert saved["input_blocks.0.0.weight"].shape[1] == 6  # image + upsampled low-res input
