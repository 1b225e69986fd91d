"""Step engines (engine.py), the fused LLS signal (fused.py) and the device data path (data/device.py).

What a CPU can check runs everywhere: the refusal of the graph engine off CUDA, the stream
schedule's ordering and lifetimes (run on the CPU with a recording stand-in for streams and an op
log that finds every cross-stream read without a happens-before edge), the closed-form signal
against the signal itself in every rule, basis, latent shape and layout, and the device loader's
determinism, resume and augmentation statistics. What needs a GPU (capture, replay, agreement of
graph and eager training) is in the CUDA section at the end, skipped with the reason shown.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lls
from lls.data import Augment, FileSplit, Split, make_loader
from lls.data.device import DeviceLoader
from lls.measure.bench import run_bench, split_engine
from lls.method.basis import BASIS_KINDS
from lls.method.fused import FusedProjection, block_losses
from lls.method.rules import RULES, create_rule
from lls.method.signals import ProjectionSignal
from lls.step.engine import StreamSchedule, check_capturable, is_capturable, optimizer_engine, resolve_engine
from lls.step.factory import build_trainer
from lls.step.optim import CAPTURABLE_OPTIMIZERS, create_optimizer
from lls.step.trainer import Trainer

from .conftest import TINY_INPUT, tiny_batch, tiny_net, tiny_trainer

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs and streams)")


def capturable_adam(params, lr, weight_decay):
    """torch's Adam with its step count on the device (capturable on CUDA)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, capturable=True)


def capturable_sf(params, lr, weight_decay):
    """The schedule-free AdamW the graph engine runs (lls.sfadamw), for eager runs too, so that an
    eager and a graph trainer compared step for step run the same implementation."""
    return create_optimizer("adamw-sf", params, lr, weight_decay, capturable=True)


# --- engine choice -------------------------------------------------------------------------------


def test_graph_engine_is_refused_on_a_cpu_with_one_line():
    with pytest.raises(lls.LLSError, match="needs a CUDA device") as error:
        Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="graph")
    assert "\n" not in str(error.value) and "--engine eager" in str(error.value)


def test_auto_is_eager_on_a_cpu_and_unknown_engines_are_named():
    assert Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="auto").engine is None
    with pytest.raises(lls.LLSError, match="known engines: eager, graph, auto"):
        resolve_engine("fast", "cpu")


def test_graph_engine_needs_capturable_optimizers():
    """By name: the registry's capturable implementation or, for ``auto``, the eager engine; a
    factory's optimizers are checked once built."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert is_capturable(capturable_adam(params, 1e-3, 0.0)) and is_capturable(
        capturable_sf(params, 1e-3, 0.0)
    )
    assert not is_capturable(torch.optim.Adam(params))
    assert not is_capturable(create_optimizer("adamw-sf", params, 1e-3))  # the schedulefree package
    assert optimizer_engine("auto", "cuda", "adamw-sf") == "graph"
    assert optimizer_engine("auto", "cpu", "adamw-sf") == "eager"
    assert optimizer_engine("auto", "cuda", "sgd-sf") == "eager"
    with pytest.raises(lls.LLSError, match=r"'sgd-sf' has none; capturable: .*adamw-sf"):
        optimizer_engine("graph", "cuda", "sgd-sf")
    with pytest.raises(lls.LLSError, match="Adam is not"):
        check_capturable([torch.optim.Adam(params)])


@pytest.mark.parametrize("name", CAPTURABLE_OPTIMIZERS.names())
def test_every_capturable_implementation_passes_the_graph_engines_check(name):
    """What the registry offers the graph engine, built for an accelerator (the meta device stands
    in), is what the engine accepts; the same name built for the eager engine is not marked."""
    on_device = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert is_capturable(create_optimizer(name, on_device, 1e-3, capturable=True))
    if name != "adamw-sf-authors":  # the authors' variant is lls's own AdamW in both registries
        assert not is_capturable(create_optimizer(name, on_device, 1e-3))


def test_eager_engine_steps_exactly_as_before():
    """``engine="eager"`` and ``"auto"`` on a CPU are the trainer's own step: same weights bit for bit
    as the step written out by hand (blocks in order, each on its own detached input)."""
    a = Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="eager")
    b = Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="auto")
    x, y = tiny_batch()
    a.train_step(x, y)
    b.train_step(x, y)
    for p, q in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_trainer_takes_an_optimizer_factory():
    trainer = Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, optimizer=capturable_adam, lr=1e-3)
    assert all(isinstance(o, torch.optim.Adam) and is_capturable(o) for o in trainer.optimizers)
    assert len(trainer.optimizers) == len(trainer.net.blocks) + 1  # (capturable Adam steps on CUDA only)


# --- the stream schedule, as data ------------------------------------------------------------------


class _Event:
    pass


class TraceStreams:
    """A :class:`~lls.step.engine.StreamBackend` for the CPU: ops run at once in program order, and the
    log records streams' events, waits, keep-alives and (through :class:`OpLog`) every op with the
    stream it was issued on, what it read and what it wrote."""

    def __init__(self) -> None:
        self.current, self.log, self.count = "main", [], 0

    def stream(self):
        self.count += 1
        return f"S{self.count - 1}"

    def event(self):
        return _Event()

    def current_stream(self):
        return self.current

    def record(self, event, stream):
        self.log.append(("record", stream, event))

    def wait(self, stream, event):
        self.log.append(("wait", stream, event))

    @contextmanager
    def use(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def keep_alive(self, tensor, stream):
        self.log.append(("keep", stream, _ptr(tensor)))


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class OpLog(TorchDispatchMode):
    """Logs each aten op as ("op", stream, name, reads, writes, outputs) storage pointers; holds every
    output so that no storage is reused while logging (which would alias unrelated tensors)."""

    def __init__(self, backend: TraceStreams) -> None:
        super().__init__()
        self.backend, self.held = backend, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        reads, writes, made = set(), set(), set()
        schema = func._schema
        bound = list(zip(schema.arguments, args, strict=False)) + [
            (a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs
        ]
        for arg, value in bound:
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor) and _ptr(t):
                    written = arg.alias_info is not None and arg.alias_info.is_write
                    (writes if written else reads).add(_ptr(t))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(schema.returns, outputs, strict=False):
            if isinstance(t, torch.Tensor) and _ptr(t) and ret.alias_info is None:
                made.add(_ptr(t))  # a new tensor (views and in-place results alias an input)
        self.held.append(out)
        self.backend.log.append(("op", self.backend.current, str(func), reads, writes | made, made))
        return out


def check_schedule(log: list, inputs: set[int]) -> list[str]:
    """Every problem in a logged step: a read or write of memory that another stream wrote (or
    read) without a chain of events ordering the two, or memory made on one stream (or an input
    made before the step on the calling stream) read on another side stream without a keep-alive.
    Vector clocks: each stream's clock counts its ops; a record copies the stream's clock into the
    event, a wait merges the event's clock into the waiting stream's."""
    clocks: dict[str, dict[str, int]] = {}
    events: dict[int, dict[str, int]] = {}
    last_write: dict[int, tuple[str, int]] = {}
    reads_since: dict[int, list[tuple[str, int]]] = {}
    made_on = {ptr: "main" for ptr in inputs}
    kept = {(stream, ptr) for kind, stream, ptr in (e[:3] for e in log) if kind == "keep"}
    problems = []

    def before(stamp: tuple[str, int], clock: dict[str, int]) -> bool:
        return clock.get(stamp[0], 0) >= stamp[1]

    for entry in log:
        kind, stream = entry[0], entry[1]
        clock = clocks.setdefault(stream, {})
        if kind == "record":
            events[id(entry[2])] = dict(clock)
        elif kind == "wait":
            for s, c in events.get(id(entry[2]), {}).items():
                clock[s] = max(clock.get(s, 0), c)
        elif kind == "op":
            _, _, name, reads, writes, made = entry
            clock[stream] = clock.get(stream, 0) + 1
            stamp = (stream, clock[stream])
            for ptr in reads | writes:
                if ptr in last_write and not before(last_write[ptr], clock):
                    problems.append(f"{name} on {stream} races with the write on {last_write[ptr][0]}")
            for ptr in writes - made:
                for read in reads_since.get(ptr, []):
                    if not before(read, clock):
                        problems.append(f"{name} on {stream} overwrites what {read[0]} may still read")
            for ptr in reads:
                home = made_on.get(ptr)
                if home is not None and home != stream and stream != "main" and (stream, ptr) not in kept:
                    problems.append(
                        f"{name} on {stream} reads memory made on {home} without keeping it alive"
                    )
                reads_since.setdefault(ptr, []).append(stamp)
            for ptr in writes:
                last_write[ptr] = stamp
                reads_since[ptr] = []
            for ptr in made:
                made_on.setdefault(ptr, stream)
    return problems


@pytest.mark.parametrize("rule,fused", [("lls", False), ("lls", True), ("lls-mxm", True), ("drtp", False)])
def test_stream_schedule_orders_every_cross_stream_access(rule, fused):
    """One training step issued with the stream schedule, on the CPU, logged op by op: every block
    runs on its own stream, no access races, every cross-stream read is kept alive, and the
    weights are bit-for-bit those of the serial step (the schedule changes where, not what)."""
    serial, trainer = tiny_trainer(rule), tiny_trainer(rule)
    losses = {}
    for t in (serial, trainer):
        shapes = t.net.block_output_shapes(TINY_INPUT)
        cpu = torch.device("cpu")
        losses[t] = block_losses(t.signals, shapes, device=cpu, dtype=torch.float32) if fused else None
    first, (x, y) = tiny_batch(seed=3), tiny_batch(seed=4)
    for t in (serial, trainer):  # a first step: optimizer states and cached constants exist
        t.step.local_pass(*first, t.step.update, signals=losses[t])
    backend = TraceStreams()
    schedule = StreamSchedule(len(trainer.net.blocks) + 1, backend)
    with OpLog(backend):
        schedule.begin((x, y))
        done = trainer.step.local_pass(x, y, trainer.step.update, signals=losses[trainer], schedule=schedule)
    reference = serial.step.local_pass(x, y, serial.step.update, signals=losses[serial])
    assert check_schedule(backend.log, {_ptr(x), _ptr(y)}) == []
    streams = {entry[1] for entry in backend.log if entry[0] == "op"}
    assert streams == {f"S{i}" for i in range(len(trainer.net.blocks) + 1)} | {"main"}
    assert torch.equal(done.block_losses, reference.block_losses) and torch.equal(done.loss, reference.loss)
    for p, q in zip(trainer.net.parameters(), serial.net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_checker_finds_a_missing_wait_and_a_missing_keep_alive():
    """The checker is not vacuous: drop the wait on the previous block's output, or its keep-alive,
    and it reports the race / the unprotected read."""
    for broken in ("wait", "keep"):
        trainer = tiny_trainer("lls")
        trainer.step.local_pass(*tiny_batch(seed=3), trainer.step.update)
        backend = TraceStreams()
        schedule = StreamSchedule(len(trainer.net.blocks) + 1, backend)
        x, y = tiny_batch(seed=4)
        with OpLog(backend):
            schedule.begin((x, y))
            trainer.step.local_pass(x, y, trainer.step.update, schedule=schedule)
        target = schedule.outputs[0] if broken == "wait" else None  # block 0's output event / tensor
        index = next(
            i
            for i, e in enumerate(backend.log)
            if e[0] == broken
            and e[1] == "S1"
            and (e[2] is target if target is not None else e[2] not in (_ptr(x), _ptr(y)))
        )
        del backend.log[index]
        problems = check_schedule(backend.log, {_ptr(x), _ptr(y)})
        assert problems and all("S1" in p for p in problems), (broken, problems)


def test_dfa_cannot_overlap_its_blocks():
    trainer = tiny_trainer("dfa")
    schedule = StreamSchedule(len(trainer.net.blocks) + 1, TraceStreams())
    schedule.begin()
    with pytest.raises(ValueError, match="waits for the head"):
        trainer.step.local_pass(*tiny_batch(), trainer.step.update, schedule=schedule)


# --- the fused signal ------------------------------------------------------------------------------


def _variants() -> list[tuple[str, dict]]:
    """Every rule whose block signal has a fused form, with every basis kind it takes, plus LLS-MxM
    reduced to fewer basis rows and every readout drawn or trained wide and pooled (readout_width):
    generated from the registries, so a new rule or kind is tested."""
    out = []
    for name in RULES.names():
        takes_basis = "basis" in {f.name for f in dataclasses.fields(RULES.get(name))}
        for options in [{"basis": kind} for kind in BASIS_KINDS] if takes_basis else [{}]:
            signal = create_rule(name, **options).signal(0, torch.Size((2, 3, 3)), None, 5)
            if signal is not None and signal.fused(torch.Size((2, 3, 3)), device="cpu", dtype=torch.float32):
                out.append((name, options))

    def takes(name, option, options):  # readout_width: only with a drawn basis, or a learned readout
        drawn = "basis" not in options or BASIS_KINDS.get(options["basis"]).drawn
        return option in {f.name for f in dataclasses.fields(RULES.get(name))} and (
            option != "readout_width" or drawn
        )

    reduced = [(n, {**o, "reduced": 3}) for n, o in out if takes(n, "reduced", o)][:1]
    wide = [(n, {**o, "readout_width": 7}) for n, o in out if takes(n, "readout_width", o)]
    return out + reduced + wide


VARIANTS = _variants()
# (block output shape without batch, latent pool, layout): a conv output pooled (even bins, uneven
# overlapping bins 5 -> 2, global pooling), a conv output as it is, in both memory layouts; a dense
# output stretched (4 -> 6), averaged (8 -> 4), pooled unevenly (6 -> 4) and taken as it is
CONV = [((3, 4, 4), 2), ((3, 5, 5), 2), ((3, 4, 4), 1), ((2, 3, 3), None)]
DENSE = [((4,), 6), ((8,), 4), ((6,), 4), ((8,), None)]
LATENTS = [(*c, layout) for c in CONV for layout in ("contiguous", "channels-last")]
LATENTS += [(*d, "contiguous") for d in DENSE]


def _signal(rule, options, shape, pool, dtype=torch.float64) -> ProjectionSignal:
    torch.manual_seed(0)
    return create_rule(rule, **options).signal(0, torch.Size(shape), pool, 5).to(dtype)


def _output(shape, channels_last, dtype, seed=0):
    a = torch.randn(len(LABELS), *shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    return a.requires_grad_()


LABELS = torch.tensor([0, 4, 2, 2])


@pytest.fixture
def one_thread():
    """Each case runs a few dozen ops on tensors of a few hundred elements, where intra-op threads
    only add hand-offs (many times slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape,pool,layout", LATENTS, ids=str)
@pytest.mark.parametrize("rule,options", VARIANTS, ids=str)
def test_fused_form_equals_the_signal(rule, options, shape, pool, layout, one_thread):
    """The fused form (the graph engine's) is the signal's own loss: equal in value and in gradients
    with respect to the block output and the signal's parameters, to float64 rounding (so its
    backward is autograd's exact one) and to float32 tolerance, for every rule x basis x latent
    shape x layout; the gradient comes back in the output's own memory format (no layout copy)."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        signal = _signal(rule, options, shape, pool, dtype)
        (fused,) = block_losses([signal], [torch.Size(shape)], device=torch.device("cpu"), dtype=dtype)
        a = _output(shape, layout == "channels-last", dtype)
        inputs = (a, *signal.parameters())
        for loss in (fused, fused.closed_form):  # the engine's call, and the closed form whatever it picks
            want, got = signal(a, LABELS), loss(a, LABELS)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            g_wants, g_gots = torch.autograd.grad(want, inputs), torch.autograd.grad(got, inputs)
            for g_want, g_got in zip(g_wants, g_gots, strict=True):
                # atol: gradient elements near 0 keep a few-ulp absolute difference on any CPU
                torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol / 10)
            if a.dim() == 4 and pool != 1:
                assert g_gots[0].stride() == a.stride()


def test_fused_signal_at_a_silent_sample_follows_the_clamped_norm():
    """A sample whose whole block output is 0 (norm below eps): autograd's gradient there is
    g / eps through the clamp, with no norm term; the closed form does the same."""
    signal = _signal("lls", {"basis": "periodic"}, (6, 8, 8), 2)
    plan = FusedProjection(signal, (6, 8, 8), dtype=torch.float64)
    a = _output((6, 8, 8), False, torch.float64)
    with torch.no_grad():
        a[2] = 0
    want = torch.autograd.grad(signal(a, LABELS), a)[0]
    got = torch.autograd.grad(plan.closed_form(a, LABELS), a)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert want[2].abs().max() > 0  # the silent sample does get a gradient


def test_fused_signal_at_a_norm_of_exactly_eps_keeps_the_norm_term():
    """A latent whose norm is exactly eps: the clamp max(|p|, eps) passes its gradient there
    (autograd's clamp lets x >= min through), so the norm's term is kept; only a norm below eps
    drops it. (1e-12 in one entry of a float64 latent has norm exactly 1e-12.)"""
    signal = _signal("lls", {"basis": "periodic"}, (8,), None)
    plan = FusedProjection(signal, (8,), dtype=torch.float64)
    a = _output((8,), False, torch.float64)
    with torch.no_grad():
        a[1] = 0
        a[1, 3] = signal.eps
    assert torch.linalg.vector_norm(a[1]).item() == signal.eps
    want = torch.autograd.grad(signal(a, LABELS), a)[0]
    got = torch.autograd.grad(plan.closed_form(a, LABELS), a)[0]
    # the sample's gradient is ~1 / eps, its along-the-latent entry 0 up to rounding of that size
    scale = want[1].abs().max()
    assert scale > 1e9 and want[1, 3].abs() < 1e-10 * scale
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * scale)


def test_fused_signal_checks_the_latent_size():
    signal = _signal("lls", {}, (6, 8, 8), 2)  # latent 6 * 2 * 2 = 24
    FusedProjection(signal, (6, 10, 10))  # pooled to 2 x 2 all the same
    with pytest.raises(lls.LLSError, match="latent size 20, its signal was built for 24"):
        FusedProjection(signal, (5, 8, 8))


class _OpCount(TorchDispatchMode):
    """Counts aten ops that compute something (not views), and those whose output is at least as
    large as the latent (N x d): a proxy for kernels, and for the ones that move the most bytes."""

    def __init__(self, big: int):
        super().__init__()
        self.count, self.big, self.size = 0, 0, big

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            self.count += 1
            self.big += isinstance(out, torch.Tensor) and out.numel() >= self.size
        return out


def _op_variants() -> list[tuple[str, dict]]:
    """One variant per rule and normalisation: the op counts depend on nothing else."""
    seen, out = set(), []
    for name, options in VARIANTS:
        key = (name, "basis" in options and BASIS_KINDS.get(options["basis"]).normalized)
        if key not in seen and not {"reduced", "readout_width"} & set(options):
            seen.add(key)
            out.append((name, options))
    return out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rule,options", _op_variants(), ids=str)
def test_fused_signal_issues_fewer_ops(rule, options, channels_last):
    """The point of the closed form: for a VGG8-like block (64 x 16 x 16, pool 2), fewer ops (kernels
    on a GPU) for the forward and backward of a normalised loss than autograd's chain, and fewer
    over latent-sized tensors; for unnormalised ones, fewer over latent-sized tensors when
    channels-last, else the chain itself (FusedProjection.__call__).
    Counted after a first call of each, so that cached constants are not counted."""
    shape, n = (64, 16, 16), len(LABELS)
    signal = _signal(rule, options, shape, 2, torch.float32)
    plan = FusedProjection(signal, shape, dtype=torch.float32)
    counts = []
    for loss in (signal, plan):
        for _ in range(2):
            a = _output(shape, channels_last, torch.float32)
            with _OpCount(n * signal.dim) as ops:
                loss(a, LABELS).backward()
        counts.append((ops.count, ops.big))
    (chain, chain_big), (fused, fused_big) = counts
    if signal.normalize:
        assert fused < chain and fused_big < chain_big, counts
    elif channels_last:  # unnormalised: no more ops, and no layout copies of the latent
        assert fused <= chain and fused_big < chain_big, counts
    else:
        assert (fused, fused_big) == (chain, chain_big), counts


# --- the device data path --------------------------------------------------------------------------


def _split(n=300, size=10):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)  # no zero pixel
    return Split(images, torch.arange(n) % 7)


AUGMENT = Augment(crop_padding=2, hflip=True, erasing=0.3)


def _loader(split, **options):
    common = {"mean": (0.5,), "std": (0.25,), "augment": AUGMENT, "shuffle": True, "seed": 5}
    return make_loader(split, 64, draws="device", **{**common, **options})


def test_device_loader_is_deterministic_per_seed_and_epoch_and_resumes_mid_epoch():
    split = _split()
    loader = _loader(split, chunk_bytes=3 * 64 * 400)  # 3 batches per chunk: resume crosses chunks
    assert isinstance(loader, DeviceLoader) and loader.chunk_batches == 3 and len(loader) == 5
    first = list(loader.epoch(2))
    again = list(_loader(split).epoch(2))  # another chunking gives the same batches
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert [len(y) for _, y in first] == [64, 64, 64, 64, 44]
    assert not torch.equal(first[0][0], next(loader.epoch(3))[0])
    assert not torch.equal(first[0][0], next(_loader(split, seed=6).epoch(2))[0])
    for start in (1, 3, 4):
        resumed = list(loader.epoch(2, start=start))
        assert len(resumed) == 5 - start
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first[start:], resumed, strict=True))
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())  # a permutation: every image once


def test_device_loader_without_augmentation_is_the_normalised_images_in_order():
    split = _split(100)
    loader = make_loader(split, 32, draws="device", mean=(0.5,), std=(0.25,))
    x = torch.cat([b[0] for b in loader.epoch()])
    torch.testing.assert_close(x, (split.images.float() / 255 - 0.5) / 0.25)
    host = make_loader(split, 32, mean=(0.5,), std=(0.25,))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader.epoch(), host.epoch(), strict=True))


def test_device_loader_augmentation_statistics():
    """Each image of an epoch: flipped with p 0.5, shifted by a crop offset uniform on 0..2p in each
    direction, erased with the given probability (a zeroed rectangle after normalisation)."""
    n, size, pad = 4000, 10, 2
    rows = torch.arange(size, dtype=torch.uint8).mul(20).add(10)  # a distinct value per row and column
    images = (rows[:, None] + rows[None, :] * 0 + torch.arange(size, dtype=torch.uint8)[None, :]).expand(
        n, 1, size, size
    )
    split = Split(images.contiguous(), torch.zeros(n, dtype=torch.long))
    loader = make_loader(
        split, 500, draws="device", mean=(0.0,), std=(1 / 255,), augment=Augment(pad, True, 0.0), seed=1
    )
    x = torch.cat([b[0] for b in loader.epoch(0)]).round().long()[:, 0]  # back to pixel values
    # recover each image's vertical offset from a row that is not padding, and its flip
    shift = []
    for img in x:
        r = next(i for i in range(size) if img[i].max() > 0)
        shift.append(int((img[r].max() - 10) // 20) - r)  # source row - output row = offset - pad
    counts = torch.bincount(torch.tensor(shift) + pad, minlength=2 * pad + 1)
    assert counts.numel() == 2 * pad + 1 and (counts > 0.8 * n / (2 * pad + 1)).all()
    erasing = make_loader(
        _split(2000), 500, draws="device", mean=(0.0,), std=(1.0,), augment=Augment(0, False, 0.3)
    )
    erased = torch.cat([(b[0] == 0).flatten(1).any(1) for b in erasing.epoch(0)]).float().mean()
    assert 0.27 < erased < 0.33
    flipping = make_loader(split, 500, draws="device", mean=(0.0,), std=(1 / 255,), augment=Augment(0, True))
    flipped = torch.cat([b[0][:, 0, 0, 0] != 10 for b in flipping.epoch(0)]).float().mean()
    assert 0.47 < flipped < 0.53


def test_device_draws_need_an_in_memory_split(tmp_path):
    files = FileSplit([tmp_path / "a.png"], torch.zeros(1), size=8)
    with pytest.raises(lls.LLSError, match="in-memory dataset"):
        make_loader(files, 1, draws="device", mean=(0.5,), std=(0.5,))
    with pytest.raises(lls.LLSError, match="known: host, device, auto"):
        make_loader(_split(), 1, draws="gpu", mean=(0.5,), std=(0.5,))
    assert type(make_loader(files, 1, draws="auto", mean=(0.5,), std=(0.5,))).__name__ == "StreamLoader"
    assert type(make_loader(_split(), 1, draws="auto", mean=(0.5,), std=(0.5,))).__name__ == "TensorLoader"


def test_device_loader_shards_each_batch_like_the_host_loader():
    split = _split(140)  # batches of 64, 64, 12: each split 3 ways
    full = list(_loader(split).epoch(1))
    parts = []
    for rank in range(3):
        loader = _loader(split)
        loader.shard = (rank, 3)
        parts.append(list(loader.epoch(1)))
    assert [len(y) for _, y in full] == [64, 64, 12]
    for step, (x, _) in enumerate(full):
        assert torch.equal(torch.cat([p[step][0] for p in parts]), x)


def test_device_loader_merges_a_tiny_last_batch_like_the_host_loader():
    split = _split(129)  # 64, 64 and 1: BatchNorm cannot train on one image
    for draws in ("host", "device"):
        loader = make_loader(split, 64, draws=draws, mean=(0.5,), std=(0.25,), shuffle=True)
        loader.min_batch = 2
        assert [len(y) for _, y in loader.epoch(0)] == [64, 65]


# --- lls bench with engines --------------------------------------------------------------------


def test_bench_entries_name_their_engine():
    assert split_engine("lls:basis=periodic@graph") == ("lls:basis=periodic", "graph")
    assert split_engine("bp") == ("bp", None)
    results = run_bench(
        "smallconv", (1, 8, 8), 10, ["lls@eager", "bp"], batch=4, steps=1, warmup=1, measure_peak=False
    )
    assert [(r.rule, r.engine) for r in results] == [("lls", "eager"), ("bp", "eager")]
    with pytest.raises(lls.LLSError, match="needs a CUDA device"):
        run_bench("smallconv", (1, 8, 8), 10, ["lls@graph"], batch=4, steps=1, measure_peak=False)


# --- on a GPU ----------------------------------------------------------------------------------------


@pytest.fixture
def exact_float32():
    """TF32 off for convolutions and matmuls while a test compares two engines: with it on, a
    1-ulp difference in an input can round to a different 10-bit mantissa and move an output by
    ~1e-3 relative, which would hide what is compared."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def capturable_sgd(params, lr, weight_decay):
    """SGD with momentum, marked capturable (its step keeps no scalar on the host). The engines are
    compared under SGD because an update proportional to the gradient keeps a rounding difference
    a rounding difference; Adam's g / (sqrt(v) + eps) turns one in a gradient that is zero in exact
    arithmetic (a convolution bias just before BatchNorm) into a full learning-rate step, and the
    two runs then part by far more than the engines differ (seen on an H200: 1% in 8 steps)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["capturable"] = True
    return optimizer


def _cuda_pair(rule: str, channels_last: bool, optimizer=capturable_sgd, lr: float = 1e-2, **options):
    made = []
    for engine in ("eager", "graph"):
        made.append(
            build_trainer(
                "vgg8",  # at 20 x 20: even pooling bins in the first blocks, uneven (5 -> 2) later
                rule,
                (3, 20, 20),
                10,
                rule_options=options,
                device="cuda",
                channels_last=channels_last,
                optimizer=optimizer,
                lr=lr,
                engine=engine,
            )
        )
    return made


def _cuda_batches(sizes, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        x = torch.randn(n, 3, 20, 20, generator=g).cuda()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, torch.randint(0, 10, (n,), generator=g).cuda()


SPREAD = 10  # the graph engine may differ from eager by this many times eager's own run-to-run spread


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: per tensor, not per element (an update of an element whose
    gradient is near 0 may differ by far more than rounding, under Adam by a learning rate)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm()) / (float(want.norm()) + 1e-12)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor a step updates: weights, BatchNorm statistics, optimizer states and scalars."""
    out = dict(trainer.net.state_dict())
    for i, optimizer in enumerate(trainer.optimizers):
        for j, state in enumerate(optimizer.state.values()):
            out.update({f"optimizer {i}.{j}.{key}": value for key, value in state.items()})
        for j, group in enumerate(optimizer.param_groups):  # sfadamw's device scalars
            out.update(
                {
                    f"optimizer {i} group {j}.{k}": group[k]
                    for k in ("k", "lr_max", "weight_sum")
                    if torch.is_tensor(group.get(k))
                }
            )
    return out


def _assert_same_state(
    eager: Trainer, graph: Trainer, tolerance: float, again: Trainer | None = None
) -> None:
    """Counts equal; every float tensor of ``graph`` within ``tolerance`` of ``eager``'s, relative,
    or within SPREAD times how far a second eager run (``again``) landed from the first."""
    want, got = _state(eager), _state(graph)
    spread = _state(again) if again is not None else None
    assert want.keys() == got.keys()
    for name, value in want.items():
        if name.endswith(".step") or not value.is_floating_point():  # counts: one per step, exactly
            assert torch.equal(got[name].cpu(), value.cpu()), name
            continue
        allowed = tolerance if spread is None else max(tolerance, SPREAD * _relative(spread[name], value))
        assert _relative(got[name], value) <= allowed, (
            f"{name}: {_relative(got[name], value):.2e} > {allowed:.2e}"
        )


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "rule,options",
    [
        ("lls", {}),
        ("lls-mxm", {"reduced": 4}),
        ("local-classifier", {}),
        ("drtp", {}),
        ("dfa", {}),
        ("bp", {}),
    ],
    ids=str,
)
def test_graph_engine_trains_like_the_eager_one(rule, options, channels_last, exact_float32):
    """12 steps with batches of 32 and, five times, a last batch of 20 (its own graph after its
    warm-up): per-step losses, weights, BatchNorm statistics and optimizer states agree with eager
    training to float tolerance, and the graphs were captured and replayed."""
    (eager, graph), (again, _) = (
        _cuda_pair(rule, channels_last, **options),
        _cuda_pair(rule, channels_last, **options),
    )
    sizes = [32] * 6 + [20] + [32] * 5 + [20] * 5
    differences, spread = [], []
    for x, y in _cuda_batches(sizes, channels_last):
        want, got, second = eager.train_step(x, y), graph.train_step(x, y), again.train_step(x, y)
        losses = [torch.cat([r.loss.view(1), r.block_losses]) for r in (want, got, second)]
        differences.append(_relative(losses[1], losses[0]))
        spread.append(_relative(losses[2], losses[0]))
    torch.cuda.synchronize()
    assert len(graph.engine.graphs) == 2 and graph.engine.replays >= 4
    # Two eager runs of the same steps may differ on a GPU (cuDNN's backward kernels and the
    # adaptive pooling's use atomics); the graph engine must stay within that, or 1e-4.
    assert max(differences) <= max(1e-4, SPREAD * max(spread)), (differences, spread)
    _assert_same_state(eager, graph, 1e-4, again)


@needs_cuda
def test_graph_engine_with_schedule_free_adamw_and_its_averaged_weights(exact_float32):
    """The paper's optimizer (lls.sfadamw, capturable) on both engines: the same step counters and
    weight sums, losses close while training and after the swap to the averaged weights. (Adam
    amplifies rounding in near-zero gradients, see capturable_sgd: closeness, not equality.)"""
    (eager, graph), (again, _) = (_cuda_pair("lls", True, optimizer=capturable_sf, lr=1e-3) for _ in range(2))
    assert graph.engine is not None
    differences, spread = [], []
    for x, y in _cuda_batches([32] * 9 + [20], True):
        want, got, second = eager.train_step(x, y), graph.train_step(x, y), again.train_step(x, y)
        differences.append(_relative(got.loss, want.loss))
        spread.append(_relative(second.loss, want.loss))
    for o, r in zip(eager.optimizers, graph.optimizers, strict=True):
        for g, h in zip(o.param_groups, r.param_groups, strict=True):
            for key in ("k", "weight_sum", "lr_max"):
                torch.testing.assert_close(torch.as_tensor(h[key]).cpu(), torch.as_tensor(g[key]).cpu())
    x, y = next(_cuda_batches([32], True, seed=9))
    with eager.evaluation() as a, graph.evaluation() as b, again.evaluation() as c:
        want, got, second = (F.cross_entropy(net(x), y) for net in (a, b, c))
        differences.append(_relative(got, want))
        spread.append(_relative(second, want))
    # and training goes on after the swap back
    want, got, second = (t.train_step(x, y).loss for t in (eager, graph, again))
    differences.append(_relative(got, want))
    spread.append(_relative(second, want))
    assert max(differences) <= max(1e-3, SPREAD * max(spread)), (differences, spread)


@needs_cuda
def test_auto_engine_on_cuda_captures_with_the_registrys_adamw_sf():
    trainer = build_trainer("smallconv", "lls", (1, 28, 28), 10, device="cuda", engine="auto")
    assert trainer.engine is not None and all(is_capturable(o) for o in trainer.optimizers)


@needs_cuda
def test_streams_without_the_fused_signal_change_nothing(exact_float32):
    """Graph capture and the stream schedule alone (the autograd chain for the signal) run the
    same kernels as the eager step: weights agree to rounding (cuDNN's backward-weight kernels
    may sum in another order between runs, nothing more)."""
    from lls.step.engine import GraphEngine

    (eager, graph), (again, _) = _cuda_pair("lls", True), _cuda_pair("lls", True)
    graph.engine = GraphEngine(graph.step, graph.input_shape, fused=False)
    for x, y in _cuda_batches([32] * 8, True):
        for trainer in (eager, graph, again):
            trainer.train_step(x, y)
    _assert_same_state(eager, graph, 1e-5, again)


@needs_cuda
def test_loading_a_state_recaptures(exact_float32):
    (eager, graph), (again, _) = _cuda_pair("lls", False), _cuda_pair("lls", False)
    batches = list(_cuda_batches([32] * 10, False))
    for x, y in batches[:6]:
        eager.train_step(x, y)
        graph.train_step(x, y)
    state = eager.state_dict()
    graph.load_state_dict(state)  # replaces optimizer state tensors: the graph must not write the old ones
    again.load_state_dict(state)
    assert graph.engine.graphs == {}
    for x, y in batches[6:]:
        for trainer in (eager, graph, again):
            trainer.train_step(x, y)
    _assert_same_state(eager, graph, 1e-4, again)


@needs_cuda
def test_graph_engine_refuses_data_parallel_hooks():
    _, graph = _cuda_pair("lls", False)
    graph.step.sync_gradients = lambda optimizer: None
    with pytest.raises(lls.LLSError, match="data parallelism"):
        graph.train_step(*next(_cuda_batches([8], False)))


@needs_cuda
def test_fused_signal_on_cuda_matches_autograd(exact_float32):
    for rule, options in VARIANTS:
        signal = _signal(rule, options, (6, 8, 8), 2, torch.float32).cuda()
        plan = FusedProjection(signal, (6, 8, 8), device="cuda", dtype=torch.float32)
        a = _output((6, 8, 8), True, torch.float32).detach().cuda().requires_grad_()
        y = LABELS.cuda()
        want = torch.autograd.grad(signal(a, y), a)[0]
        got = torch.autograd.grad(plan.closed_form(a, y), a)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_device_loader_on_cuda_is_deterministic_and_resumes():
    split = _split()
    loader = _loader(split, device="cuda")
    first = list(loader.epoch(1))
    again = list(_loader(split, device="cuda").epoch(1, start=2))
    assert first[0][0].is_cuda
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], again, strict=True))
