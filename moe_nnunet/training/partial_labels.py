"""Partial labels: learning from datasets that annotate different subsets of one label map.

A case of a dataset that does not annotate label k shows k as background wherever it occurs, so nnU-Net's loss
would teach the network that k is background. The marginal loss (Shi, Xiao, Zhou et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation", MedIA 2021) removes that contradiction: for such
a case, the probabilities of the labels its dataset does not annotate are merged into background before the loss,

    p'(background) = p(background) + sum_{k not annotated} p(k),    p'(k) = 0 for k not annotated,

so the network is penalised only for what the case's annotation contradicts: predicting an annotated label where
it is not, or missing it. We chose it over per-dataset output heads (M4oE's code) and per-class sigmoid outputs
(MultiTalent, Ulrich et al., MICCAI 2023) because it keeps nnU-Net's softmax output, loss (Dice + cross-entropy,
deep supervision) and predictor unchanged: one output over the union of labels, predicted for any case without
knowing its dataset.

`merge_unannotated` applies the merge to logits: the background logit becomes the log-sum-exp of the background and
unannotated logits, and unannotated logits become a large negative number, so that nnU-Net's softmax of the result
is exactly p'. Applied to the network output before nnU-Net's `DC_and_CE_loss`, the cross-entropy is the marginal
cross-entropy, and the Dice term scores only annotated labels (an unannotated label has neither prediction nor
reference in that case; with nnU-Net's per-sample Dice of 3d configurations it adds a constant, no gradient). When
a case annotates every label the logits pass unchanged: the loss is nnU-Net's.
"""
from __future__ import annotations

import torch

__all__ = ["merge_unannotated", "marginalise_output"]


def merge_unannotated(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, *S) with each sample's unannotated labels merged into background; `annotated` is (B, K)
    bool (column 0, background, is always taken as annotated). Samples annotating every label are unchanged.
    Pass `annotated` on the host: it is checked there (no device synchronisation) and copied to the logits'
    device."""
    annotated = annotated.to(dtype=torch.bool).clone()
    annotated[:, 0] = True
    if bool(annotated.all()):
        return logits
    annotated = annotated.to(logits.device, non_blocking=True)
    view = annotated.shape + (1,) * (logits.ndim - 2)
    unannotated = ~annotated.view(view)
    into_background = unannotated.clone()
    into_background[:, 0] = True
    # a finite "minus infinity": exp() of it is 0, and differences with it stay finite in half precision
    very_negative = torch.finfo(logits.dtype).min / 4
    background = torch.logsumexp(logits.masked_fill(~into_background, float("-inf")), dim=1, keepdim=True)
    labels = logits[:, 1:].masked_fill(unannotated[:, 1:], very_negative)
    return torch.cat([background, labels], dim=1)


def marginalise_output(output, annotated: torch.Tensor):
    """`merge_unannotated` on a network output as nnU-Net's trainers and ours see it: logits, a list of logits
    (deep supervision), or the training dict of `M4oEUNet` (its "logits" and the experts' own "expert_logits",
    (B, E, K, *S))."""
    if isinstance(output, dict):
        out = dict(output, logits=marginalise_output(output["logits"], annotated))
        experts = output.get("expert_logits")
        if experts is not None:
            b, e = experts.shape[:2]
            flat = merge_unannotated(experts.flatten(0, 1), annotated.repeat_interleave(e, dim=0))
            out["expert_logits"] = flat.view(b, e, *flat.shape[1:])
        return out
    if isinstance(output, (list, tuple)):
        return type(output)(merge_unannotated(o, annotated) for o in output)
    return merge_unannotated(output, annotated)
