"""DDP that communicates only what trains, through DDP's own extension points, for a model trained under an
update scheme with torch.compile(..., backend="sparsecc", options={"update": scheme}).

sparsecc.data_parallel(model, scheme) builds the DistributedDataParallel: frozen parameters are left out of
its reducer (DDP's ignore list), so they are never reduced and their .grad stays None; a communication hook
packs, per bucket, only the trained elements of the rest (whole "full" parameters, the k channels of a
Channels weight), all-reduces that, averages it and writes it back into the bucket; everything else in the
bucket stays zero on every rank, so the result equals DDP's own average. A DDP built by hand around a model
with frozen parameters is refused by the backend (it would reduce them and zero-fill their .grad).
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ._torch import ddp_ignore, unwrapped
from .config import Channels, UpdateScheme
from .errors import ConfigError


class TrainedOnlyHook:
    """State of the hook: which elements of which parameter travel, and the bytes sent so far."""

    def __init__(self, ddp: DistributedDataParallel, rules: dict):
        model = unwrapped(ddp)                    # patterns use the model's own names, not "module._orig_mod."
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
    pieces = _pieces(state, bucket)                # never empty: frozen parameters are not in DDP's buckets
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


def data_parallel(model, scheme: UpdateScheme, **ddp_kwargs) -> DistributedDataParallel:
    """DistributedDataParallel(model, **ddp_kwargs) that communicates only what scheme trains. model is the
    model itself or torch.compile(model, backend="sparsecc", ...) (both wrap orders work); scheme names the
    model's own parameters. Frozen parameters are left out of DDP: never reduced, .grad stays None under the
    sparsecc backend, and not broadcast by DDP, so they are copied from the group's first rank here, once.
    The hook's state (bytes_sent) is the returned module's `sparsecc_comm`."""
    if isinstance(model, DistributedDataParallel):
        raise ConfigError("sparsecc.data_parallel wraps the model in DistributedDataParallel itself; pass the "
                          "model (or torch.compile(model, ...)), not a DDP")
    if not isinstance(scheme, UpdateScheme):
        raise ConfigError(f"sparsecc.data_parallel needs an UpdateScheme, got {type(scheme).__name__}")
    own = dict(unwrapped(model).named_parameters(remove_duplicate=False))
    rules = scheme.resolve(own)
    frozen = {id(p) for n, p in own.items() if rules[n] == "frozen"}
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in frozen]
    group = ddp_kwargs.get("process_group") or dist.group.WORLD
    with torch.no_grad():
        for p in model.parameters():                  # each tensor once
            if id(p) in frozen:
                dist.broadcast(p, src=dist.get_global_rank(group, 0), group=group)
    ddp_ignore(model, names)
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    ddp.sparsecc_comm = TrainedOnlyHook(ddp, rules)
    ddp.register_comm_hook(ddp.sparsecc_comm, _hook)
    return ddp


def fsdp_sharded(module) -> list[str]:
    """The class names of the FSDP2 fully_shard'ed modules under module that hold parameters."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule
    return sorted({type(m).__name__ for m in module.modules()
                   if isinstance(m, FSDPModule) and any(True for _ in m.parameters())})
