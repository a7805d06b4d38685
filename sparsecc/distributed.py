"""DDP and FSDP2 that communicate only what trains, through the engines' own extension points, for a model
trained under an update scheme with torch.compile(..., backend="sparsecc", options={"update": scheme}).

sparsecc.data_parallel(model, scheme) builds the DistributedDataParallel: frozen parameters are left out of
its reducer (DDP's ignore list), so they are never reduced and their .grad stays None; a communication hook
packs, per bucket, only the trained elements of the rest (whole "full" parameters, the k channels of a
Channels weight), all-reduces that, averages it and writes it back into the bucket; everything else in the
bucket stays zero on every rank, so the result equals DDP's own average. A DDP built by hand around a model
with frozen parameters is refused by the backend (it would reduce them and zero-fill their .grad).

sparsecc.fully_shard(model, scheme) applies FSDP2's fully_shard to the model's root: frozen parameters get
requires_grad=False, so FSDP2 never reduces them and their .grad stays None; its custom reduce-scatter hook
(TrainedOnlyReduceScatter) sends only the trained elements of each gradient FSDP2 packs (a Channels weight's
k channels), all-reduced, and each rank keeps its shard of the result; the untrained elements of a shard are
zero on every rank, so the shard equals FSDP2's own reduce-scatter.
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ._torch import ddp_ignore, fsdp_groups, unwrapped
from .config import Channels, UpdateScheme
from .errors import ConfigError


def reduce_scatter(output, input, **kwargs):
    """dist.reduce_scatter_single (torch >= 2.13, what FSDP2 calls) or, before it, dist.reduce_scatter_tensor."""
    single = getattr(dist, "reduce_scatter_single", None)
    return single(output=output, input=input, **kwargs) if single else dist.reduce_scatter_tensor(output, input,
                                                                                                   **kwargs)


def _trained_parts(params: dict, rules: dict) -> dict[str, tuple | None]:
    """name -> None (all of it) or (axis, channel index) for each parameter the scheme trains."""
    parts = {}
    for name, p in params.items():
        rule = rules[name]
        if rule == "full":
            parts[name] = None
        elif isinstance(rule, Channels):
            index = rule.indices(p)
            k = rule.count(p.shape[rule.axis])
            parts[name] = (rule.axis, torch.arange(k, device=p.device) if index is None else index)
    return parts


class TrainedOnlyHook:
    """State of the hook: which elements of which parameter travel, and the bytes sent so far."""

    def __init__(self, ddp: DistributedDataParallel, rules: dict):
        own = dict(unwrapped(ddp).named_parameters())    # patterns use the model's own names, not "module."
        parts = _trained_parts(own, rules)
        self.parts = {id(p): parts[n] for n, p in own.items() if n in parts}   # id -> None or (axis, index)
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


class TrainedOnlyReduceScatter:
    """FSDP2's reduce-scatter comm (set_custom_reduce_scatter) for one parameter group: of the flat input FSDP2
    packs ([world, n]: row r holds every gradient's r-th dim-0 chunk), only the trained elements are all-reduced;
    each rank writes its row's share into its output shard (zeros elsewhere: those gradients are zero on every
    rank). On a ring that all-reduce moves twice its payload per rank where the reduce-scatter moves its input
    once, so the packed path runs only when the trained elements are under half of the input; otherwise, and
    for a call whose input is not the expected layout (another set of parameters had gradients), FSDP2's plain
    reduce-scatter runs. bytes_sent counts the payload sent either way."""

    def __init__(self, params: list[tuple[torch.Tensor, tuple, int]], parts: dict):
        self.params, self.parts = params, parts   # (registered parameter, full shape, shard dim) in FSDP2's order
        self.layouts: dict[tuple, tuple | None] = {}
        self.bytes_sent = 0

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def _layout(self, world: int, device: torch.device) -> tuple | None:
        """(bool [world, n] on device: which entries of the packed input are trained, trained entries per row),
        built once per world size and device; None if FSDP2 shards some gradient along a dimension other than 0
        (then its chunks are transposed before packing)."""
        if (world, device) not in self.layouts:
            rows = []
            for p, shape, dim in self.params:
                if id(p) not in self.parts:
                    continue                      # frozen: requires_grad=False, never among the gradients
                if dim != 0:
                    rows = None
                    break
                padded = torch.zeros((-(-shape[0] // world) * world, *shape[1:]), dtype=torch.bool)
                part = self.parts[id(p)]
                if part is None:
                    padded[:shape[0]] = True
                else:
                    padded[:shape[0]].index_fill_(part[0], part[1].cpu(), True)
                rows.append(padded.view(world, -1))
            mask = torch.cat(rows, 1) if rows else None
            self.layouts[world, device] = None if mask is None else (mask.to(device), mask.sum(1).tolist())
        return self.layouts[world, device]

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        world = dist.get_world_size(group)
        layout = self._layout(world, input_tensor.device)
        mask, counts = layout if layout is not None else (None, [])
        # on a ring an all-reduce moves twice its payload per rank, a reduce-scatter once: pack only below half
        if mask is None or mask.numel() != input_tensor.numel() or 2 * sum(counts) >= mask.numel():
            self.bytes_sent += input_tensor.numel() * input_tensor.element_size()
            return reduce_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        packed = input_tensor.view(world, -1)[mask]
        self.bytes_sent += packed.numel() * packed.element_size()
        dist.all_reduce(packed, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(counts[:rank])
        output_tensor.zero_()
        output_tensor[mask[rank]] = packed[start:start + counts[rank]]
        return None


def fully_shard(model, scheme: UpdateScheme, **fully_shard_kwargs):
    """FSDP2's fully_shard(model, **fully_shard_kwargs) on the model's root, communicating only what scheme
    trains; model is the model or torch.compile(model, backend="sparsecc", ...) (both orders work). Frozen
    parameters get requires_grad=False (never reduced, .grad stays None); every reduce-scatter carries only the
    trained elements (TrainedOnlyReduceScatter; its bytes_sent is the module's `sparsecc_comm`). FSDP2 does not
    broadcast: every rank must start from the same parameters, as with fully_shard itself. Submodules must not
    be sharded: the backend cannot apply a scheme across FSDP2's per-module hooks (it refuses such graphs)."""
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    if not isinstance(scheme, UpdateScheme):
        raise ConfigError(f"sparsecc.fully_shard needs an UpdateScheme, got {type(scheme).__name__}")
    sharded = fsdp_sharded(model)
    if sharded:
        raise ConfigError(f"sparsecc.fully_shard shards the root module itself, but {', '.join(sharded)} are "
                          f"already fully_shard'ed; pass the unsharded model")
    own = dict(unwrapped(model).named_parameters(remove_duplicate=False))
    rules = scheme.resolve(own)
    parts = _trained_parts(own, rules)       # from the full parameters: magnitude channels alike on every rank
    frozen = [p for name, p in own.items() if rules[name] == "frozen" and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        module = torch_fully_shard(model, **fully_shard_kwargs)
    except Exception:
        for p in frozen:                     # a fully_shard that fails (bad kwargs) leaves the model as it was
            p.requires_grad_(True)
        raise
    registered = unwrapped(module).named_parameters()   # fully_shard registered new (DTensor) parameters
    parts = {id(p): parts[name] for name, p in registered if name in parts}
    groups = fsdp_groups(module)
    if len(groups) != 1:
        raise ConfigError(f"sparsecc.fully_shard supports one parameter group (one mesh), got {len(groups)}")
    module.sparsecc_comm = TrainedOnlyReduceScatter(groups[0], parts)
    module.set_custom_reduce_scatter(module.sparsecc_comm)
    return module


def fsdp_sharded(module) -> list[str]:
    """The class names of the FSDP2 fully_shard'ed modules under module that hold parameters."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule
    return sorted({type(m).__name__ for m in module.modules()
                   if isinstance(m, FSDPModule) and any(True for _ in m.parameters())})
