"""The diffusion purifiers (diffpure, gdmp, ve) behind the benchmark-level `Defense`: registered with
their config files, built by `build_defense` from network kinds, noise keyed per image through the
Defense (batch split, chunking), DW-box freezing per image, t* = 0 deterministic, the ve purifier's
sigma* checked against the score net's DSM range, and exact-gradient PGD through `run_attack` equal
to plain autograd's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from advpure.attacks import attack_params, eot_gradient, run_attack
from advpure.config import compose as C
from advpure.core.errors import ConfigError
from advpure.core.rng import SampleRNG
from advpure.purify import PURIFIERS, build_defense, purifier_class
from helpers.diffusion_toys import TinyEps, TinyField
from helpers.registries import isolated_registries

SHAPE = (2, 5, 5)


@pytest.fixture(autouse=True, scope="module")
def _toy_kind_and_one_thread():
    """The `toy_eps` network kind registered (signature eps(u, t)); tiny nets run on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    import advpure.kinds  # noqa: F401 (the built-in kinds registered before the snapshot)

    with isolated_registries():
        import helpers.toy_kind  # noqa: F401 (registers toy_eps)

        yield
    torch.set_num_threads(n)


def images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * torch.rand(n, *SHAPE, generator=g)).to(dtype)


def classifier(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(50, 3)).to(dtype)


def block(option: str, **values):
    """The typed defense block of conf/defense/<option>.yaml with `values` changed."""
    return C.defense_option({"option": option, **values})[1]


BLOCKS = {
    "diffpure": dict(net="toy_eps", t_star=0.01, dt=0.002),
    "diffpure_ode": dict(net="toy_eps", t_star=0.01, dt=0.002, mode="ode"),
    "gdmp": dict(net="toy_eps", rounds=2, steps=4),
    "ve": dict(sigma_star=0.2, level_stride=3),
}


def defense(name: str, dtype=torch.float32, **values):
    option = name.split("_")[0]
    nets = {"toy_eps": TinyEps().to(dtype), "score": TinyField().to(dtype)}
    return build_defense(block(option, **{**BLOCKS[name], **values}), classifier(dtype), nets)


def test_registered_with_their_config_files_and_nets():
    assert {"diffpure", "gdmp", "ve"} <= set(PURIFIERS.names())
    for kind, slots in (
        ("diffpure", {"eps": "ddpmpp"}),
        ("gdmp", {"eps": "ddpmpp"}),
        ("ve", {"score": "score"}),
    ):
        cfg = C.load("fmnist", [f"defense={kind}"])
        assert cfg.defense.kind == kind and cfg.defense.gradient_mode == "replay"
        assert purifier_class(kind).nets(cfg.defense) == slots
        line = purifier_class(kind).settings(cfg.defense)
        assert "exact, step-wise replay" in line and line.startswith(
            purifier_class(kind).describe(cfg.defense)
        )
    d = C.load("fmnist", ["defense=diffpure"]).defense
    assert (d.t_star, d.dt, d.diffuse, d.clamp) == (0.1, 0.001, "discrete", False)  # DiffPure's CIFAR-10
    assert "100 steps of dt=0.001" in purifier_class("diffpure").settings(d)
    with pytest.raises(ConfigError, match="gradient_mode"):
        C.load("fmnist", ["defense=gdmp", "defense.gradient_mode=adjoint"])


def test_ve_slot_is_a_field_the_joint_attack_can_use():
    d = defense("ve")
    assert d.has_field and d.field_slot == "score"
    x = images(2)
    assert torch.equal(d.field(x), d.nets["score"].net(x))
    assert not defense("diffpure").has_field


@pytest.mark.parametrize("name", list(BLOCKS))
def test_noise_keyed_per_image_through_the_defense(name):
    """Batch of 4 vs 2 + 2, and the nets chunked to 3 rows (max_batch): the same rows, bit for bit."""
    x, idx = images(4), [10, 11, 12, 13]
    whole = defense(name).purify(x, SampleRNG(7, idx), 2).x.view(2, 4, *SHAPE)
    a = defense(name).purify(x[:2], SampleRNG(7, idx[:2]), 2).x.view(2, 2, *SHAPE)
    b = defense(name).purify(x[2:], SampleRNG(7, idx[2:]), 2).x.view(2, 2, *SHAPE)
    assert torch.equal(whole, torch.cat([a, b], 1))
    chunked = defense(name, max_batch=3)
    assert torch.equal(chunked.purify(x, SampleRNG(7, idx), 2).x.view(2, 4, *SHAPE), whole)
    assert not torch.equal(whole[0], whole[1])  # two draws, two chains


@pytest.mark.parametrize("name", ["diffpure", "gdmp", "ve"])
def test_dwbox_freezes_every_noise_per_image(name):
    """Under `Defense.frozen`, the forward noise and every reverse step's noise are drawn once per image:
    one image purifies the same in every call, two images (even of the same pixels) differently."""
    d = defense(name)
    x = images(1).expand(2, *SHAPE).contiguous()  # one picture under two dataset indices
    with d.frozen(5):
        first = d.purify(x, SampleRNG(0, [3, 4])).x
        again = d.purify(x, SampleRNG(9, [3, 8])).x  # another stream, another neighbour: same noise
        twice = d.purify(x, SampleRNG(0, [3, 4]), 2).x  # EOT draws of one frozen replica
    assert not torch.allclose(first[0], first[1])
    assert torch.equal(first[0], again[0]) and torch.equal(twice[:2], twice[2:])
    assert not torch.equal(d.purify(x, SampleRNG(0, [3, 4])).x[0], first[0])  # not frozen: fresh noise


@pytest.mark.parametrize(
    "name,zero", [("diffpure", {"t_star": 0.0}), ("gdmp", {"rounds": 0}), ("ve", {"sigma_star": 0.0})]
)
def test_zero_noise_is_deterministic_and_attacks_coincide(name, zero):
    """t* = 0 (or no round, or sigma* = 0) is the identity: a deterministic defense of one replica, known
    before any net is loaded, and BPDA = exact-gradient PGD = DW-box = classifier PGD exactly."""
    params = block(name, **{**BLOCKS[name], **zero, "replicas": 3})
    assert not purifier_class(name).is_stochastic(params) and purifier_class(name).is_stochastic(block(name))
    d = defense(name, **zero, replicas=3)
    assert not d.stochastic and d.replicas == 1
    x, y = images(3), torch.tensor([0, 1, 2])
    outs = []
    for gradient in ("classifier", "bpda", "full"):
        p = attack_params("pgd", gradient=gradient, iters=3, eot=4)
        outs.append(run_attack(p, d, x, y, SampleRNG(0, [0, 1, 2]), eps=0.1, step=0.03).x_adv)
    with d.frozen(1):
        p = attack_params("pgd", gradient="full", iters=3, eot=4)
        outs.append(run_attack(p, d, x, y, SampleRNG(0, [0, 1, 2]), eps=0.1, step=0.03).x_adv)
    assert all(torch.equal(o, outs[0]) for o in outs[1:]) and not torch.equal(outs[0], x)


def test_ve_sigma_star_is_checked_against_the_trained_dsm_range(tmp_path):
    from advpure.jobs.benchmark import check_sigmas
    from advpure.jobs.plan import build_plan

    def plan(sigma_star):
        over = ["defense=ve", f"defense.sigma_star={sigma_star}", "benchmark.undefended=false"]
        over += [f"paths.artifacts={tmp_path}", "attack=[bpda40_eot15]", "benchmark.checks=false"]
        cfg = C.load("fmnist", over)
        return build_plan(cfg), SimpleNamespace(
            path=lambda kind: tmp_path / "absent.pt", blocks={"score": cfg.score}
        )

    check_sigmas(*plan(0.25))  # ncsnv2_small is trained on [0.01, 0.5]
    with pytest.raises(ConfigError) as e:
        check_sigmas(*plan(0.8))
    assert "sigma_star=0.8" in str(e.value) and "[0.01, 0.5]" in str(e.value)


@pytest.mark.parametrize("name", ["diffpure", "gdmp"])
def test_exact_gradient_pgd_equals_plain_autograd(name):
    """PGD-EOT with full gradients through `run_attack` on a float64 defense: the replayed gradient (the
    benchmark's default) equals plain autograd's to 1e-6 at every point, and so do the iterates."""
    x, y, idx = images(2, dtype=torch.float64), torch.tensor([1, 2]), [4, 9]
    p = attack_params("pgd", gradient="full", iters=3, eot=3)
    results, grads = {}, {}
    for mode in ("replay", "autograd", "surrogate"):
        d = defense(name, torch.float64, gradient_mode=mode, check_replay=mode == "replay", surrogate_steps=2)
        results[mode] = run_attack(p, d, x, y, SampleRNG(1, idx), eps=0.1, step=0.02)
        grads[mode] = eot_gradient(d, x, y, SampleRNG(2, idx), gradient="full", eot=3).grad
    assert grads["replay"].abs().max() > 1e-4
    assert torch.allclose(grads["replay"], grads["autograd"], atol=1e-6, rtol=0)
    assert torch.equal(results["replay"].x_adv, results["autograd"].x_adv)
    assert torch.allclose(results["replay"].losses, results["autograd"].losses, atol=1e-9, rtol=0)
    # Lee & Kim's surrogate: fewer, larger steps in the attack's graph, an approximation
    assert not torch.allclose(grads["surrogate"], grads["replay"], atol=1e-6, rtol=0)


def test_diffpure_runs_its_net_at_the_net_size_and_resizes_around_it():
    """DiffPure's ImageNet setting: a 256 net on 224 images, resized around the chain (`resize`); without
    it, a net of another size is a one-line error instead of a silent wrong-size forward."""
    net = TinyEps()
    net.image_size = 2 * SHAPE[-1]
    x = images(2)
    plain = build_defense(block("diffpure", **BLOCKS["diffpure"]), classifier(), {"toy_eps": net})
    with pytest.raises(ValueError, match=f"takes {net.image_size}x{net.image_size} images.*defense.resize"):
        plain.purify(x, SampleRNG(0, range(2)))
    sized = build_defense(
        block("diffpure", **BLOCKS["diffpure"], resize=net.image_size), classifier(), {"toy_eps": net}
    )
    out = sized.purify(x, SampleRNG(0, range(2))).x
    assert out.shape == x.shape and (out - x).abs().max() < 0.5  # t* = 0.01: close to the input
