"""AttackCallback: runs one attack against one defense on every test batch, after test_step.

For the batch's images (or the first `max_images` of the benchmark), it runs the attack, then
classifies the final adversarial input `worst_of_n` times with fresh randomness (draw 0 is the
single draw) and, with the attack's path, derives every protocol's per-sample record. Protocols
with their own observations get them here too: the DW-box protocol runs the attack a second time
against the frozen defense (`Defense.frozen`), the noise floors classify the clean batch as often
as the protocol they belong to did. Records, the loss along the attack's iterations, a few
example images and the cost (score-network evaluations, seconds) go to the store in one
transaction per batch.

The Trainer must run with `inference_mode=False`: attacks need gradients in the test loop.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

from advpure.attacks import attack_class, run_attack
from advpure.core.errors import NonFiniteError
from advpure.core.rng import SampleRNG
from advpure.data.datamodule import is_empty_batch
from advpure.jobs.bench_loop import stage_error
from advpure.jobs.plan import Unit
from advpure.results import Observations, protocol, protocol_records
from advpure.results.store import EXAMPLE_LABEL, EXAMPLE_PREDICTION


class AttackCallback(Callback):
    """Attacks `unit.defense` with `unit.spec` on every test batch (see the module docstring)."""

    def __init__(
        self,
        unit: Unit,
        *,
        worst_of_n: int,
        protocols: list[str],
        image_grid: int,
        progress: bool = True,
    ):
        self.unit = unit
        self.worst_of_n, self.protocols, self.image_grid, self.progress = (
            worst_of_n,
            list(protocols),
            image_grid,
            progress,
        )
        self.track_path = any(protocol(p).needs_path for p in self.protocols)
        self.runs = {protocol(p).run for p in self.protocols}
        self.classes: int | None = None  # set from the first logits' width (the ensemble's stages)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        u = self.unit
        x, y, idx = batch
        if is_empty_batch(idx):  # a DDP rank without test batches
            return
        limit = u.spec.max_images
        if limit is not None:
            keep = idx < limit
            if not keep.any():
                return
            x, y, idx = x[keep], y[keep], idx[keep]
        b = pl_module.batch_id(idx)
        if pl_module.replay(u.defense, u.attack, b):
            return
        defense = pl_module.defense(u.defense)
        rng = SampleRNG(pl_module.seed, idx, stream=u.key)
        t0, e0 = time.perf_counter(), defense.score_evals
        spec = getattr(getattr(trainer, "datamodule", None), "spec", None)
        self.classes = spec.num_classes if spec is not None else None
        bar = self._bar(trainer, b)
        hooks = dict(progress=(lambda i: bar.update(1)) if bar else None)
        attack = dict(eps=u.eps, step=u.step, **hooks)
        frozen = clean = None
        try:
            with torch.enable_grad():
                result = run_attack(
                    u.spec, defense, x, y, rng.child("attack"), track_path=self.track_path, **attack
                )
            # Common random numbers: the final input is judged with the same defense noise as the
            # clean one in test_step (the attack never sees it), so eps = 0 reproduces natural
            # accuracy sample by sample and natural - robust is not blurred by evaluation noise.
            judge = pl_module.natural_rng(u.defense, idx)
            final = defense.evaluate(result.x_adv, y, judge, n=self.worst_of_n)
            if "frozen" in self.runs:  # DW-box: attack and judge the defense with its noise frozen
                with defense.frozen(pl_module.dwbox_seed(u.defense)), torch.enable_grad():
                    x_dw = run_attack(u.spec, defense, x, y, rng.child("dwbox"), **attack).x_adv
                    frozen = defense.evaluate(x_dw, y, judge, n=1)
            if "clean" in self.runs:  # noise floors: as many clean evaluations as the protocols made
                path = result.path_correct  # one row per iterate of every run (restarts, stages)
                iterates = next(iter(path.values())).shape[0] if path else result.losses.shape[0] - 1
                draws = pl_module.clean_draws(u.defense, x, y, idx, max(self.worst_of_n, iterates + 1))
                clean = {m: Observations(d, n=self.worst_of_n, path_len=iterates) for m, d in draws.items()}
        except NonFiniteError as e:
            raise stage_error(e, f"attack {u.attack} on {u.defense}, batch {b}", len(idx)) from None
        finally:
            if bar:
                bar.close()
        path = result.path_correct
        per_merge = {
            m: protocol_records(
                c,
                path[m] if path is not None else None,
                self.protocols,
                frozen=frozen[m] if frozen is not None else None,
                clean=clean[m] if clean is not None else None,
            )
            for m, c in final.items()
        }
        examples, classes = self._examples(defense, x, y, result.x_adv, idx, rng)
        traces = {int(i): result.losses[:, k].float().cpu().numpy() for k, i in enumerate(idx.tolist())}
        stats = dict(classes)
        if result.zero_grad is not None:
            stats["zero_grad"] = dict(zip(idx.tolist(), result.zero_grad.float().tolist()))
        pl_module.write(
            u.defense,
            u.attack,
            idx,
            per_merge,
            score_evals=defense.score_evals - e0,
            seconds=time.perf_counter() - t0,
            traces=traces,
            examples=examples,
            stats=stats or None,
        )

    def _examples(self, defense, x, y, x_adv, idx, rng):
        """Clean / adversarial / purified (one purification draw) for the first images of the run,
        and as per-sample stats their true class and the classifier's class of that purified image
        (`EXAMPLE_LABEL`, `EXAMPLE_PREDICTION`): ([(idx, clean, adv, purified)], {name: {idx: class}})."""
        sel = (idx < self.image_grid).nonzero().squeeze(1)
        if sel.numel() == 0 or self.unit.sweep or self.unit.check is not None:
            return None, {}
        with torch.no_grad():
            purified = defense.purify(x_adv[sel], rng.child("grid").subset(sel), draws=1).x
            predicted = defense.classify(purified).argmax(dim=-1)
        examples = [
            (
                int(idx[s]),
                x[s].float().cpu().numpy(),
                x_adv[s].float().cpu().numpy(),
                purified[k].float().cpu().numpy(),
            )
            for k, s in enumerate(sel.tolist())
        ]
        chosen = idx[sel].tolist()
        classes = {
            EXAMPLE_LABEL: dict(zip(chosen, y[sel].tolist())),
            EXAMPLE_PREDICTION: dict(zip(chosen, predicted.tolist())),
        }
        return examples, classes

    def _bar(self, trainer, b):
        if not self.progress or not trainer.is_global_zero or trainer.progress_bar_callback is None:
            return None
        from tqdm.auto import tqdm

        u = self.unit
        return tqdm(
            total=attack_class(u.spec.kind).total_iters(u.spec, self.classes)
            * (2 if "frozen" in self.runs else 1),
            desc=f"{u.defense} {u.attack} batch {b}",
            leave=False,
            position=1,
            dynamic_ncols=True,
        )
