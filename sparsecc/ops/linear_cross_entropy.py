"""sparsecc::linear_cross_entropy: an output projection and its cross-entropy loss over tokens in chunks, with
the gradients a training step needs computed on the way, so the full logits never exist (Liger Kernel's
fused linear cross-entropy; Apple's Cut Cross-Entropy).

    linear_cross_entropy(h [N, D], weight [V, D], bias [V]?, target [N], reduction, ignore_index, smoothing,
                         cast, chunk, input_grad, weight_grad, channels?, k=-1, dim=0)
        -> (loss, d_h [N, D], d_weight [V, D], d_bias [V])

equals `cross_entropy(linear(h, weight, bias).to(cast), target, ...)` and its gradients for an incoming
gradient of 1; the autograd formula scales them by the real one. Gradients not asked for come back empty
(0 elements) and cost nothing. With k >= 0 the weight gradient is computed for k channels of `dim` only
(the first k, or those at `channels`): [V, k] for dim 1, [k, D] for dim 0 (subtensor_grads asks for that,
for a Channels head). One op in the graph: a partitioner cannot move the weight-gradient GEMMs
after the loss and keep every chunk's logits gradient alive for them. `chunked` is the same computation in
ATen ops, the decomposition that exported programs (artifacts) carry instead of the op.
"""
from __future__ import annotations

import torch


def _take(x, dim: int, channels, k: int):
    return x.narrow(dim, 0, k) if channels is None else x.index_select(dim, channels)


def chunked(h, weight, bias, target, reduction: str, ignore_index: int, smoothing: float, cast, chunk: int,
            input_grad: bool, weight_grad: bool, channels=None, k: int = -1, dim: int = 0, inplace: bool = False):
    """The op in ATen ops; inplace=True (the op's own kernel) reuses buffers, False (the decomposition traced into
    exported programs, which must be functional) does not."""
    vocab, dtype = weight.shape[0], cast or h.dtype
    valid_all = target != ignore_index
    safe_all = torch.where(valid_all, target, 0)
    count = valid_all.sum().to(dtype)                    # the mean's divisor: cross_entropy's total weight
    loss, d_h, d_w, d_b = None, [], None, None
    for start in range(0, h.shape[0], chunk):
        h_c, valid, safe = h[start:start + chunk], valid_all[start:start + chunk], safe_all[start:start + chunk]
        logits = torch.nn.functional.linear(h_c, weight, bias)
        logits = logits if cast is None else logits.to(cast)
        picked = logits.gather(1, safe[:, None]).squeeze(1)
        mean = logits.mean(1) if smoothing else None
        top = logits.amax(1, keepdim=True)
        # exp(logits - max), reused below as the softmax; in place, the chunk's one [rows, vocab] buffer
        e = logits.sub_(top).exp_() if inplace else (logits - top).exp()
        total = e.sum(1, keepdim=True)
        lse = (top + total.log()).squeeze(1)
        row = lse - picked
        if smoothing:
            row = (1 - smoothing) * row + smoothing * (lse - mean)
        part = torch.where(valid, row, 0).sum()
        loss = part if loss is None else loss + part
        del logits                # e holds the chunk's buffer; every name for it goes before the next chunk's
        if not (input_grad or weight_grad):
            del e
            continue
        # d loss / d logits = scale * (softmax - (1 - eps) onehot - eps / V), scale = valid / count (mean) or valid
        scale = valid.to(dtype) / count if reduction == "mean" else valid.to(dtype)
        # each row's target entry once: index_put with accumulate (scatter_add_ on a CPU bfloat16 tensor makes
        # a float32 copy of the whole chunk)
        at, fix = (torch.arange(len(safe), device=safe.device), safe), -(1 - smoothing) * scale
        if inplace:
            grad = e.mul_(scale[:, None] / total).index_put_(at, fix, accumulate=True)
        else:
            grad = (e * (scale[:, None] / total)).index_put(at, fix, accumulate=True)
        if smoothing:
            grad = grad - smoothing / vocab * scale[:, None]
        grad = grad.to(h.dtype)
        del e
        if input_grad:
            d_h.append(grad @ weight)
        if weight_grad:
            a, b = (grad.t(), h_c if k < 0 else _take(h_c, 1, channels, k)) if k < 0 or dim == 1 else \
                (_take(grad, 1, channels, k).t(), h_c)
            d_w = a @ b if d_w is None else d_w.addmm_(a, b) if inplace else d_w + a @ b
            del a, b
            if bias is not None:
                part_b = grad.sum(0)
                d_b = part_b if d_b is None else d_b.add_(part_b) if inplace else d_b + part_b
        del grad                  # else the next chunk's logits would be allocated beside this chunk's buffer
    return (loss / count if reduction == "mean" else loss, torch.cat(d_h) if input_grad else h.new_empty(0),
            d_w if weight_grad else h.new_empty(0), d_b if weight_grad and bias is not None else h.new_empty(0))


def workspace_bytes(h, weight, cast, chunk: int, input_grad: bool) -> int:
    """The memory the op's own kernel holds besides its outputs, at most: one chunk's [rows, vocab] logits
    buffer while the hidden-state gradient's pieces (less than that output, not yet allocated) accumulate, then
    those pieces while they are concatenated into the output."""
    logits = chunk * weight.shape[0] * (cast or h.dtype).itemsize
    return max(logits, h.numel() * h.element_size() if input_grad else 0)


@torch.library.custom_op("sparsecc::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         reduction: str, ignore_index: int, smoothing: float, cast: torch.dtype | None, chunk: int,
                         input_grad: bool, weight_grad: bool, channels: torch.Tensor | None = None, k: int = -1,
                         dim: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return tuple(t.contiguous() for t in chunked(h, weight, bias, target, reduction, ignore_index, smoothing,
                                                     cast, chunk, input_grad, weight_grad, channels, k, dim,
                                                     inplace=True))


def weight_grad_shape(weight_shape, k: int, dim: int) -> tuple[int, ...]:
    if k < 0:
        return tuple(weight_shape)
    return (weight_shape[0], k) if dim == 1 else (k, weight_shape[1])


@linear_cross_entropy.register_fake
def _(h, weight, bias, target, reduction, ignore_index, smoothing, cast, chunk, input_grad, weight_grad,
      channels=None, k=-1, dim=0):
    return (h.new_empty((), dtype=cast or h.dtype), h.new_empty(h.shape if input_grad else 0),
            weight.new_empty(weight_grad_shape(weight.shape, k, dim) if weight_grad else 0),
            h.new_empty(bias.shape if weight_grad and bias is not None else 0))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    h, weight, bias = inputs[:3]
    ctx.shapes = (h.shape, weight.shape, None if bias is None else bias.shape)
    ctx.computed = (inputs[9], inputs[10], inputs[10])


def _backward(ctx, grad_loss, *_):
    """The precomputed gradients times grad_loss. One the op did not compute (nothing trained needs it) is
    zeros when autograd asks for it: whole-step export wants a gradient for every parameter, and
    prune_backward removes it with everything that served only frozen parameters."""
    g = grad_loss.to(ctx.saved_tensors[0].dtype)
    return tuple(None if shape is None or not needed else g * d if done else d.new_zeros(shape)
                 for d, shape, done, needed in zip(ctx.saved_tensors, ctx.shapes, ctx.computed,
                                                   ctx.needs_input_grad)) + (None,) * 11


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
