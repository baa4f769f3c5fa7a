"""Maximum-likelihood learning of an energy-based model with persistent short-run Langevin MCMC.

Plain torch (no Lightning): `advpure.training.ebm.EBMModule` wires these into a training loop, and the
tests train a 2-D toy energy with the very same functions.

Model p_phi(x) ∝ exp(-E_phi(x)). The maximum-likelihood gradient is (Nijkamp et al. 2019/2020;
Hill, Mitchell & Zhu, ICLR 2021, Algorithm 2)

    grad_phi L = grad_phi [ mean E_phi(x_data) - mean E_phi(x_model) ]

with x_model drawn by K steps of Langevin dynamics

    x <- x - (eta / 2) * grad_x E_phi(x) + s * n,    n ~ N(0, I)

started from persistent chains (a replay buffer; Tieleman 2008, Du & Mordatch 2019) of which a
fraction `reinit_prob` is restarted each step from uniform noise or from (noisy) data.

Step size and noise are decoupled, as in the usual practice: s = sqrt(eta) is Langevin dynamics
for exp(-E) proper; any other s runs it for the tempered density exp(-(eta / s^2) * E), i.e. the
learned E is the data's energy divided by the temperature s^2 / eta. Hill et al. write the update
as x <- x - grad E + eps * n with eps = 0.01 on [-1, 1] pixels (github.com/point0bar1/ebm-defense,
config_train_ebm/cifar10_ebm.json); on [0, 1] pixels, as here, that is eta = 0.5 and s = 0.005.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from advpure.nets.ebm import energy_field

Energy = Callable[[torch.Tensor], torch.Tensor]
INITS = ("uniform", "data")


def langevin_sample(
    energy: Energy,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise_std: float,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K = `steps` Langevin updates x <- x - (step_size/2) grad E(x) + noise_std * n (then clip to
    `clamp` when given). `x0`: any shape (N, ...); E returns (N,). The net's parameters get no
    gradient. Returns the detached final states and the mean over steps of the per-sample
    ||grad E|| (Nijkamp et al.'s r_{s_t} diagnostic; a scalar tensor)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if step_size < 0 or noise_std < 0:
        raise ValueError(f"step_size and noise_std must be >= 0, got {step_size}, {noise_std}")
    x = x0.detach()
    grad_norm = torch.zeros((), device=x.device, dtype=torch.float32)
    for _ in range(steps):
        field = energy_field(energy, x)  # -grad E, detached
        grad_norm += field.flatten(1).norm(dim=1).mean().float()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + (0.5 * step_size) * field + noise_std * noise
        if clamp is not None:
            x = x.clamp(*clamp)
    return x.detach(), grad_norm / max(steps, 1)


def ml_loss(
    e_data: torch.Tensor, e_model: torch.Tensor, l2: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Contrastive maximum-likelihood loss mean E(x_data) - mean E(x_model), plus
    l2 * mean(E(x_data)^2 + E(x_model)^2) (Du & Mordatch 2019's energy regulariser; it pins the
    otherwise free additive constant of E). e_data (B,), e_model (B',).
    Returns (loss, {"energy_data", "energy_model", "energy_gap" = energy_data - energy_model})."""
    gap = e_data.mean() - e_model.mean()
    loss = gap
    if l2 > 0:
        loss = loss + l2 * (e_data.square().mean() + e_model.square().mean())
    stats = {
        "energy_data": e_data.detach().mean(),
        "energy_model": e_model.detach().mean(),
        "energy_gap": gap.detach(),
    }
    return loss, stats


class PersistentChains:
    """A replay buffer of `size` persistent Langevin chains of shape `shape`, kept on one device.

    Each training step takes `n` distinct chains (`draw`), restarts each with probability
    `reinit_prob` from `init` ("uniform": U[0, 1]^D noise; "data": the given data batch's rows),
    and writes the updated states back (`put`). The initial buffer is U[0, 1]^D (Nijkamp et al.;
    Hill et al. start theirs from uniform noise in [-1, 1]). `size = 0` means no persistence: every
    step starts all chains from `init` (Nijkamp et al. 2019's non-persistent short-run MCMC).

    `state_dict()` / `load_state_dict()` hold the buffer (a float tensor, CPU) so that a resumed run
    continues the same chains; `initialized` is False until the first draw or a load.
    """

    def __init__(self, size: int, shape: tuple[int, ...], reinit_prob: float = 0.05, init: str = "uniform"):
        if size < 0:
            raise ValueError(f"buffer size must be >= 0, got {size}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob}")
        if init not in INITS:
            raise ValueError(f"unknown chain init '{init}'; allowed: {', '.join(INITS)}")
        self.size, self.shape, self.reinit_prob, self.init = int(size), tuple(shape), float(reinit_prob), init
        self.x: torch.Tensor | None = None

    @property
    def initialized(self) -> bool:
        return self.x is not None or self.size == 0

    def initialize(self, generator: torch.Generator, device: torch.device | str) -> None:
        """Fill the buffer with U[0, 1] noise from `generator` (whose device must be `device`)."""
        self.x = torch.rand((self.size, *self.shape), generator=generator, device=device)

    def to(self, device: torch.device | str) -> PersistentChains:
        if self.x is not None and self.x.device != torch.device(device):
            self.x = self.x.to(device)
        return self

    def draw(
        self,
        n: int,
        shared: torch.Generator,
        local: torch.Generator,
        data: torch.Tensor,
        rank: int = 0,
        world: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Start states (n, *shape) for this rank and their buffer rows (None without a buffer).

        `shared` must produce the same numbers on every rank (it picks n * world distinct rows,
        this rank taking slice `rank`); `local` is this rank's stream (restarts). `data`: (n, *shape)
        data rows used by init="data".
        """
        if data.shape[0] != n or tuple(data.shape[1:]) != self.shape:
            raise ValueError(f"data must have shape ({n}, {self.shape}), got {tuple(data.shape)}")
        device = data.device
        if self.size == 0:
            return self._fresh(n, local, data), None
        if n * world > self.size:
            raise ValueError(f"the replay buffer holds {self.size} chains, fewer than {n} x {world} ranks")
        if self.x is None:
            raise RuntimeError("PersistentChains.initialize() or load_state_dict() first")
        rows = torch.randperm(self.size, generator=shared, device=shared.device)[: n * world]
        idx = rows[rank * n : (rank + 1) * n].to(self.x.device)
        x0 = self.x.index_select(0, idx).to(device)
        if self.reinit_prob > 0:
            restart = torch.rand(n, generator=local, device=local.device).to(device) < self.reinit_prob
            fresh = self._fresh(n, local, data)
            x0 = torch.where(restart.view(-1, *([1] * len(self.shape))), fresh, x0)
        return x0, idx

    def _fresh(self, n: int, gen: torch.Generator, data: torch.Tensor) -> torch.Tensor:
        if self.init == "data":
            return data.detach().clone()
        return torch.rand((n, *self.shape), generator=gen, device=gen.device).to(data.device, data.dtype)

    def put(self, idx: torch.Tensor | None, x: torch.Tensor) -> None:
        """Write the chains' new states back to rows `idx` (no-op without a buffer)."""
        if idx is None or self.x is None:
            return
        self.x.index_copy_(0, idx.to(self.x.device), x.detach().to(self.x.device, self.x.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        x = self.x if self.x is not None else torch.empty((0, *self.shape))
        return {"x": x.detach().cpu().clone(), "size": torch.tensor(self.size)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        x = state["x"]
        if int(state["size"]) != self.size or (x.numel() and tuple(x.shape[1:]) != self.shape):
            raise ValueError(
                f"stored replay buffer has {int(state['size'])} chains of shape {tuple(x.shape[1:])}, "
                f"expected {self.size} of {self.shape}"
            )
        self.x = x.clone() if x.shape[0] == self.size and self.size > 0 else None
