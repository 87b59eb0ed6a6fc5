"""kohya's block-wise ranks: ``block_dims`` / ``block_alphas`` (and the conv_ versions) per UNet block.

The lists are ordered like sd-scripts: every input block (IN00 = conv_in included), the middle
block, every output block — 25 values for SD 1.x/2.x, 19 for SDXL. A dim of 0 leaves the
block without LoRA. Blocks are found by the module's original (SGM) block number, so the same
list means the same blocks whatever the diffusers module names are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from library.errors import UserError
from networks.sgm_names import UNetLayout, block_table, to_sgm
from networks.targets import Target

Rank = tuple[int, float | None]


def block_counts(layout: UNetLayout) -> tuple[int, int]:
    """(input blocks including conv_in, output blocks)."""
    n_in = 1 + sum(layout.down_layers) + len(layout.down_layers) - 1
    n_out = sum(n + 1 for n in layout.down_layers)
    return n_in, n_out


def block_index(sgm_path: str, n_in: int) -> int | None:
    """Position of a module's block in the block_dims list, or None outside the numbered blocks."""
    head, _, rest = sgm_path.partition(".")
    if head == "input_blocks":
        return int(rest.split(".")[0])
    if head == "middle_block":
        return n_in
    if head == "output_blocks":
        return n_in + 1 + int(rest.split(".")[0])
    return None


def _checked(values: Sequence[float] | None, name: str, total: int, layout_text: str) -> Sequence[float] | None:
    if values is not None and len(values) != total:
        raise UserError(f"--network_args {name}: {len(values)} values given, this UNet needs {total} "
                        f"({layout_text}), in sd-scripts' order IN00..., MID, OUT00...")
    return values


def block_rank_fn(unet: nn.Module, dim: int, alpha: float, conv_dim: int | None, conv_alpha: float | None,
                  block_dims: Sequence[int] | None, block_alphas: Sequence[float] | None,
                  conv_block_dims: Sequence[int] | None,
                  conv_block_alphas: Sequence[float] | None,
                  alpha_of: Callable[[float | None, int], float | None] = lambda a, d: a,
                  ) -> Callable[[Target], Rank | None]:
    """(dim, alpha) per UNet target from the block lists; None leaves a target out.

    ``alpha_of(alpha, dim)``: the alpha to store for a module of that dim (rsLoRA folds its sqrt into it).
    """
    layout = UNetLayout.from_config(unet.config)
    n_in, n_out = block_counts(layout)
    total = n_in + 1 + n_out
    text = f"{n_in} input, 1 middle, {n_out} output blocks"
    block_dims = _checked(block_dims, "block_dims", total, text)
    block_alphas = _checked(block_alphas, "block_alphas", total, text)
    conv_block_dims = _checked(conv_block_dims, "conv_block_dims", total, text)
    conv_block_alphas = _checked(conv_block_alphas, "conv_block_alphas", total, text)
    table = block_table(layout)

    def rank(target: Target) -> Rank | None:
        index = block_index(to_sgm(target.path, table), n_in)
        if target.is_kxk_conv:
            if conv_block_dims is None or index is None:
                return (conv_dim, alpha_of(conv_alpha, conv_dim)) if conv_dim else None
            d = int(conv_block_dims[index])
            a = conv_block_alphas[index] if conv_block_alphas is not None else (conv_alpha or d)
        else:
            if block_dims is None or index is None:
                return dim, alpha_of(alpha, dim)
            d = int(block_dims[index])
            a = block_alphas[index] if block_alphas is not None else alpha
        return (d, alpha_of(float(a), d)) if d > 0 else None

    return rank
