"""The samplers, checked against Gaussian data, whose VP-SDE marginals and score are known in closed form.

For data N(mean, std^2) per dimension the exact score of p_t is `gaussian_score`, and a sampler that is
right must return draws from p_eps = N(mean_eps, std_eps^2) (`gaussian_marginal` at t = eps). Draws are
standardised with the exact p_eps moments and pooled over all N * D values; the pooled mean and variance
of a correct sampler then sit within Z standard errors of 0 and 1, plus the sampler's own known bias:

  * the prior: samplers start from N(0, I), not the exact p_T (whose mean is alpha(T) * mean != 0);
  * Euler-Maruyama discretisation: exact for this linear-Gaussian problem via a moment recursion below;
  * the Langevin corrector: a fixed-step Langevin chain settles at (1 + snr^2) times the target variance
    (derivation in `test_langevin_corrector_settles_at_its_known_stationary_law`).

Isotropic std keeps the corrector's bias exactly 1 + snr^2 (its step is one scalar per batch); the means
differ per pixel so that a sampler mixing up pixels would fail.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sample import main
from trials.config import SampleConfig, TrialConfig
from trials.data import DatasetSplits
from trials.model import UNet, score_fn, unet_for
from trials.odesolve import ODEFailure
from trials.sampling import IMAGE_SAMPLERS, langevin_correct, ode_sample, pc_sample, save_grid, to_image_range
from trials.sde import VPSDE, SubVPSDE, gaussian_marginal, gaussian_score
from trials.trainer import Trainer

SDE = VPSDE()
EPS = 1e-3
SHAPE = (2000, 1, 4, 4)
N_VALUES = math.prod(SHAPE)  # pooled standardised values: 32,000
MEAN = torch.linspace(-0.2, 0.6, 16).reshape(1, 4, 4)
STD = torch.full((1, 4, 4), 0.5)
Z = 5.0  # standard errors allowed: a two-sided false alarm rate of 6e-7 per check
SE_MEAN = 1.0 / math.sqrt(N_VALUES)  # of the pooled standardised mean
SE_VAR = math.sqrt(2.0 / (N_VALUES - 1))  # of the pooled standardised variance (Gaussian values)
PC_STEPS = 500
SNR = 0.16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny; on a shared 2-core machine a second torch thread only adds contention
    # (we measured the 500-step PC test 10x slower with two threads than with one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact_score():
    return gaussian_score(SDE, MEAN, STD)


def standardised_moments(x: torch.Tensor, t: float) -> tuple[float, float]:
    """Mean and variance of (x - mean_t) / std_t pooled over samples and pixels: 0 and 1 for draws of p_t."""
    mean_t, std_t = gaussian_marginal(SDE, MEAN, STD, torch.tensor([t]))
    z = ((x - mean_t[0]) / std_t[0]).double()
    return z.mean().item(), z.var().item()


def matches_p_eps(x: torch.Tensor, mean_bias: float, var_bias: float) -> bool:
    """Whether x passes as draws from p_eps, allowing Z standard errors plus the sampler's known bias."""
    m, v = standardised_moments(x, EPS)
    # Written so that NaN moments (a sampler that blew up) fail.
    return abs(m) <= Z * SE_MEAN + mean_bias and abs(v - 1.0) <= Z * SE_VAR + var_bias


def prior_mismatch() -> tuple[float, float]:
    """How far N(0, I) is from the exact p_T, standardised: the probability-flow map is affine for
    Gaussian data, so it carries these errors unchanged in standardised units down to eps."""
    mean_T, std_T = gaussian_marginal(SDE, MEAN.double(), STD.double(), torch.tensor([SDE.T], dtype=torch.float64))
    return (mean_T / std_T).abs().max().item(), (1.0 / std_T**2 - 1.0).abs().max().item()


def euler_maruyama_bias(steps: int) -> tuple[float, float]:
    """Exact standardised mean and variance errors at eps of the predictor-only sampler (denoised).

    With the Gaussian score the Euler-Maruyama step is affine in x, x' = a x + b + c z, so its mean and
    variance follow m' = a m + b, V' = a^2 V + c^2 exactly, starting from the prior N(0, 1); the last step
    adds no noise (denoise). This is the discretisation and prior error, free of sampling noise.
    """
    times = torch.linspace(SDE.T, EPS, steps + 1, dtype=torch.float64)
    mean, std = MEAN.double(), STD.double()
    m, V = torch.zeros_like(mean), torch.ones_like(mean)
    for i in range(steps):
        t, h = times[i : i + 1], (times[i] - times[i + 1]).item()
        mean_t, std_t = gaussian_marginal(SDE, mean, std, t)
        beta, var_t = SDE.beta(t).item(), std_t[0] ** 2
        # x' = x - h * reverse_drift = x + h (beta x / 2 - beta (x - mean_t) / var_t) + sqrt(beta h) z
        a = 1.0 + h * (0.5 * beta - beta / var_t)
        m = a * m + h * beta * mean_t[0] / var_t
        V = a * a * V + (beta * h if i < steps - 1 else 0.0)
    mean_eps, std_eps = gaussian_marginal(SDE, mean, std, torch.tensor([EPS], dtype=torch.float64))
    mean_err = ((m - mean_eps[0]) / std_eps[0]).abs().max().item()
    var_err = (V / std_eps[0] ** 2 - 1.0).abs().max().item() + mean_err**2
    return mean_err, var_err


# ---- the samplers draw from p_eps with the exact score --------------------------------------------------------
def test_euler_maruyama_bias_is_small_at_the_tested_step_count():
    # Keeps the tolerance below honest: the discretisation allowance must not swamp the check.
    mean_err, var_err = euler_maruyama_bias(PC_STEPS)
    assert mean_err < 0.005 and var_err < 0.005
    assert euler_maruyama_bias(10)[1] > 0.1  # and the recursion does see discretisation error


def test_pc_predictor_only_draws_from_p_eps():
    x = pc_sample(
        exact_score(),
        SDE,
        SHAPE,
        eps=EPS,
        steps=PC_STEPS,
        corrector_steps=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert matches_p_eps(x, *euler_maruyama_bias(PC_STEPS))


def test_pc_with_corrector_draws_from_p_eps():
    x = pc_sample(
        exact_score(),
        SDE,
        SHAPE,
        eps=EPS,
        steps=PC_STEPS,
        corrector_steps=1,
        snr=SNR,
        generator=torch.Generator().manual_seed(0),
    )
    mean_bias, var_bias = euler_maruyama_bias(PC_STEPS)
    assert matches_p_eps(x, mean_bias, var_bias + SNR**2)


def test_ode_draws_from_p_eps():
    x, nfe = ode_sample(
        exact_score(), SDE, SHAPE, eps=EPS, rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(0)
    )
    mean_bias, var_bias = prior_mismatch()
    solver = 1e-3  # global error of a 1e-5 local tolerance over tens of steps
    assert matches_p_eps(x, mean_bias + solver, var_bias + solver)
    assert nfe > 0


@pytest.mark.parametrize("frame", ["logsnr", "t"])
def test_ode_without_denoising_is_the_exact_affine_flow_map(frame):
    # With the exact Gaussian score the flow maps a prior draw x_T to mean_eps + std_eps / std_T (x_T - mean_T)
    # per pixel: the sampler must reproduce that map (not just its distribution) in either frame.
    shape = (64, 1, 4, 4)
    x, _ = ode_sample(
        exact_score(),
        SDE,
        shape,
        eps=EPS,
        rtol=1e-6,
        atol=1e-6,
        frame=frame,
        denoise=False,
        generator=torch.Generator().manual_seed(3),
    )
    x_T = SDE.prior_sample(shape, generator=torch.Generator().manual_seed(3))
    mean_eps, std_eps = gaussian_marginal(SDE, MEAN, STD, torch.tensor([EPS]))
    mean_T, std_T = gaussian_marginal(SDE, MEAN, STD, torch.tensor([SDE.T]))
    torch.testing.assert_close(x, mean_eps + std_eps / std_T * (x_T - mean_T), rtol=0, atol=1e-4)


def test_multistep_ode_reproduces_the_exact_affine_flow_map_in_steps_plus_one_evaluations():
    # The same closed form as above, reached by the likelihood's multistep solver run from T to eps: its cost is
    # fixed in advance and its error falls fast with the steps (fourth order where the grid is even).
    shape = (64, 1, 4, 4)
    x_T = SDE.prior_sample(shape, generator=torch.Generator().manual_seed(3))
    mean_eps, std_eps = gaussian_marginal(SDE, MEAN, STD, torch.tensor([EPS]))
    mean_T, std_T = gaussian_marginal(SDE, MEAN, STD, torch.tensor([SDE.T]))
    exact = mean_eps + std_eps / std_T * (x_T - mean_T)
    errors = {}
    for steps in (15, 63):
        x, nfe = ode_sample(
            exact_score(),
            SDE,
            shape,
            eps=EPS,
            method="multistep",
            steps=steps,
            denoise=False,
            generator=torch.Generator().manual_seed(3),
        )
        assert nfe == steps + 1
        errors[steps] = (x - exact).abs().max().item()
    assert errors[63] < 1e-3 and errors[63] < errors[15] / 10


def test_multistep_ode_integrates_the_logsnr_frame_only():
    with pytest.raises(ValueError, match="logsnr frame"):
        ode_sample(exact_score(), SDE, SHAPE, eps=EPS, method="multistep", steps=7, frame="t")


def test_logsnr_frame_needs_fewer_evaluations_than_t_for_the_same_samples():
    # Data concentrated near a point (std 0.01) make frame t stiff near eps; in the logsnr frame the flow is
    # nearly a straight line. Same prior draw, same tolerance, samples agree; logsnr is cheaper.
    std = torch.full((1, 4, 4), 0.01)
    score = gaussian_score(SDE, MEAN, std)
    runs = {
        frame: ode_sample(
            score,
            SDE,
            (64, 1, 4, 4),
            eps=1e-5,
            rtol=1e-5,
            atol=1e-5,
            frame=frame,
            denoise=False,
            generator=torch.Generator().manual_seed(0),
        )
        for frame in ("logsnr", "t")
    }
    torch.testing.assert_close(runs["logsnr"][0], runs["t"][0], rtol=0, atol=1e-3)
    assert runs["logsnr"][1] < runs["t"][1]


def test_ode_denoising_returns_the_posterior_mean_of_x0():
    # At eps = 0.1 the noise left in x_eps is large enough to see: the denoised output is
    # E[x0 | x_eps] = mean + alpha std^2 (x_eps - alpha mean) / std_eps^2, an affine map of a p_eps draw,
    # so it is Gaussian with mean `mean` and variance alpha^2 std^4 / std_eps^2 (here 0.17 against p_eps's 0.33).
    eps = 0.1
    x, nfe = ode_sample(
        exact_score(), SDE, SHAPE, eps=eps, rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(0)
    )
    raw, raw_nfe = ode_sample(
        exact_score(),
        SDE,
        SHAPE,
        eps=eps,
        rtol=1e-5,
        atol=1e-5,
        denoise=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert nfe == raw_nfe + 1
    t = torch.tensor([eps])
    alpha = SDE.mean_coeff(t).item()
    _, std_eps = gaussian_marginal(SDE, MEAN, STD, t)
    sigma = SDE.marginal_std(t).item()
    torch.testing.assert_close(x, (raw + sigma**2 * exact_score()(raw, t.expand(len(raw)))) / alpha, rtol=0, atol=1e-5)
    # Standardised with the posterior mean's exact law; the prior mismatch carries through the affine maps.
    post_std = alpha * STD**2 / std_eps[0]
    z = ((x - MEAN) / post_std).double()
    mean_bias, var_bias = prior_mismatch()
    assert abs(z.mean().item()) <= Z * SE_MEAN + mean_bias + 1e-3
    assert abs(z.var().item() - 1.0) <= Z * SE_VAR + var_bias + 1e-3
    assert standardised_moments(raw, eps)[1] == pytest.approx(1.0, abs=Z * SE_VAR + var_bias + 1e-3)


def shifted_score():
    return gaussian_score(SDE, MEAN + 0.05, STD)  # a tenth of a standard deviation off


def widened_score():
    return gaussian_score(SDE, MEAN, 1.1 * STD)  # 10% too wide


def flipped_score():
    score = exact_score()
    return lambda x, t: -score(x, t)


@pytest.mark.parametrize("wrong_score", [flipped_score, shifted_score, widened_score])
@pytest.mark.parametrize("sampler", ["pc", "ode"])
def test_a_wrong_score_fails_the_check(sampler, wrong_score):
    generator = torch.Generator().manual_seed(0)
    if sampler == "pc":
        x = pc_sample(wrong_score(), SDE, SHAPE, eps=EPS, steps=PC_STEPS, generator=generator)
        mean_bias, var_bias = euler_maruyama_bias(PC_STEPS)
        assert not matches_p_eps(x, mean_bias, var_bias + SNR**2)
    else:
        # The flipped score makes the flow blow up; the solver may give up rather than return NaN.
        try:
            x, _ = ode_sample(wrong_score(), SDE, SHAPE, eps=EPS, generator=generator)
        except ODEFailure:  # torchdiffeq's "underflow in dt" / "non-finite values", translated
            assert wrong_score is flipped_score
            return
        mean_bias, var_bias = prior_mismatch()
        assert not matches_p_eps(x, mean_bias + 1e-3, var_bias + 1e-3)


def test_langevin_corrector_settles_at_its_known_stationary_law():
    """At a fixed t, corrector steps alone pull any start towards p_t, settling at (1 + snr^2) var_t.

    With batch-averaged norms the step is eps = 2 snr^2 var_t^2 / V for current variance V (||score||
    grows as sqrt(V) / var_t). A Langevin step on N(m, var_t) maps V to (1 - eps / var_t)^2 V + 2 eps,
    whose fixed point with that eps is V = (1 + snr^2) var_t; the mean goes to m exactly. A large snr
    and batch make the bias (9%) many standard errors wide, so a wrong step-size rule would show.
    """
    snr, t = 0.3, 0.5
    shape = (8000, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    mean_t, std_t = gaussian_marginal(SDE, MEAN, STD, torch.tensor([t]))
    x = mean_t + std_t * (1.0 + 2.0 * torch.randn(shape, generator=generator))  # 1 std off, 4x the variance
    times = torch.full((shape[0],), t)
    score = exact_score()
    for _ in range(300):  # each step shrinks the excess variance by (1 - 2 snr^2)^2 = 0.67
        x = langevin_correct(score, x, times, snr=snr, generator=generator)
    m, v = standardised_moments(x, t)
    n = math.prod(shape)
    assert abs(m) <= Z / math.sqrt(n)
    assert abs(v - (1.0 + snr**2)) <= Z * math.sqrt(2.0 / (n - 1)) * (1.0 + snr**2)


# ---- plumbing ------------------------------------------------------------------------------------------------
def test_samplers_are_reproducible_from_the_generator_seed():
    def pc(seed):
        return pc_sample(
            exact_score(), SDE, (8, 1, 4, 4), eps=EPS, steps=20, generator=torch.Generator().manual_seed(seed)
        )

    def ode(seed):
        return ode_sample(exact_score(), SDE, (8, 1, 4, 4), eps=EPS, generator=torch.Generator().manual_seed(seed))[0]

    for sampler in (pc, ode):
        assert torch.equal(sampler(1), sampler(1))
        assert not torch.allclose(sampler(1), sampler(2))


def test_ode_nfe_counts_the_score_evaluations():
    calls = 0
    score = exact_score()

    def counting_score(x, t):
        nonlocal calls
        calls += 1
        return score(x, t)

    _, nfe = ode_sample(counting_score, SDE, (8, 1, 4, 4), eps=EPS, generator=torch.Generator().manual_seed(0))
    assert nfe == calls > 0


def test_pc_makes_steps_times_one_plus_corrector_score_evaluations_at_times_from_T_to_eps():
    seen = []
    score = exact_score()

    def recording_score(x, t):
        assert t.shape == (x.shape[0],)
        seen.append(t[0].item())
        return score(x, t)

    pc_sample(
        recording_score,
        SDE,
        (4, 1, 4, 4),
        eps=0.1,
        steps=9,
        corrector_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(seen) == 9 * 3
    # corrector, corrector, predictor at each of T = 1.0, 0.9, ..., 0.2; the last step ends at eps = 0.1
    assert seen == pytest.approx([1.0 - 0.1 * i for i in range(9) for _ in range(3)], abs=1e-6)


def test_denoise_leaves_out_exactly_the_last_steps_noise():
    # Same seed, so both runs agree until the last step, whose noise g(t) sqrt(h) z is all that differs.
    def run(denoise):
        return pc_sample(
            exact_score(),
            SDE,
            SHAPE,
            eps=0.1,
            steps=4,
            corrector_steps=0,
            denoise=denoise,
            generator=torch.Generator().manual_seed(0),
        )

    difference = (run(False) - run(True)).double()
    t_last, h = 0.325, 0.225  # grid 1.0, 0.775, 0.55, 0.325, 0.1
    expected_std = math.sqrt(SDE.beta(torch.tensor(t_last)).item() * h)
    assert abs(difference.mean().item()) <= Z * expected_std * SE_MEAN
    assert abs(difference.std().item() / expected_std - 1.0) <= Z * SE_VAR / 2  # SE of a std ~ SE of var / 2


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = unet_for(TrialConfig.from_dict(TINY_CONFIG))
    with torch.no_grad():  # the zero-initialised output layers would otherwise make the score exactly 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


TINY_CONFIG = {
    "model": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "train": {
        "batch_size": 4,
        "steps": 2,
        "val_images": 4,
        "val_every": 2,
        "log_every": 2,
        "device": "cpu",
        "num_threads": 1,
    },
    "sample": {"n_images": 4, "pc_steps": 3, "ode_rtol": 1e-2, "ode_atol": 1e-2},
}


def test_samplers_give_finite_images_of_the_requested_shape_from_a_unet():
    score = score_fn(tiny_unet(), SDE)
    x = pc_sample(score, SDE, (3, 1, 28, 28), eps=EPS, steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()
    x, nfe = ode_sample(
        score, SDE, (3, 1, 28, 28), eps=EPS, rtol=1e-2, atol=1e-2, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all() and nfe > 0


@pytest.mark.parametrize("centered", [False, True])
def test_to_image_range_maps_the_data_range_onto_0_1_and_clamps(centered):
    low, high = (-1.0, 1.0) if centered else (0.0, 1.0)
    x = torch.tensor([low - 0.5, low, (low + high) / 2, high, high + 3.0])
    assert to_image_range(x, centered).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_save_grid_writes_a_png_of_the_grid_size(tmp_path):
    path = tmp_path / "grid.png"
    save_grid(torch.rand(10, 1, 28, 28), path, centered=False)  # 4 per row -> 4 x 3 cells of 28 + 2 padding
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (4 * 30 + 2, 3 * 30 + 2)


# ---- command line --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real trials.trainer checkpoint (EMA included) of a tiny UNet trained for two steps on random digits."""
    cfg = TrialConfig.from_dict(TINY_CONFIG)
    gen = torch.Generator().manual_seed(0)

    def digits(n):
        return torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)

    data = DatasetSplits(
        name="random",
        train=digits(8),
        train_labels=torch.zeros(8, dtype=torch.long),
        val=digits(4),
        val_labels=torch.zeros(4, dtype=torch.long),
        test=digits(4),
        test_labels=torch.zeros(4, dtype=torch.long),
        test_is_val=True,
    )
    trainer = Trainer(cfg, data, device="cpu")
    for _ in trainer.run():
        pass
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("sampler", ["pc", "ode"])
def test_cli_writes_the_grid(checkpoint, tmp_path, capsys, sampler):
    out = tmp_path / "grid.png"
    code = main(
        ["--checkpoint", str(checkpoint), "--sampler", sampler, "--n", "4", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (2 * 30 + 2, 2 * 30 + 2)  # 4 images, 2 per row
    printed = capsys.readouterr().out
    assert printed.startswith(f"{sampler}: 4 images, ") and "score evaluations" in printed
    assert ("corrector_steps 1" if sampler == "pc" else "frame logsnr") in printed  # the settings it drew with


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (lambda d: d / "missing.pt", "checkpoint not found"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "not a trials.trainer checkpoint"),
    ],
)
def test_cli_rejects_a_bad_checkpoint_in_one_line(tmp_path, capsys, make_bad, expected):
    code = main(["--checkpoint", str(make_bad(tmp_path)), "--out", str(tmp_path / "g.png")])
    assert code == 2
    assert expected in one_line_error(capsys)


def test_cli_rejects_a_bad_device_in_one_line(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--device", "gpu", "--out", str(tmp_path / "g.png")])
    assert exit_info.value.code == 2
    assert "--device: must be 'auto', 'cpu' or 'cuda[:N]', got 'gpu'" in one_line_error(capsys)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("n", ["0", "-3", "many"])
def test_cli_rejects_a_bad_n_in_one_line(checkpoint, tmp_path, capsys, n):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--n", n, "--out", str(tmp_path / "g.png")])
    assert exit_info.value.code == 2
    assert "--n" in one_line_error(capsys)


def test_sample_py_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "g.png")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "checkpoint not found" in proc.stderr


@pytest.mark.parametrize("frame", ["logsnr", "t"])
def test_the_ode_sampler_maps_the_prior_exactly_under_the_sub_vp_sde(frame):
    # The samplers are typed against trials.sde.SDE: a second SDE's exact flow map comes out unchanged.
    sde = SubVPSDE(0.1, 20.0, 1.0)
    shape = (64, 1, 4, 4)
    x, _ = ode_sample(
        gaussian_score(sde, MEAN, STD),
        sde,
        shape,
        eps=EPS,
        rtol=1e-6,
        atol=1e-6,
        frame=frame,
        denoise=False,
        generator=torch.Generator().manual_seed(3),
    )
    x_T = sde.prior_sample(shape, generator=torch.Generator().manual_seed(3))
    mean_eps, std_eps = gaussian_marginal(sde, MEAN, STD, torch.tensor([EPS]))
    mean_T, std_T = gaussian_marginal(sde, MEAN, STD, torch.tensor([sde.T]))
    torch.testing.assert_close(x, mean_eps + std_eps / std_T * (x_T - mean_T), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["pc", "ode"])
def test_every_sampler_has_one_shape_and_draws_with_its_config(name):
    # The table's samplers take the same arguments and return Samples; their settings come from SampleConfig,
    # and the images equal those of the underlying function with those settings (same generator seed).
    sc = SampleConfig(pc_steps=7, corrector_steps=1, ode_rtol=1e-4, ode_atol=1e-4)
    shape, lines = (8, 1, 4, 4), []
    samples = IMAGE_SAMPLERS[name].draw(
        exact_score(),
        SDE,
        shape,
        eps=EPS,
        sample=sc,
        generator=torch.Generator().manual_seed(1),
        report=lines.append,
        every=0.0,
    )
    assert samples.x.shape == shape and torch.isfinite(samples.x).all()
    if name == "pc":
        expected = pc_sample(
            exact_score(),
            SDE,
            shape,
            eps=EPS,
            steps=7,
            corrector_steps=1,
            snr=sc.snr,
            generator=torch.Generator().manual_seed(1),
        )
        assert samples.nfe == 7 * 2 and IMAGE_SAMPLERS[name].settings(sc)["steps"] == 7
        assert len(lines) == 6 and all("left)" in line for line in lines)  # a line per step but the last
    else:
        expected, nfe = ode_sample(
            exact_score(), SDE, shape, eps=EPS, rtol=1e-4, atol=1e-4, generator=torch.Generator().manual_seed(1)
        )
        assert samples.nfe == nfe and IMAGE_SAMPLERS[name].settings(sc)["frame"] == "logsnr"
        assert lines and all(line.startswith("  ODE sampling ") for line in lines)
    torch.testing.assert_close(samples.x, expected, rtol=0, atol=0)


def test_sample_py_offers_every_sampler_of_the_table():
    from sample import parse_args

    for name in IMAGE_SAMPLERS:
        assert parse_args(["--checkpoint", "c.pt", "--out", "g.png", "--sampler", name]).sampler == name
