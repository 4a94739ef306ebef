"""The validate stage: the gate (gain over the no-transfer baselines with its interval), overfitting checks, calibration figures and the error report.

The gate between training and export: overfitting and negative transfer are caught here.

    transferkit validate --run runs/demo/train

Negative-transfer guard (blocking while `validate.require_gain`). Transfer must beat what a user could do
without it, on the same splits (transferkit.baselines; every baseline trains on train, tunes on val):
  pixels-logreg / pixels-knn / pixels-svm   scikit-learn on raw pixels (seconds on CPU)
  small-cnn                                 a small CNN from random init, LR chosen on val
  scratch                                   the same architecture from random init, same budget
                                            (RUN/baseline/, or `--baseline DIR`)
A baseline whose val accuracy is not above chance is `broken`: listed, never the bar. The bar (`baseline`)
is the working baseline with the best val accuracy. `transfer_gain` is test accuracy minus the bar's, with
a paired interval (`gain_interval`, `validate.confidence`) and McNemar's exact p-value on the same test
images. Verdicts: "transfer helps" (lower bound > `validate.min_gain`), "negative transfer" (upper bound
< 0), "no clear gain" (in between: within test noise). Only the first passes. On a refusal,
`recommendation` names the better model, the likely reason from the drift verdict, and the options
(more labels, a closer source, another strategy, `export --force`).
  linear-probe     for runs that are not linear probes: the frozen source features with a linear head,
                   same budget (RUN/baseline_linear_probe/). Losing by more than
                   `validate.linear_probe_tolerance` blocks while `require_match_linear_probe`.
The scratch and linear-probe runs are reused when their folder saw the same data md5, seed and params.

Overfitting checks on RUN/metrics.json, each recorded in validation.json `checks` as {name, value,
threshold, failed, blocking, message}:
  accuracy_gap     train - val accuracy of the shipped (best) epoch > `validate.max_gap`. Blocking only
                   with worse generalisation (val accuracy no better than the best no-transfer
                   baseline's); otherwise a warning. With 10 labels per class a linear probe reaches
                   train accuracy 1.0 by construction: a 10-shot probe with a 0.26 gap that beat every
                   baseline by 9 test points is a good model, not an overfit one.
  loss_gap         val loss - train loss at the best epoch > `validate.max_loss_gap` (nats); blocking on the
                   same terms. The history's train loss includes label smoothing, dropout, augmentation.
  divergence       Longest run of consecutive epochs in which val loss sits above its best so far while
                   train loss is below its value at that best epoch, > `train.patience`: `train.min_epochs`
                   kept a memorising run going. Blocking on the same terms: the checkpoint that ships is
                   the best-val epoch from before the divergence (a probe whose tail diverged can still
                   beat the best no-transfer baseline beyond noise: tests/test_validate.py).
  wasted_epochs    warning. Epochs trained after the best epoch > `train.patience`.
  test_val_gap     warning. |test - val accuracy| > `validate.max_test_val_gap` (selection bias, or too
                   few val images to trust: with 40 images one estimate has a standard error of ~0.06).
Quality report of the shipped checkpoint on the test split (re-evaluated from model.safetensors):
  RUN/report.json        per-class precision/recall/F1/support, confusion matrix, macro F1, accuracy,
                         expected calibration error (ECE: `validate.calibration_bins` equal-width bins of
                         max softmax probability; sum over bins of share * |accuracy - mean confidence|)
  RUN/confusion.csv      one row per test image (actual, predicted): DVC's confusion template
  RUN/reliability.csv    per-bin confidence/accuracy/count (DVC plot)
  RUN/plots/{confusion,reliability,learning_curves}.png
  RUN/errors.html        error analysis (transferkit.report): highest-loss test and train images, the most
                         confused class pairs, train labels a held-out fit doubts; RUN/errors.json the same data
Writes RUN/validation.json with `passed` and plain-words `reasons`.
"""
