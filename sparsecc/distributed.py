"""DDP that communicates only what trains: a communication hook (DDP's own extension point) for a model trained
under an update scheme, e.g. torch.compile(DDP(model), backend="sparsecc", options={"update": scheme}).

DDP all-reduces a bucket of every parameter's gradient; under a scheme most of them are zeros (frozen
parameters, and the channels outside a Channels slice). The hook packs, per bucket, only the trained elements
(whole "full" parameters, the k channels of a Channels weight), all-reduces that, averages it and writes it
back into the bucket; everything else in the bucket stays zero on every rank, so the result equals DDP's own
average. Frozen parameters still end with a zero `.grad` (DDP fills them): give the optimizer
scheme.trained(model), not the parameters whose .grad is set.
"""
import torch
import torch.distributed as dist

from .config import Channels, ConfigError, UpdateScheme


class TrainedOnlyHook:
    """State of the hook: which elements of which parameter travel, and the bytes sent so far."""

    def __init__(self, ddp, scheme: UpdateScheme):
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise ConfigError(f"sparsecc.ddp_trained_only needs a DistributedDataParallel model, got "
                              f"{type(ddp).__name__}")
        if not isinstance(scheme, UpdateScheme):
            raise ConfigError(f"sparsecc.ddp_trained_only needs an UpdateScheme, got {type(scheme).__name__}")
        model = ddp.module                        # patterns use the model's own names, not DDP's "module."
        rules = scheme.resolve(dict(model.named_parameters(remove_duplicate=False)))
        self.parts: dict[int, tuple | None] = {}  # id(parameter) -> None (all of it) or (axis, channel index)
        for name, p in model.named_parameters():
            rule = rules[name]
            if rule == "full":
                self.parts[id(p)] = None
            elif isinstance(rule, Channels):
                index = rule.indices(p)
                k = rule.count(p.shape[rule.axis])
                self.parts[id(p)] = (rule.axis, torch.arange(k, device=p.device) if index is None else index)
        self.group = ddp.process_group
        self.world = dist.get_world_size(self.group)
        self.bytes_sent = 0


def _pieces(state: TrainedOnlyHook, bucket) -> list[tuple[torch.Tensor, tuple | None]]:
    """(the parameter's gradient as a view of the bucket's buffer, its trained part) per trained parameter."""
    buffer, offset, out = bucket.buffer(), 0, []
    for p in bucket.parameters():
        view = buffer[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
        if id(p) in state.parts:
            out.append((view, state.parts[id(p)]))
    return out


def _hook(state: TrainedOnlyHook, bucket) -> torch.futures.Future[torch.Tensor]:   # DDP checks this annotation
    pieces = _pieces(state, bucket)
    if not pieces:                                 # a bucket of frozen parameters: nothing to send
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    flat = torch.cat([(g if part is None else g.index_select(part[0], part[1])).reshape(-1) for g, part in pieces])
    state.bytes_sent += flat.numel() * flat.element_size()
    work = dist.all_reduce(flat, group=state.group, async_op=True)

    def unpack(fut):
        mean, offset = fut.value()[0].div_(state.world), 0
        for g, part in pieces:
            shape = list(g.shape)
            if part is not None:
                shape[part[0]] = len(part[1])
            chunk = mean[offset:offset + torch.Size(shape).numel()].view(shape)
            offset += chunk.numel()
            if part is None:
                g.copy_(chunk)
            else:
                g.index_copy_(part[0], part[1], chunk)
        return bucket.buffer()
    return work.get_future().then(unpack)


def ddp_trained_only(ddp, scheme: UpdateScheme) -> TrainedOnlyHook:
    """Register the hook on a DistributedDataParallel model (before its first step); returns its state, whose
    bytes_sent counts the bytes all-reduced so far."""
    state = TrainedOnlyHook(ddp, scheme)
    ddp.register_comm_hook(state, _hook)
    return state
