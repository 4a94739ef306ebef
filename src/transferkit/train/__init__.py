"""The train stage: the strategy policy, linear probes, the fine-tune loop with its freezing and resume state, the search, DDP and pretraining.

Adapt a source model to the target task: feature extraction or fine-tuning, with a scratch baseline.

    transferkit train --target data/target --model mobilenetv2_100 --strategy auto --out runs/demo/train

Strategies (`--strategy`, or `train.strategy`)
  linear-probe  frozen backbone; a linear head trained on cached penultimate features (seconds)
  partial       the top `train.unfreeze_blocks` timm stages (model.group_matcher(coarse=True)) and the head
                train; lower stages are frozen, their BatchNorm statistics included
  full          fine-tune every layer at `train.lr` (10x below scratch), the head included
  lp-ft         linear probe first, then fine-tune everything from that head at `train.lr` (Kumar et al.
                2022: a random head distorts pretrained features early in fine-tuning; most under shift)
  scratch       same architecture from random init, same epochs: the baseline transfer must beat
Options: `train.layer_decay` (layer-wise LR decay through timm's param_groups_layer_decay: each stage's LR is
the one above it times the decay, the head keeps its own), and AdaBN (`train.adabn`): BatchNorm statistics
re-estimated on (unlabelled) target train+val images before training, for the frozen parts of a model.

`auto` is a measured choice (search_configs), `train.search_mode: evidence` by default: the first configuration of
`train.search` (the linear probe: seconds on cached features) is trained, then the fine-tunes (default: full) only
when the evidence says one can win (finetune_evidence): more than `train.linear_probe_max_per_class` labels per
class, or the probe not above the best no-transfer baseline on the same val images beyond noise (then the gate
would refuse it anyway). The first is kept and a later one replaces it only when better on the same val images
beyond noise (paired interval at `train.search_confidence` above 0). A fine-tune stops at half its epochs when it
is `train.search_prune` below the best so far. Work is bounded by epochs, never by a clock, so the same data,
params and seed ship the same model on an idle or a loaded machine. `strategy_reason` and metrics.json `search`
list every configuration's val accuracy, epochs, seconds, paired gain and the evidence. `search_mode: all` trains
every configuration; a killed search starts its configurations over.
With `train.search_mode: rule`, `auto` is the fixed rule (choose_strategy), in order:
  1. labels per class <= `train.linear_probe_max_per_class` -> linear-probe: too few labels to move millions
     of weights without overfitting;
  2. measured shift is severe (drift.json) -> lp-ft: the features need to adapt, and starting from a
     trained head keeps fine-tuning from wrecking them;
  3. a large model (>= `train.partial_min_params` million parameters) with timm stage structure -> partial;
  4. otherwise full.
  AdaBN (`train.adabn`, off by default): `auto` applies it when drift.json says shift was detected, the
  model has BatchNorm and some of it stays frozen (linear-probe, partial). It is not on by default because
  bench/transfer.py measured it costing a linear probe accuracy: the head is retrained on the target
  anyway, and statistics from a few hundred small target images are a worse normaliser than ImageNet's.

BatchNorm while fine-tuning (`train.bn_stats`): precise (default) re-estimates the statistics of the
BatchNorms that train on the train images before each validation (Wu & Johnson 2021). With 100 images an
epoch is 4 batches, and the running average (`update`) lagged so far behind the weights that val accuracy
swung 0.07-0.6 on digits-10; `frozen` (the source's statistics) diverged at LR 1e-3.

Regularisation: dropout before the head (`train.drop_rate`), stochastic depth in the residual blocks
(`train.drop_path_rate`, off by default), AdamW weight decay, label smoothing,
augmentation (random resized crop and colour jitter, no flips; each image's draws seeded by seed, epoch and
index, so no other thread's random numbers change them) and early stopping on validation loss (never before
`train.min_epochs`); the best epoch is the checkpoint that ships.

Devices: CUDA when present (bf16 autocast, channels_last, pinned-memory loaders), otherwise CPU with every
core we were given (or OMP_NUM_THREADS). Seeded; deterministic algorithms where the device has them.

Resume: fine-tuning writes OUT/checkpoint.pt atomically after every epoch (model, best state, optimizer,
scheduler, early-stopping state, history and every RNG state; read back with weights_only=True). Started
again with the same arguments (same fingerprint) after a crash or SIGKILL, a run continues from the
last finished epoch and ends with the same result as an uninterrupted one; a finished run removes it.

Outputs in OUT: model.safetensors, metrics.json, history.csv (DVC plots), params.yaml, and no_transfer.json (the
no-transfer baselines on the same splits: the search's evidence and validate's gate read it).
"""
