"""``samkit gan``: metrics against hand computations, SAM steps against a hand-written SAM,
rho=0 against Adam bit for bit, resume against the run that never stopped, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from samkit.cli.main import main
from samkit.experiments import gan
from samkit.experiments.grid import Variant

RING = gan.MIXTURES["ring8"]
GRID = gan.MIXTURES["grid25"]

TINY = dict(
    datasets=["ring8"],
    seeds=[0],
    iterations=30,
    batch_size=32,
    hidden=16,
    depth=2,
    z_dim=4,
    eval_every=10,
    eval_samples=200,
    snapshots=2,
    checkpoint_every=10,
)


def config(**changes):
    return gan.build_config({**gan.DEFAULTS, **TINY, **changes})


def variant(method, **options):
    return Variant(method, method, {**gan.GAN_METHODS[method].defaults, **options})


# ---------------------------------------------------------------- metrics
def test_the_true_distribution_scores_as_theory_says():
    """Samples of the mixture itself: every mode covered, high-quality share
    P(|N(0, I_2)| <= 3) = 1 - exp(-9/2), MMD about 0, mode KL about 0."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    p = 1 - math.exp(-4.5)
    for mixture in (RING, GRID):
        nearest, hq = gan.nearest_modes(mixture.sample(n, g), mixture)
        assert abs(float(hq.double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
        k = len(mixture.centers)
        # the KL of the counts of a uniform draw is about (k - 1) / 2n
        assert 0 <= gan.mode_kl(nearest, k) < 5 * (k - 1) / (2 * n)
        m = gan.mixture_metrics(mixture.sample(1000, g), mixture, mixture.sample(1000, g))
        assert m["modes"] == k
        assert abs(m["mmd"]) < 5e-3
        # and the MMD sees a distribution moved by half the distance between two modes
        assert gan.mmd2(mixture.sample(1000, g) + 1.0, mixture.sample(1000, g)) > 0.1


def test_collapse_on_one_mode_and_points_far_away():
    c = RING.centers_tensor()
    one = c[3].repeat(1000, 1)
    m = gan.mixture_metrics(one, RING, RING.sample(500, torch.Generator().manual_seed(1)))
    assert (m["modes"], m["hq"]) == (1.0, 1.0)
    assert m["mode_kl"] == pytest.approx(math.log(8))
    far = torch.full((1000, 2), 100.0)
    m = gan.mixture_metrics(far, RING, RING.sample(500, torch.Generator().manual_seed(1)))
    assert (m["modes"], m["hq"]) == (0.0, 0.0)


def test_high_quality_is_three_standard_deviations_and_coverage_twenty_per_2500():
    c = GRID.centers_tensor()
    inside = c[0] + torch.tensor([2.99 * GRID.std, 0.0])
    outside = c[0] + torch.tensor([0.0, 3.01 * GRID.std])
    m = gan.mixture_metrics(torch.stack([inside, outside]), GRID, c)
    assert m["hq"] == 0.5
    # 20 high-quality samples of 2500 cover a mode, 19 do not
    filler = torch.full((2500 - 39, 2), 50.0)
    x = torch.cat([c[0].repeat(20, 1), c[1].repeat(19, 1), filler])
    assert gan.mixture_metrics(x, GRID, c)["modes"] == 1.0
    # the rule scales with the number of samples: 8 of 1000
    x = torch.cat([c[0].repeat(8, 1), c[1].repeat(7, 1), torch.full((985, 2), 50.0)])
    assert gan.mixture_metrics(x, GRID, c)["modes"] == 1.0


def test_mode_kl_by_hand():
    # shares (1/2, 1/2, 0, 0) against uniform over 4: 2 * 1/2 * log(4 * 1/2) = log 2
    assert gan.mode_kl(torch.tensor([0, 1, 0, 1]), 4) == pytest.approx(math.log(2))
    assert gan.mode_kl(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(0.0)


def test_mmd_of_point_masses_and_a_direct_double_sum():
    a = torch.zeros(5, 2, dtype=torch.float64)
    b = torch.tensor([[0.3, 0.4]], dtype=torch.float64).repeat(7, 1)  # distance 0.5
    expected = sum(2 * (1 - math.exp(-0.25 / (2 * s * s))) for s in gan.KERNEL_BANDWIDTHS)
    assert gan.mmd2(a, b) == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64) + 1

    def k(u, v):
        d = float(((u - v) ** 2).sum())
        return sum(math.exp(-d / (2 * s * s)) for s in gan.KERNEL_BANDWIDTHS)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert gan.mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    with pytest.raises(ValueError, match="Invalid samples value"):
        gan.mmd2(x[:1], y)


# ---------------------------------------------------------------- training
def test_rho_zero_is_adam_bit_for_bit():
    cfg = config()
    adam = gan.train_gan(cfg, RING, variant("adam"), 0)
    sam0 = gan.train_gan(cfg, RING, variant("sam_both", rho=0.0), 0)
    for player in ("generator", "discriminator"):
        for p, q in zip(adam["weights"][player], sam0["weights"][player]):
            assert torch.equal(p, q)
    assert adam["history"] == sam0["history"]
    assert sam0["g_ascents"] == sam0["d_ascents"] == 0
    sam = gan.train_gan(cfg, RING, variant("sam_g", rho=0.05), 0)
    assert not all(
        torch.equal(p, q) for p, q in zip(adam["weights"]["generator"], sam["weights"]["generator"])
    )
    assert sam["g_ascents"] == cfg.iterations and sam["d_ascents"] == 0


@pytest.mark.parametrize("method", ["sam_g", "sam_d"])
def test_one_iteration_equals_a_hand_written_sam_step(method):
    """The first iteration, written out: D's Adam or SAM step on its loss, then
    G's step with D held fixed; SAM = Adam at the gradient taken at w + rho g/|g|."""
    cfg = config(iterations=1, eval_every=1)
    rho = 0.1
    out = gan.train_gan(cfg, RING, variant(method, rho=rho), 0)

    G, D = gan.build_players(cfg, 0)
    data_rng = torch.Generator().manual_seed(1)
    noise_rng = torch.Generator().manual_seed(2)
    real = RING.sample(cfg.batch_size, data_rng)
    z_d = torch.randn(cfg.batch_size, cfg.z_dim, generator=noise_rng)
    z_g = torch.randn(cfg.batch_size, cfg.z_dim, generator=noise_rng)

    def sam_gradient(params, loss_fn, use_sam):
        grads = torch.autograd.grad(loss_fn(), params)
        if not use_sam:
            return grads
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        with torch.no_grad():
            eps = [rho * g / (norm + 1e-12) for g in grads]
            for p, e in zip(params, eps):
                p.add_(e)
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        return grads

    def adam_step(params, grads):
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, 0.999))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    fake = G(z_d).detach()
    d_params = list(D.parameters())
    d_grads = sam_gradient(
        d_params,
        lambda: F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean(),
        method == "sam_d",
    )
    adam_step(d_params, d_grads)
    g_params = list(G.parameters())
    g_grads = sam_gradient(g_params, lambda: F.softplus(-D(G(z_g))).mean(), method == "sam_g")
    adam_step(g_params, g_grads)
    for mine, theirs in (
        (out["weights"]["generator"], g_params),
        (out["weights"]["discriminator"], d_params),
    ):
        for p, q in zip(mine, theirs):
            torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


def test_resume_mid_run_equals_the_run_that_never_stopped(tmp_path):
    cfg = config()
    v = variant("sam_both", rho=0.05)
    identity = {"test": 1}
    whole = gan.train_gan(cfg, RING, v, 0)
    state = tmp_path / "run.state.pt"

    def stop(iteration):
        if iteration == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gan.train_gan(cfg, RING, v, 0, state_path=state, identity=identity, on_iteration=stop)
    assert gan.load_state(state)["iteration"] == 20  # the last checkpoint
    resumed = gan.train_gan(cfg, RING, v, 0, state_path=state, identity=identity)
    for player in ("generator", "discriminator"):
        for p, q in zip(whole["weights"][player], resumed["weights"][player]):
            assert torch.equal(p, q)
    assert whole["history"] == resumed["history"]
    assert whole["snapshots"] == resumed["snapshots"]
    # a state written for other settings is not resumed
    other = gan.train_gan(cfg, RING, v, 0, state_path=state, identity={"test": 2})
    assert other["history"] == whole["history"]


def _study_argv(out, *extra):
    return [
        "gan",
        "--datasets",
        "ring8",
        "--methods",
        "adam",
        "sam_g",
        "--seeds",
        "2",
        "--iterations",
        "30",
        "--eval-every",
        "10",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def _small_toml(tmp_path):
    path = tmp_path / "gan.toml"
    path.write_text(
        "hidden = 16\ndepth = 2\nz_dim = 4\neval_samples = 200\ncheckpoint_every = 10\n"
    )
    return path


def test_study_resumes_and_equals_the_uninterrupted_one(tmp_path, capsys, monkeypatch):
    toml = _small_toml(tmp_path)
    assert main(_study_argv(tmp_path / "whole", "--config", str(toml))) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    out, _ = capsys.readouterr()
    assert "sam_g" in out and "modes covered" in out

    real_train = gan.train_gan
    calls = []

    def stop_at_15(iteration):
        if iteration == 15:
            raise KeyboardInterrupt

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third run (adam, seed 1) stops at its 15th iteration
            kwargs["on_iteration"] = stop_at_15
        return real_train(*args, **kwargs)

    monkeypatch.setattr(gan, "train_gan", interrupted)
    assert main(_study_argv(tmp_path / "cut", "--config", str(toml))) == 130
    capsys.readouterr()
    monkeypatch.setattr(gan, "train_gan", real_train)
    runs = tmp_path / "cut" / "runs" / "ring8"
    assert len(list(runs.glob("*-seed*.json"))) == 2 + 2  # two results and their samples
    assert (runs / "adam-seed1.state.pt").is_file()
    assert main(_study_argv(tmp_path / "cut", "--config", str(toml))) == 0
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    drop = ("train_time", "time_per_iteration")
    for a, b in zip(whole["runs"], cut["runs"]):
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
    assert not (runs / "adam-seed1.state.pt").exists()
    # a third call trains nothing
    assert main(_study_argv(tmp_path / "cut", "--config", str(toml))) == 0
    _, err = capsys.readouterr()
    html = (tmp_path / "cut" / "report.html").read_text()
    assert html.count("<img") == 2  # metric curves and the scatter plots
    assert "generated samples over training" in html


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(datasets=["ring9"]), "Invalid datasets value"),
        (dict(datasets=[]), "Invalid datasets value"),
        (dict(methods=["adam", "sgd"]), "Invalid method value: 'sgd'"),
        (dict(methods=["sam_g:k=3"]), "Invalid option for method 'sam_g': k"),
        (dict(methods=["sam_g:rho=-1"]), "Invalid rho value"),
        (dict(methods=["adam", "adam"]), "duplicate labels"),
        (dict(methods=["adam:label=a(b)", "adam:label=a_b_"]), "name the same run files"),
        (dict(rho=[-0.1]), "Invalid rho value"),
        (dict(methods=["adam"], rho=[0.1]), r"Invalid rho value: 0\.1 \(no method here takes it"),
        (dict(seeds=0), "Invalid seeds value"),
        (dict(seeds=[1, 1]), "Invalid seeds value"),
        (dict(iterations=0), "Invalid iterations value"),
        (dict(iterations=2.5), "Invalid iterations value"),
        (dict(lr=-1.0), "Invalid lr value"),
        (dict(lr=float("nan")), "Invalid lr value"),
        (dict(beta1=1.0), "Invalid beta1 value"),
        (dict(eval_samples=1), "Invalid eval_samples value"),
        (dict(batch_size=1), "Invalid batch_size value"),
        (dict(baseline="sgd"), "Invalid baseline value"),
        (dict(device="gpu"), "Invalid device value"),
        (dict(colour="red"), "Invalid setting: colour"),
    ],
)
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        gan.build_config({**gan.DEFAULTS, **TINY, **changes})


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--iterations", "0"], "invalid iterations value"),
        (["--datasets", "moons"], "invalid datasets value"),
        (["--methods", "sam_g:rho=x"], "invalid rho value"),
        (["--rho", "a,b"], "invalid --rho value"),
        (["--seeds", "two"], "invalid --seeds value"),
        (["--config", "missing.toml"], "invalid config value"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_run(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    rc = main(["gan", "--out", str(out), "-q", *argv])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("samkit gan: error:") and match in err.lower()
    assert not (out / "runs").exists()


def test_a_corrupt_training_state_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    runs = out / "runs" / "ring8"
    runs.mkdir(parents=True)
    (runs / "adam-seed0.state.pt").write_bytes(b"not a state")
    rc = main(_study_argv(out))
    _, err = capsys.readouterr()
    assert rc == 2 and "Invalid training state" in err and err.count("\n") == 1
    assert not (runs / "adam-seed0.json").exists()


def test_list_and_api(tmp_path, capsys):
    assert main(["gan", "--list"]) == 0
    out, _ = capsys.readouterr()
    assert "grid25" in out and "sam_both" in out
    import samkit

    result = samkit.gan_study(
        **{k: v for k, v in TINY.items() if k != "seeds"},
        seeds=1,
        methods=["adam"],
        out=tmp_path / "api",
        quiet=True,
    )
    assert [r["label"] for r in result.rows] == ["adam"]
    assert result.report_path.is_file() and "adam" in result.table
    with pytest.raises(ValueError, match="Invalid setting"):
        samkit.gan_study(optimizers=["adam"], out=tmp_path / "x")


def test_each_mixture_has_its_own_size_unless_the_study_sets_one():
    default = gan.build_config({})
    assert (default.resolved("ring8").iterations, default.resolved("ring8").hidden) == (5000, 64)
    grid25 = default.resolved("grid25")
    assert (grid25.iterations, grid25.batch_size, grid25.hidden) == (8000, 256, 128)
    given = gan.build_config({"iterations": 300, "hidden": 32})
    assert [given.resolved(d).iterations for d in ("ring8", "grid25")] == [300, 300]
    assert [given.resolved(d).batch_size for d in ("ring8", "grid25")] == [128, 256]
    with pytest.raises(ValueError, match="Invalid hidden value"):
        gan.build_players(default, 0)  # unresolved: which width?


def test_a_method_whose_every_seed_diverges_gets_a_row_not_a_crash(tmp_path, capsys):
    """Every seed of adam diverges at lr 1e30: the table shows '-' for it (it raised a
    TypeError in the table, every rerun too) and the plot warns about nothing."""
    import warnings

    out = tmp_path / "g"
    argv = [
        "gan", "--datasets", "ring8", "--methods", "adam", "--seeds", "1",
        "--iterations", "20", "--eval-every", "10", "--batch-size", "32",
        "--lr", "1e30", "--out", str(out),
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" included
        rc = main(argv)
    printed, err = capsys.readouterr()
    assert rc == 1, err  # every run diverged: the study says so, and exits 1
    assert "every run diverged (1)" in err
    row = next(line for line in printed.splitlines() if line.startswith("ring8"))
    assert "- (1 diverged)" in row and "+-" not in row  # no mean, no spread
    assert (out / "results.json").exists() and (out / "report.html").exists()
    # its time is per iteration it trained (it stopped at the first: the time over 20
    # made it look 20 times cheaper)
    (record,) = json.loads((out / "results.json").read_text())["runs"]
    assert record["diverged"] and record["time_per_iteration"] == pytest.approx(
        record["train_time"], rel=1e-9
    )


def test_quick_keeps_each_data_sets_own_sizes():
    """--quick set Ring-8's batch and width for every data set: --quick --datasets grid25
    ran Grid-25 at Ring-8's size, which measures nothing (docs/rl_gan.md)."""
    from samkit.experiments.settings import merge

    merged = merge(gan.QUICK, {"datasets": ["grid25"]}, defaults=gan.DEFAULTS)
    grid = gan.build_config(merged).resolved("grid25")
    assert (grid.batch_size, grid.hidden) == (256, 128)
    ring = gan.build_config(merge(gan.QUICK, {}, defaults=gan.DEFAULTS)).resolved("ring8")
    assert (ring.batch_size, ring.hidden, ring.iterations) == (128, 64, 2000)


def test_rl_gan_and_compare_do_not_share_a_folder(tmp_path, capsys):
    """samkit rl into a samkit gan folder (or the reverse) overwrote its results.json,
    config.json and report, exit 0."""
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "g"
    argv = ["gan", "--datasets", "ring8", "--methods", "adam", "--seeds", "1",
            "--iterations", "10", "--eval-every", "10", "--batch-size", "32", "-q"]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0
    summary = (out / "results.json").read_text()
    capsys.readouterr()
    rl = ["rl", "--quick", "--seeds", "1", "--timesteps", "512", "--eval-episodes", "1",
          "--methods", "ppo", "-q", "--out", str(out)]  # fmt: skip
    assert main(rl) == 2
    assert "Invalid out value" in capsys.readouterr().err
    assert (out / "results.json").read_text() == summary
    compare = ["compare", "--dataset", "synthetic", "--train-size", "100", "--epochs", "1",
               "--seeds", "1", "--optimizers", "sgd", "--no-sharpness", "-q", "--out", str(out)]  # fmt: skip
    assert main(compare) == 2
    assert "holds a samkit gan study" in capsys.readouterr().err


def test_a_rerun_with_other_settings_says_what_it_trains_again(tmp_path, capsys):
    """A changed --iterations retrained a finished study over itself without a word (rl's
    --timesteps too): the rerun names the runs it keeps and those it trains again, and why,
    as `samkit compare` does."""
    import samkit

    settings = {k: v for k, v in TINY.items() if k != "seeds"}
    samkit.gan_study(**settings, seeds=1, methods=["adam"], out=tmp_path / "s", quiet=True)
    samkit.gan_study(**settings, seeds=1, methods=["adam"], out=tmp_path / "s")
    err = capsys.readouterr().err
    assert "holds finished runs: 1 kept, 0 retrained with other settings, 0 new" in err
    samkit.gan_study(
        **{**settings, "iterations": 40}, seeds=1, methods=["adam"], out=tmp_path / "s"
    )
    err = capsys.readouterr().err
    assert "holds finished runs: 0 kept, 1 retrained with other settings, 0 new" in err
    assert "retrained (iterations: 30 -> 40): ring8 adam seed 0" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("command", ["gan", "rl"])
def test_an_unusable_device_is_named_once(tmp_path, capsys, command):
    """It read "Invalid device value: 'cuda' (Invalid device value: 'cuda' (CUDA is ...))"."""
    assert main([command, "--quick", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("Invalid device value: 'cuda' (CUDA is not available here)"), err
    assert err.count("Invalid device value") == 1
