"""Count the graphs regional torch.compile makes when bucket shapes change (no GPU needed).

    python bench/count_recompiles.py sd15      # or sdxl, sd-small, sd-tiny

Builds the UNet of a bench_lora_step.py case on the meta device (real sizes, no memory), wraps it with
networks.lora, compiles each repeated block as train_network.py does (library/train_setup.py: one
recompile limit per block class, sized from the model) with dynamo's "eager" backend (tracing without code
generation), and runs forward + backward for bucket-like shapes twice over. Dynamo is told to fail rather
than fall back to eager when a block class exceeds its limit, so a finished run proves every block stayed
compiled; the second pass must add no graph.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lora_step as bench  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from library.regional_compile import compile_regions, recompile_budget  # noqa: E402
from networks import lora  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", choices=[n for n, c in bench.CASES.items() if c.kind != "llm"])
    args = p.parse_args(argv)
    case = bench.CASES[args.case]
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**case.config)
    unet.requires_grad_(False)
    network = lora.create_network(1.0, bench.RANK, bench.RANK, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.to("meta")
    regions = compile_regions(unet)
    limit = recompile_budget(regions)
    for module in regions:
        module.compile(backend="eager", recompile_limit=limit)
    print(f"{args.case}: {len(regions)} regions, recompile limit {limit} per block class")
    s, b = case.size, case.batch
    shapes = [(b, s, s), (b, s, s * 3 // 4), (b, s * 3 // 4, s), (max(1, b - 1), s, s), (b, s // 2 + 8, s)]
    counts = []
    t0 = time.perf_counter()
    for _ in range(2):
        for batch, height, width in shapes:
            with torch.device("meta"):
                kwargs = {"encoder_hidden_states": torch.randn(batch, *case.context)}
                if case.kind == "sdxl":
                    kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280),
                                                   "time_ids": torch.randn(batch, 6)}
                out = unet(torch.randn(batch, 4, height, width), torch.tensor([10] * batch), **kwargs).sample
                out.float().mean().backward()
            print(f"  {(batch, height, width)}: {counters['stats']['unique_graphs']} graphs "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        counts.append(counters["stats"]["unique_graphs"])
    print(f"graphs after the first pass: {counts[0]}, after the second: {counts[1]}")
    return 0 if counts[0] == counts[1] else 1


if __name__ == "__main__":
    sys.exit(main())
