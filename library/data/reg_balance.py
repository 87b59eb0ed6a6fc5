"""How many samples per epoch each image of a DreamBooth dataset gives (sd-scripts' rule for reg images)."""

from __future__ import annotations

from collections.abc import Sequence


def balance_reg_repeats(repeats: Sequence[int], is_reg: Sequence[bool]) -> list[int]:
    """Samples per epoch of each image, with sd-scripts' DreamBoothDataset rule for reg images.

    The regularisation samples of a dataset equal its training samples (images x num_repeats):
    reg images are taken in order with their own num_repeats until that count is reached (the
    last one taken keeps all its repeats, so it may be passed; later ones are left unused), then,
    if still short, every reg image gets one more repeat in turn (first images first). sd-scripts
    users rely on it: their step counts and the weight of --prior_loss_weight assume equal halves.
    """
    target = sum(n for n, reg in zip(repeats, is_reg, strict=True) if not reg)
    out = [0 if reg else n for n, reg in zip(repeats, is_reg, strict=True)]
    reg_indices = [i for i, reg in enumerate(is_reg) if reg]
    count = 0
    for i in reg_indices:
        if count >= target:
            break
        out[i] = repeats[i]
        count += repeats[i]
    if reg_indices and count < target:
        extra, rest = divmod(target - count, len(reg_indices))
        for k, i in enumerate(reg_indices):
            out[i] += extra + (1 if k < rest else 0)
    return out
