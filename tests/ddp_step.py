"""torchrun helper of tests/train/test_distributed.py (not a test): one DDP step of the packaged MobileNetV2 on real
digits, each rank on its own share of the global batch, then this rank's weights and the image indices it
was given over one epoch, saved to OUT/rank<R>.pt.

    torchrun --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint localhost:0 tests/ddp_step.py TARGET OUT
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from transferkit.core.config import load_params
from transferkit.data.folder import load_with_params
from transferkit.models import zoo
from transferkit.train import distributed


def main(target: str, out: str) -> None:
    distributed.init()
    params = load_params(None, {"data.image_size": 32})
    ds = load_with_params(target, params)
    lm = zoo.create_model("mobilenetv2_100", num_classes=len(ds.classes), image_size=32)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    loader = distributed.train_loader(ds.splits["train"], zoo.eval_transform(lm.data_config), 16, seed=0)
    seen = [i for batch in loader.batch_sampler for i in batch]  # one epoch of this rank's shares
    step_model = distributed.wrap(lm.model, torch.device("cpu"))
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-3)
    step_model.train()
    xb, yb = next(iter(loader))
    F.cross_entropy(step_model(xb), yb).backward()
    opt.step()
    torch.save(
        {"state": lm.model.state_dict(), "before": before, "seen": seen, "batch": len(yb), "steps": len(loader)},
        Path(out) / f"rank{distributed.rank()}.pt",
    )
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
