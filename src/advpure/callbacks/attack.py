"""AttackCallback: runs one attack against one defense on every test batch, after test_step.

For the batch's images (or the first `max_images` of the benchmark), it runs the attack, then
classifies the final adversarial input `worst_of_n` times with fresh randomness (draw 0 is the
single draw) and, with the attack's path, derives every protocol's per-sample record. Records,
the loss along the attack's iterations, a few example images and the cost (score-network
evaluations, seconds) go to the store in one transaction per batch.

The Trainer must run with `inference_mode=False`: attacks need gradients in the test loop.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

from advpure.attacks import run_attack
from advpure.data.datamodule import is_empty_batch
from advpure.results import NATURAL, protocol_records
from advpure.rng import SampleRNG
from advpure.suite import Unit


class AttackCallback(Callback):
    def __init__(
        self, unit: Unit, *, worst_of_n: int, ever_broken: bool, image_grid: int, progress: bool = True
    ):
        self.unit = unit
        self.worst_of_n, self.ever_broken, self.image_grid, self.progress = (
            worst_of_n,
            ever_broken,
            image_grid,
            progress,
        )

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
        bar = self._bar(trainer, b)
        with torch.enable_grad():
            result = run_attack(
                u.spec,
                defense,
                x,
                y,
                rng.child("attack"),
                eps=u.eps,
                step=u.step,
                track_path=self.ever_broken,
                progress=(lambda i: bar.update(1)) if bar else None,
            )
        if bar:
            bar.close()
        # Common random numbers: the final input is judged with the same defense noise as the clean
        # one in test_step (the attack never sees it), so eps = 0 reproduces natural accuracy
        # sample by sample and natural - robust is not blurred by evaluation noise.
        judge = SampleRNG(pl_module.seed, idx, stream=f"{u.defense}/{NATURAL}")
        final = defense.evaluate(result.x_adv, y, judge, n=self.worst_of_n)
        per_merge = {
            m: protocol_records(c, result.path_correct[m] if result.path_correct is not None else None)
            for m, c in final.items()
        }
        examples = self._examples(defense, x, result.x_adv, idx, rng)
        traces = {int(i): result.losses[:, k].float().cpu().numpy() for k, i in enumerate(idx.tolist())}
        pl_module.write(
            u.defense,
            u.attack,
            idx,
            per_merge,
            score_evals=defense.score_evals - e0,
            seconds=time.perf_counter() - t0,
            traces=traces,
            examples=examples,
        )

    def _examples(self, defense, x, x_adv, idx, rng):
        """Clean / adversarial / purified (one purification draw) for the first images of the run."""
        sel = (idx < self.image_grid).nonzero().squeeze(1)
        if sel.numel() == 0 or self.unit.sweep:
            return None
        with torch.no_grad():
            purified = defense.purify(x_adv[sel], rng.child("grid").subset(sel), draws=1).x
        return [
            (
                int(idx[s]),
                x[s].float().cpu().numpy(),
                x_adv[s].float().cpu().numpy(),
                purified[k].float().cpu().numpy(),
            )
            for k, s in enumerate(sel.tolist())
        ]

    def _bar(self, trainer, b):
        if not self.progress or not trainer.is_global_zero or trainer.progress_bar_callback is None:
            return None
        from tqdm.auto import tqdm

        u = self.unit
        return tqdm(
            total=int(u.spec.iters),
            desc=f"{u.defense} {u.attack} batch {b}",
            leave=False,
            position=1,
            dynamic_ncols=True,
        )
