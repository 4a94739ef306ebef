"""What trains and what stays frozen under a strategy: requires_grad per timm stage (set_trainable) and the BatchNorm statistics of frozen parts (frozen in train mode, precise BN before validation, AdaBN on target images)."""

from __future__ import annotations

from transferkit.train.strategy import StrategyError


def stage_groups(model) -> list[list[str]]:
    """Parameter names per timm stage (a CNN stage, a transformer block), input side first, the classifier
    excluded (timm's group_matcher; a final norm stays with the top block: transferkit.arch.block_groups)."""
    from transferkit.models.arch import block_groups

    return block_groups(model)


def set_trainable(model, strategy: str, unfreeze_blocks: int) -> dict:
    """Set requires_grad for `strategy`; returns what trains. Frozen BatchNorms are handled by freeze_batchnorm."""
    head = {id(p) for p in model.get_classifier().parameters()}
    if strategy == "linear-probe":
        train_names = set()
    elif strategy == "partial":
        stages = stage_groups(model)
        if len(stages) < 2:
            raise StrategyError(
                f"strategy 'partial' needs a timm model with stage structure (group_matcher); "
                f"{type(model).__name__} has none: use full or linear-probe"
            )
        if unfreeze_blocks >= len(stages):
            raise StrategyError(
                f"train.unfreeze_blocks={unfreeze_blocks} but the model has {len(stages)} stages: "
                f"use at most {len(stages) - 1}, or --strategy full"
            )
        train_names = {n for g in stages[-unfreeze_blocks:] for n in g}
    else:
        train_names = {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in head or name in train_names)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return {"trainable_params": n_train, "frozen_params": n_all - n_train}


def freeze_batchnorm(model, all_stats: bool = False) -> None:
    """BatchNorms whose weights are frozen keep their running statistics too (eval mode); `all_stats`
    keeps every BatchNorm's statistics (its affine weights still train)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for m in model.modules():
        if isinstance(m, _BatchNorm) and (all_stats or not any(p.requires_grad for p in m.parameters(recurse=False))):
            m.eval()


def precise_batchnorm(model, samples, transform, batch_size: int) -> None:
    """Re-estimate the statistics of the BatchNorms that train (precise BN, Wu & Johnson 2021)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    frozen = [
        (m, {k: v.clone() for k, v in m.state_dict().items()})
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    adapt_batchnorm(model, samples, transform, batch_size)
    for m, state in frozen:
        m.load_state_dict(state)


def has_batchnorm(model) -> bool:
    from transferkit.models.arch import has_batchnorm as any_bn

    return any_bn(model)


def adapt_batchnorm(model, samples, transform, batch_size: int, progress: bool = False) -> int:
    """AdaBN (Li et al. 2016): replace BatchNorm running statistics with the target images' statistics.

    Only the statistics change (cumulative average over all given images); weights stay as they are.
    Returns the number of images used.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm
    from tqdm import tqdm

    from transferkit.data.loader import make_loader

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
        m.train()
    dev = next(model.parameters()).device
    n = 0
    with torch.no_grad():
        for xb, _ in tqdm(
            make_loader(samples, transform, batch_size), desc="adabn", unit="batch", disable=not progress, leave=False
        ):
            model(xb.to(dev))
            n += len(xb)
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        m.train(tr)
    model.eval()
    return n
