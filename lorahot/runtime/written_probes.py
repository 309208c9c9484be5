"""What merged mode last wrote into every targeted weight, recorded and compared for all layers at once.

Merged mode rewrites the base weights in place, and before each rewrite it checks that nobody
else changed them since (a checkpoint loaded after inject would otherwise be thrown away; see
:func:`lorahot.runtime.merge.replaced`). After each write it notes per layer a *probe*: 16
sampled elements of the weight, its whole bias, and the weight's row and column sums read as
integers (the *digest*). Done layer by layer, that was about ten small device operations per
layer and as many host calls: on an H200's host, 132 ms to record and 78 ms to check the SDXL
UNet's 700 layers, most of a merged swap (``runs/20261204T043140-merged-swap-probe.log``).

:class:`WrittenProbes` lays every layer's probe out in one flat buffer of 64-bit words per
device, each piece padded to a whole word:

    [samples | bias]  [row sums | column sums]   (layer 0), then layer 1, ...

- :meth:`~WrittenProbes.record` writes the probes of the weights as they are into the *then*
  buffer, and points each layer's ``written_probe`` at its pieces there: the samples and biases
  of all layers in one ``torch._foreach_copy_`` from views of the weights made with the layout
  (a copy per piece was two host calls a layer, most of a check on a CPU);
- :meth:`~WrittenProbes.changed` writes the same into the *now* buffer, compares both word by
  word, and counts the differing words of each segment (samples and bias; sums) with one
  cumulative sum: one read to the host. The digest counts only where the weight's version
  counter moved since the record, or where it has none (an inference tensor), as the layer by
  layer check does; where no layer's did, the sums are not even computed (they are most of the
  device's work);
- on CUDA with Triton, the sums of every layer whose words are int32 views of its weight
  (:func:`words`: all but rows of an odd number of 16-bit elements) are one kernel launch
  (:class:`~lorahot.kernels.word_sums.WordSums`, its table of addresses made with the layout):
  the buffer is zeroed and the kernel adds every layer's row and column sums into it with int32
  atomics, which wrap and do not depend on order, so they equal :func:`sums` bit for bit. Two
  reductions per layer had taken 14 us of device time together, 10 ms of a record of the SDXL
  UNet's 700 layers for 4.4 GB that one pass reads in about 1.3 ms. The other layers, and the
  CPU, keep :func:`sums`;
- on one CUDA device, with no stream capturing, each of the two is a CUDA graph replay
  (:class:`~lorahot.runtime.graph_replays.GraphReplays`: the second call captures), so the host
  issues one launch for all layers.

A layout holds while every targeted weight and bias is the tensor it was built for, at the same
address with the same shape, strides and dtype (:func:`signature`). After anything else (a move
of the model, a weight replaced) the caller takes the layer by layer path, and the next record
builds a new layout.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorahot.kernels import word_sums
from lorahot.layers import LoRALayer
from lorahot.layers.base import version
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.graph_replays import Captured, GraphReplays

__all__ = ["PROBE_ELEMENTS", "WrittenProbes", "positions", "sampled", "signature", "sums", "version", "words"]

#: elements of each merged weight compared to notice a base checkpoint loaded after inject
PROBE_ELEMENTS = 16

#: what a layout was built for, per layer: the weight's and the bias's address, shape, strides,
#: dtype and device (None for a layer without a bias)
Signature = tuple[tuple[object, ...], ...]


def _step(numel: int) -> tuple[int, int]:
    """How many elements a weight of ``numel`` is sampled at, and the distance between them:
    evenly from the first, at most :data:`PROBE_ELEMENTS`."""
    count = min(PROBE_ELEMENTS, numel)
    return count, max((numel - 1) // max(count - 1, 1), 1)


@functools.lru_cache(maxsize=256)
def positions(numel: int, device: torch.device) -> torch.Tensor:
    """The sampled positions of a weight of ``numel`` elements (int64; :func:`sampled`), made
    once per size and device: a rewrite records every layer's weight."""
    count, step = _step(numel)
    with torch.inference_mode(False):  # cached: an inference tensor could not index outside inference mode
        return torch.arange(count, device=device) * step


def sampled(flat: torch.Tensor) -> torch.Tensor:
    """The sampled elements of a flat weight, as a strided view of it (a copy of 16 elements
    where a gather at :func:`positions` took 9 us on an H200, 700 times per record of the SDXL
    UNet)."""
    count, step = _step(flat.numel())
    return flat[: step * (count - 1) + 1 : step] if count else flat[:0]


def words(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` flattened to ``[out, -1]`` with its bytes read as integers: 32-bit words where
    a row's bytes allow (two bf16 elements to a word, an 8-byte element as two), else integers
    of the element size. The digest is their row and column sums (:func:`sums`)."""
    if weight.dim() == 0 or weight.numel() == 0:
        weight = weight.reshape(1, -1)  # no rows to sum over (0 elements: empty sums)
    flat = weight.reshape(weight.shape[0], -1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    size = flat.element_size()
    if (flat.shape[1] * size) % 4 == 0 and (flat.storage_offset() * size) % 4 == 0:
        return flat.view(torch.int32)
    return flat.view({1: torch.int8, 2: torch.int16}[size])


def sums(w: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The sums of :func:`words` ``w`` along ``dim``, as int32 modulo 2**32: a change of one
    element changes its row's sum (its word moves by less than 2**32); two changes that cancel
    in one row change their columns' sums; an edit leaves both only by cancelling exactly along
    every row and every column. int32 words are summed in their own dtype: a wider sum (int64)
    would first copy the whole weight widened, which made the sums of the SDXL UNet's 700
    weights (4.4 GB) take 40 ms on an H200, where reading them twice takes about 2."""
    return torch.sum(w, dim, dtype=torch.int32, out=out)


def signature(layers: Sequence[LoRALayer]) -> Signature | None:
    """Per layer, what a layout is built for (see :data:`Signature`), or None where some weight
    or bias cannot be laid out (on the meta device, or not a dense tensor)."""
    found = []
    for layer in layers:
        entry: list[object] = []
        for t in _weight_and_bias(layer):
            if t is None:
                entry.append(None)
                continue
            if t.is_meta or t.layout != torch.strided:
                return None
            entry += [t.data_ptr(), t.shape, t.stride(), t.dtype, t.device]
        found.append(tuple(entry))
    return tuple(found)


def _weight_and_bias(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer.base_weight`` and ``layer.base_bias``, read from the base layer's parameters where
    they are there (no attribute lookup through ``nn.Module``: a signature reads every layer)."""
    params = layer._base._parameters  # the base layer, as a plain attribute (see LoRALayer.__init__)
    weight = params.get("weight")
    bias = params["bias"] if "bias" in params else layer.base_bias  # noqa: SIM401 (get() would read base_bias always)
    return (weight if weight is not None else layer.base_weight), bias


def _piece(buffer: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``count`` elements of ``dtype`` at word ``start`` of ``buffer`` (int64), and the word
    after them."""
    size = torch.empty((), dtype=dtype).element_size()
    n_words = -(-count * size // 8)
    view = buffer[start : start + n_words].view(torch.uint8)[: count * size].view(dtype)
    return view, start + n_words


@dataclass
class _Probe:
    """One layer's pieces in a buffer: samples, bias (None without one), row and column sums."""

    samples: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor


class _Device:
    """Every probe of the layers on one device: the two buffers, each layer's pieces in both,
    and what counts their differences."""

    def __init__(self, layers: list[tuple[int, LoRALayer]], device: torch.device) -> None:
        self.layers = layers
        #: per layer: the weight, its bias, its sample positions (read at build: fixed by the signature)
        self.sources = [(layer.base_weight.detach(), layer.base_bias, layer) for _, layer in layers]
        plan: list[tuple[int, torch.dtype, torch.dtype | None, int, int, int]] = []
        total = 0
        for weight, bias, _ in self.sources:
            w = words(weight)
            n_samples = min(PROBE_ELEMENTS, weight.numel())
            entry = (
                n_samples,
                weight.dtype,
                None if bias is None else bias.dtype,
                bias.numel() if bias is not None else 0,
            )
            plan.append((*entry, w.shape[0], w.shape[1]))
            total += _words_of(*entry, w.shape[0], w.shape[1])
        self.then = torch.zeros(total, dtype=torch.int64, device=device)
        self.now = torch.zeros(total, dtype=torch.int64, device=device)
        self.then_probes, bounds = self._lay_out(self.then, plan)
        self.now_probes, _ = self._lay_out(self.now, plan)
        self.positions = [positions(weight.numel(), device) for weight, _, _ in self.sources]
        #: per layer, the weight flat and as words where both are views of it (the layout holds
        #: only while the weight keeps its address, shape and strides), else None: made per call
        self.views = [_views(weight) for weight, _, _ in self.sources]
        #: the layers whose sums one kernel launch writes (their words int32 views of the weight,
        #: on CUDA with Triton), and that launch; None where it does not apply
        self.summed, self.word_sums = self._word_sums(device)
        #: the others, whose sums :func:`sums` writes layer by layer
        self.unsummed = [k for k in range(len(self.sources)) if k not in self.summed]
        #: per buffer (by id: then, now): the pieces every write copies into and what each copies
        #: from, views of the weights and biases, one ``torch._foreach_copy_`` for all the layers;
        #: and the layers whose samples or bias are copies of theirs (made per write)
        self.copies = {
            id(buffer): _Copies.of(self.sources, self.views, probes)
            for buffer, probes in ((self.then, self.then_probes), (self.now, self.now_probes))
        }
        #: segment boundaries in words: [samples and bias, sums] of each layer, in turn
        self.bounds = torch.tensor(bounds, dtype=torch.int64, device=device)
        self.cumulative = torch.zeros(total + 1, dtype=torch.int64, device=device)
        self.marks = torch.zeros(len(bounds), dtype=torch.int64, device=device)
        self.counts = torch.zeros(len(bounds) - 1, dtype=torch.int64, device=device)

    @staticmethod
    def _lay_out(
        buffer: torch.Tensor, plan: list[tuple[int, torch.dtype, torch.dtype | None, int, int, int]]
    ) -> tuple[list[_Probe], list[int]]:
        """Each layer's pieces in ``buffer``, and the boundaries of its two segments."""
        probes, bounds, at = [], [0], 0
        for n_samples, w_dtype, b_dtype, n_bias, n_rows, n_cols in plan:
            samples, at = _piece(buffer, at, n_samples, w_dtype)
            bias = None
            if b_dtype is not None:
                bias, at = _piece(buffer, at, n_bias, b_dtype)
            bounds.append(at)
            rows, at = _piece(buffer, at, n_rows, torch.int32)
            cols, at = _piece(buffer, at, n_cols, torch.int32)
            bounds.append(at)
            probes.append(_Probe(samples, bias, rows, cols))
        return probes, bounds

    def _word_sums(self, device: torch.device) -> tuple[frozenset[int], word_sums.WordSums | None]:
        """The layers whose sums :class:`~lorahot.kernels.word_sums.WordSums` computes (their
        words int32 views of the weight, on CUDA with Triton), and it; none and None elsewhere."""
        found = [
            (k, views[1]) for k, views in enumerate(self.views) if views is not None and views[1].dtype == torch.int32
        ]
        if not found or not word_sums.available(device):
            return frozenset(), None
        at = self.then.data_ptr()  # the pieces' offsets in int32 words, the same in both buffers
        rows_at = [(self.then_probes[k].rows.data_ptr() - at) // 4 for k, _ in found]
        cols_at = [(self.then_probes[k].cols.data_ptr() - at) // 4 for k, _ in found]
        return frozenset(k for k, _ in found), word_sums.WordSums([w for _, w in found], rows_at, cols_at)

    def write(
        self, buffer: torch.Tensor, probes: list[_Probe], digest: bool = True, only: Sequence[bool] | None = None
    ) -> None:
        """Writes every layer's probe of its weight as it is now into ``probes``, the pieces of
        ``buffer`` (:attr:`then` or :attr:`now`, in place): the samples and the bias, all in one
        ``torch._foreach_copy_`` (a copy per piece had been two host calls a layer: 5 ms of each
        check of 800 layers on a CPU), and the row and column sums if ``digest``. Where
        :attr:`word_sums` applies, the buffer is zeroed first and one launch adds the sums of the
        layers in :attr:`summed` into it. ``only`` (per layer of this device; not with
        :attr:`word_sums`, which writes every layer's sums) leaves the probes of the layers it
        marks False as they are."""
        kernel = self.word_sums if digest else None
        assert only is None or kernel is None  # the zeroed buffer would lose the others' sums
        if kernel is not None:
            buffer.zero_()
        copies = self.copies[id(buffer)]
        into, source = copies.into, copies.source
        if only is not None:
            into = [t for t, k in zip(into, copies.owners, strict=True) if only[k]]
            source = [t for t, k in zip(source, copies.owners, strict=True) if only[k]]
        if copies.per_write:
            into, source = list(into), list(source)
            for k in copies.per_write:
                if only is not None and not only[k]:
                    continue
                weight, bias, _ = self.sources[k]
                # the sampled elements alone, gathered in the weight's logical order (a weight with no
                # flat view, such as a channels_last conv's, copied whole was most of a check)
                samples = torch.take(weight, self.positions[k])
                _add_pieces(into, source, probes[k], samples, None if bias is None else bias.detach())
        if into:
            torch._foreach_copy_(into, source)
        if digest:
            for k in self.unsummed:
                if only is not None and not only[k]:
                    continue
                weight, probe, views = self.sources[k][0], probes[k], self.views[k]
                w = views[1] if views is not None else words(weight)
                sums(w, 1, out=probe.rows)
                sums(w, 0, out=probe.cols)
        if kernel is not None:
            kernel(buffer.view(torch.int32))

    def compare(self, digest: bool) -> None:
        """Writes the probes as they are now (the sums only if ``digest``: where no version
        counter moved, they are not compared, and they are most of the device's work), and into
        :attr:`counts` the words of each segment that differ from the recorded ones."""
        self.write(self.now, self.now_probes, digest)
        torch.cumsum(torch.ne(self.now, self.then), 0, out=self.cumulative[1:])
        torch.index_select(self.cumulative, 0, self.bounds, out=self.marks)
        torch.sub(self.marks[1:], self.marks[:-1], out=self.counts)


def _add_pieces(
    into: list[torch.Tensor],
    source: list[torch.Tensor],
    probe: _Probe,
    samples: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """Appends ``probe``'s samples and bias to ``into`` and what they copy, the sampled elements
    of the weight (``samples``) and ``bias`` flat (a ``[1, out]`` bias broadcasts as well), to
    ``source``."""
    into.append(probe.samples)
    source.append(samples)
    if probe.bias is not None and bias is not None:
        into.append(probe.bias)
        source.append(bias.reshape(-1))


@dataclass
class _Copies:
    """What each write of one buffer copies: ``source[i]`` into ``into[i]``, views fixed while
    the layout holds, and the layers whose views are copies (:attr:`per_write`, added per write)."""

    into: list[torch.Tensor]
    source: list[torch.Tensor]
    per_write: list[int]
    owners: list[int]  # the layer of each of ``into``

    @staticmethod
    def of(
        sources: list[tuple[torch.Tensor, torch.Tensor | None, LoRALayer]],
        views: list[tuple[torch.Tensor, torch.Tensor] | None],
        probes: list[_Probe],
    ) -> _Copies:
        """The copies of ``probes``' pieces: fixed where the weight flat and the bias flat are
        views of them, else made per write (a copy made now would go stale)."""
        found = _Copies([], [], [], [])
        for k, ((_, bias, _), view, probe) in enumerate(zip(sources, views, probes, strict=True)):
            flat_bias = None if bias is None else bias.detach()
            if view is None or not (flat_bias is None or _is_view(flat_bias.reshape(-1), flat_bias)):
                found.per_write.append(k)
            else:
                _add_pieces(found.into, found.source, probe, sampled(view[0]), flat_bias)
                found.owners += [k] * (len(found.into) - len(found.owners))
        return found


def _is_view(t: torch.Tensor, of: torch.Tensor) -> bool:
    """Whether ``t`` is ``of``'s memory (not a copy; an empty tensor has nothing to go stale)."""
    return not of.numel() or t.data_ptr() == of.data_ptr()


def _moved(layer: LoRALayer, weight: torch.Tensor) -> bool:
    """Whether ``weight``'s version counter moved since ``layer``'s record, or it has none (an
    inference tensor): its sums are then compared."""
    noted = layer.written_probe
    assert noted is not None  # the caller checked it is the layout's
    return noted[4] is None or version(weight) != noted[4]


def _views(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``weight.reshape(-1)`` and :func:`words` of it where both are views of its memory (not
    copies, which would go stale), else None."""
    flat, w = weight.reshape(-1), words(weight)
    if not (_is_view(flat, weight) and _is_view(w, weight)):  # a copy lives elsewhere
        return None
    return flat, w


def _words_of(
    n_samples: int, w_dtype: torch.dtype, b_dtype: torch.dtype | None, n_bias: int, n_rows: int, n_cols: int
) -> int:
    """Words one layer's probe takes in a buffer (each piece padded to a whole word)."""
    sizes = [n_samples * torch.empty((), dtype=w_dtype).element_size(), n_rows * 4, n_cols * 4]
    if b_dtype is not None:
        sizes.append(n_bias * torch.empty((), dtype=b_dtype).element_size())
    return sum(-(-s // 8) for s in sizes)


class WrittenProbes:
    """The probes of a fixed list of layers, laid out per device (see the module docstring)."""

    def __init__(self, layers: Sequence[LoRALayer], buffers: BufferManager, built_for: Signature) -> None:
        #: what the layout was built for (:func:`signature`)
        self.built_for = built_for
        self.layers = list(layers)
        by_device: dict[torch.device, list[tuple[int, LoRALayer]]] = {}
        for i, layer in enumerate(self.layers):
            by_device.setdefault(layer.base_weight.device, []).append((i, layer))
        with torch.inference_mode(False):  # buffers written in place at every call, in inference mode or not
            self._devices = [_Device(found, device) for device, found in by_device.items()]
        #: three graphs a device: the record, the check with sums and the check without
        self._replays: GraphReplays[tuple[str, int]] = GraphReplays(
            buffers, keep=3 * len(self._devices), what="merged mode's check"
        )

    def record(self, written: Sequence[bool] | None = None) -> None:
        """Notes every layer's weight as it is now (lorahot has just written it): its probe into
        the *then* buffer, and ``written_probe`` pointing at it with the version counter.
        ``written`` (per layer; None: all) marks the layers written since the last record: the
        others' probes still hold and are left as they are, where the steps run as they are (a
        CUDA graph replay, and the one-launch sums, write every layer's)."""
        for d in self._devices:
            only = None if written is None else [written[i] for i, _ in d.layers]
            if only is not None and (d.word_sums is not None or self._replayed(d)):
                only = None
            if only is None:
                self._run("record", d, functools.partial(d.write, d.then, d.then_probes))
            else:
                with torch.no_grad():
                    d.write(d.then, d.then_probes, only=only)
            for k, ((_, layer), (weight, _, _), at, probe) in enumerate(
                zip(d.layers, d.sources, d.positions, d.then_probes, strict=True)
            ):
                if only is not None and not only[k]:
                    continue
                if layer.checkpoint_loaded:
                    layer.checkpoint_loaded = False
                layer.written_probe = (
                    at,
                    probe.samples,
                    weight.numel(),
                    probe.bias,
                    version(weight),
                    (probe.rows, probe.cols),
                )

    def changed(self) -> list[bool] | None:
        """Per layer, whether its weight or bias is no longer what :meth:`record` noted, or None
        where some layer's probe is not this layout's (recorded layer by layer, or converted by a
        move since): the caller then compares layer by layer."""
        for d in self._devices:
            for (_, layer), probe in zip(d.layers, d.then_probes, strict=True):
                noted = layer.written_probe
                if noted is None or noted[1] is not probe.samples or noted[5] is None or noted[5][0] is not probe.rows:
                    return None
        flags = [layer.checkpoint_loaded for layer in self.layers]
        for d in self._devices:
            moved = [_moved(layer, weight) for (_, layer), (weight, _, _) in zip(d.layers, d.sources, strict=True)]
            digest = any(moved)
            self._run("check" if digest else "check samples", d, functools.partial(d.compare, digest))
            counts = d.counts.tolist()
            for k, (i, _) in enumerate(d.layers):
                flags[i] = flags[i] or counts[2 * k] > 0 or (moved[k] and counts[2 * k + 1] > 0)
        return flags

    def _replayed(self, d: _Device) -> bool:
        """Whether :meth:`_run` runs ``d``'s steps as CUDA graph replays (once captured)."""
        return self._replays.applies() and self._replays.device == d.then.device

    def _run(self, kind: str, d: _Device, steps: Callable[[], None]) -> None:
        """``steps`` on ``d``'s device: as a CUDA graph replay where one applies (captured at the
        second call), else as they are."""
        replays = self._replays
        if not replays.applies() or replays.device != d.then.device:
            with torch.no_grad():
                steps()
            return
        key = (kind, id(d))
        captured = replays.found(key, d)
        if captured is None:
            if replays.first_use(key):
                with torch.no_grad():
                    steps()
                return
            graph = replays.capture(steps, stacklevel=4)
            if graph is None:  # replays are off from now on: the steps as they are
                with torch.no_grad():
                    steps()
                return
            captured = Captured(graph, weakref.ref(d))
            replays.store(key, captured)
        replays.replay(key, captured)
