"""The merge engine: one streaming core, an on-disk API and an in-memory API.

    merge_to_disk(spec, "out/")                 # CLI: sharded safetensors + index, config, tokenizer
    merge_into(model, sources, coefficients)    # reference workers / Serve: in place, no disk

Everything is validated before the first byte is written (architectures, tensor names and
shapes, vocabularies, tokenizers); non-finite merged weights abort the merge and name the models
and tensor. Output goes to a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rayalign.merge import kernels
from rayalign.merge.io import (
    INDEX,
    SINGLE,
    Checkpoint,
    MergeInputError,
    StreamingShardWriter,
    shard_plan,
    tensor_nbytes,
)
from rayalign.merge.lora import (
    Adapter,
    AdapterCheckpoint,
    check_on_base,
    combine,
    load_adapter,
    open_checkpoint,
    save_combined,
)
from rayalign.merge.spec import OUT_DTYPES, Kernel, MergeSpec, resolve
from rayalign.models.lora import is_adapter_dir, same_path
from rayalign.utils.io import OutputExistsError, atomic_dir

# config fields that must agree for weights to be mergeable
STRUCTURAL = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")
COPY_FILES = ("generation_config.json",)


class MergeValidationError(ValueError):
    """Models that cannot be merged; the message names the models and tensors involved."""


@dataclass
class MergeReport:
    output: str
    method: str
    inputs: list[str]
    coefficients: list[float]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


# ---- validation -------------------------------------------------------------------------------

def _vocab(path: Path) -> dict[str, int] | None:
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True)
    except Exception as exc:
        raise MergeInputError(f"{f}: cannot read tokenizer: {exc}") from exc


def validate_paths(paths: Sequence[str | Path]) -> None:
    """validate() on model (or adapter) directories, opened only for the check."""
    ckpts = [open_checkpoint(p) for p in paths]
    try:
        validate(ckpts)
    finally:
        for c in ckpts:
            c.close()


def validate(ckpts: Sequence[Checkpoint]) -> None:
    """Raise MergeValidationError unless every checkpoint has the same architecture, tensors,
    shapes and tokenizer as the first."""
    if not ckpts:
        raise MergeValidationError("no models to merge")
    ref = ckpts[0]
    for c in ckpts[1:]:
        for key in STRUCTURAL:
            a, b = ref.config.get(key), c.config.get(key)
            if a != b:
                what = "vocabulary size" if key == "vocab_size" else "architecture"
                raise MergeValidationError(f"{what} differs: {key} = {a!r} in {ref.path} but {b!r} in {c.path}")
        missing, extra = sorted(set(ref.tensors) - set(c.tensors)), sorted(set(c.tensors) - set(ref.tensors))
        if missing or extra:
            raise MergeValidationError(
                f"tensor names differ between {ref.path} and {c.path}: only in the first {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, only in the second {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, info in ref.tensors.items():
            other = c.tensors[name]
            if info.shape != other.shape:
                raise MergeValidationError(f"shape of {name} differs: {list(info.shape)} in {ref.path} "
                                           f"but {list(other.shape)} in {c.path}")
            if info.dtype.is_floating_point != other.dtype.is_floating_point:
                raise MergeValidationError(f"dtype of {name} differs: {info.dtype} in {ref.path}, {other.dtype} in {c.path}")
    vocabs = [(c.path, _vocab(c.path)) for c in ckpts]
    known = [(p, v) for p, v in vocabs if v is not None]
    for p, v in known[1:]:
        if v != known[0][1]:
            diff = sorted(set(v.items()) ^ set(known[0][1].items()))[:3]
            raise MergeValidationError(f"tokenizers differ between {known[0][0]} and {p} (e.g. {diff})")


def _check_finite(name: str, out: torch.Tensor, paths: Sequence[Path], inputs: Sequence[torch.Tensor]) -> None:
    if out.is_floating_point() and not torch.isfinite(out).all():
        bad = [str(p) for p, t in zip(paths, inputs) if t.is_floating_point() and not torch.isfinite(t).all()]
        where = f"non-finite values in {name} of {bad}" if bad else f"the merge of {name} overflows"
        raise MergeValidationError(f"{where}; nothing was written")


# ---- the streaming core -------------------------------------------------------------------------

CHUNK_ELEMENTS = 4 * 1024 * 1024  # 16 MB of float32 per input per chunk


def merge_chunks(ckpts: Sequence[Checkpoint], kernel: Kernel, names: Sequence[str],
                 chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, flat float32 piece of the merged tensor), tensor after tensor, piece after
    piece. Every kernel is elementwise, so tensors are merged in flat chunks: the next chunk of
    every input is read (in a second thread) while the current one is merged, into two reused
    buffer sets, so memory is 2 x models x chunk whatever the size of the tensors or models."""
    pieces = [(n, s, min(chunk_elements, ckpts[0].numel(n) - s))
              for n in names for s in range(0, ckpts[0].numel(n), chunk_elements)]  # none for empty tensors
    if not pieces:
        return
    bufs = [[torch.empty(chunk_elements * 8, dtype=torch.uint8) for _ in ckpts] for _ in range(2)]

    def read(k: int) -> list[torch.Tensor]:
        name, start, count = pieces[k]
        return [c.read_flat(name, start, count, raw.view(c.tensors[name].dtype)) for c, raw in zip(ckpts, bufs[k % 2])]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0)
        for k, (name, _, _) in enumerate(pieces):
            inputs = pending.result()
            if k + 1 < len(pieces):
                pending = pool.submit(read, k + 1)
            out = kernel(inputs)
            _check_finite(name, out, [c.path for c in ckpts], inputs)
            yield name, out


def merge_to_disk(spec: MergeSpec, out: str | Path, progress: bool = True, overwrite: bool = False,
                  chunk_elements: int = CHUNK_ELEMENTS) -> MergeReport:
    """Merge as `spec` says into the HF directory `out` (sharded safetensors, index, config and
    tokenizer from the template model), atomically."""
    t0 = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory already exists: {out} (choose another path or remove it)")
    res = resolve(spec)
    if output_kind(spec, res) == "adapter":
        return _merge_adapters(spec, res, out, overwrite, t0)
    ckpts = [open_checkpoint(p) for p in res.paths]
    try:
        validate(ckpts)
        template = Path(res.template)
        if isinstance(ckpts[res.paths.index(res.template)], AdapterCheckpoint):  # config from the adapter's base
            template = Path(ckpts[res.paths.index(res.template)].adapter.base)
        names = list(ckpts[0].keys())
        first = ckpts[0].tensors

        def out_dtype(n: str) -> torch.dtype:  # integer tensors keep their dtype
            src = first[n].dtype
            return OUT_DTYPES[spec.dtype] if spec.dtype and src.is_floating_point else src

        plan = [(n, first[n].shape, out_dtype(n)) for n in names]
        shards = shard_plan(plan, spec.max_shard_bytes)
        files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                   for i in range(len(shards))]
        order = [plan[i][0] for shard in shards for i in shard]
        bytes_read = sum(c.tensors[n].nbytes for c in ckpts for n in names)
        written = 0
        with atomic_dir(out, overwrite=overwrite) as tmp:
            total_bytes = sum(tensor_nbytes(shape, dtype) for _, shape, dtype in plan)
            bar = tqdm(total=total_bytes, desc=f"merge ({spec.method})", unit="B", unit_scale=True, disable=not progress)
            stream = merge_chunks(ckpts, res.kernel, order, chunk_elements)
            weight_map = {}
            for shard, fname in zip(shards, files):
                writer = StreamingShardWriter(tmp / fname, [plan[i] for i in shard])
                for i in shard:
                    name, dtype = plan[i][0], plan[i][2]
                    weight_map[name] = fname
                    need = tensor_nbytes(plan[i][1], dtype)
                    while need > 0:
                        got, piece = next(stream)
                        assert got == name, (got, name)
                        piece = piece.to(dtype)
                        writer.write(name, piece)
                        need -= piece.numel() * piece.element_size()
                        bar.update(piece.numel() * piece.element_size())
                writer.close()
                written += writer.total
            bar.close()
            if len(files) > 1:
                (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map},
                                                    indent=2) + "\n")
            _copy_side_files(template, tmp, spec)
            report = MergeReport(str(out), spec.method, [str(p) for p in res.paths], res.coefficients, len(order),
                                 bytes_read, written, 0.0)
            report.seconds = round(time.time() - t0, 3)
            (tmp / "rayalign_merge.json").write_text(json.dumps(
                {"spec": spec.model_dump(mode="json"), "report": report.as_dict()}, indent=2) + "\n")
        return report
    finally:
        for c in ckpts:
            c.close()


def output_kind(spec: MergeSpec, res: Any) -> str:
    """'adapter' or 'full': spec.output, where 'auto' is an adapter when every input is an adapter
    (or their base) and the merge is one exactly (see rayalign.merge.lora)."""
    if spec.output != "auto":
        return spec.output
    adapters = [p for p in res.paths if is_adapter_dir(p)]
    if not adapters:
        return "full"
    try:
        _adapter_terms(res)
    except MergeInputError:
        return "full"
    return "adapter"


def _adapter_terms(res: Any) -> tuple[list[Adapter], list[float]]:
    """The adapters of a resolved merge and their coefficients; the other inputs must be the
    adapters' base, and all coefficients must sum to 1 (base weight 1), else no adapter is exact."""
    adapters, coefs, base_coef, fulls = [], [], 0.0, []
    for path, c in zip(res.paths, res.coefficients):
        if is_adapter_dir(path):
            adapters.append(load_adapter(path))
            coefs.append(c)
        else:
            fulls.append(path)
            base_coef += c
    if not adapters:
        raise MergeInputError("an adapter output needs at least one adapter among the models")
    base = adapters[0].base
    others = sorted({a.base for a in adapters if not same_path(a.base, base)})
    if others:
        raise MergeInputError(f"adapters on different bases cannot be combined into one adapter: {[base, *others]} "
                              "(use output: full)")
    for f in fulls:
        if not same_path(f, base):
            raise MergeInputError(f"{f} is a full model, not the adapters' base {base}; an adapter output can "
                                  "only mix adapters and their base (use output: full)")
    total = base_coef + sum(coefs)
    if abs(total - 1.0) > 1e-6:
        raise MergeInputError(f"the coefficients sum to {total:g}: a combination of adapters is one adapter on the "
                              "base only when they sum to 1 (use normalize: true, task_arithmetic, or output: full)")
    return adapters, coefs


def _merge_adapters(spec: MergeSpec, res: Any, out: Path, overwrite: bool, t0: float) -> MergeReport:
    """One exact combined adapter of rank sum r_i (rayalign.merge.lora.combine), atomically."""
    adapters, coefs = _adapter_terms(res)
    base = Checkpoint(adapters[0].base)
    try:
        for a in adapters:
            check_on_base(a, base)
        validate([base])
    finally:
        base.close()
    combined = combine(adapters, coefs)
    first = next(p for p in res.paths if is_adapter_dir(p))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report = MergeReport(str(out), spec.method, [str(p) for p in res.paths], res.coefficients,
                             2 * len(combined.modules), sum(a.nbytes() for a in adapters), 0, 0.0)
        report.bytes_written = save_combined(combined, tmp, tokenizer_from=first,
                                             dtype=OUT_DTYPES[spec.dtype] if spec.dtype else torch.float32)
        report.seconds = round(time.time() - t0, 3)
        (tmp / "rayalign_merge.json").write_text(json.dumps(
            {"spec": spec.model_dump(mode="json"), "report": report.as_dict(), "output": "adapter",
             "rank": combined.rank, "adapter_coefficients": coefs}, indent=2) + "\n")
    return report


def _copy_side_files(template: Path, tmp: Path, spec: MergeSpec) -> None:
    cfg_path = template / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if spec.dtype:
            cfg["torch_dtype"] = spec.dtype
            cfg["dtype"] = spec.dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES + COPY_FILES:
        if (template / name).is_file():
            shutil.copy2(template / name, tmp / name)


# ---- the in-memory API ---------------------------------------------------------------------------

TensorSource = Mapping[str, torch.Tensor] | Checkpoint


@torch.no_grad()
def merge_into(model: torch.nn.Module, sources: Sequence[TensorSource], coefficients: Sequence[float],
               strict: bool = True) -> torch.nn.Module:
    """model.param <- sum_i c_i * source_i[param] for every parameter and persistent buffer, in place.

    Sources are state dicts (e.g. ingredient models held in memory by a Serve replica or a
    reference worker) or lazily read Checkpoints. Every linear method (soups, task arithmetic,
    ExPO, Bone Soups with extrapolation) is such a combination: see `resolve(spec).coefficients`."""
    if len(sources) != len(coefficients):
        raise ValueError(f"{len(sources)} sources but {len(coefficients)} coefficients")
    if not sources:
        raise ValueError("merge_into needs at least one source")
    coefs = [float(c) for c in coefficients]
    if not all(math.isfinite(c) for c in coefs):
        raise ValueError(f"coefficients must be finite, got {coefs}")
    target = model.state_dict()
    for name, dst in target.items():
        inputs = []
        for i, src in enumerate(sources):
            keys = src.tensors if isinstance(src, Checkpoint) else src
            if name not in keys:
                if strict:
                    raise MergeValidationError(f"source {i} has no tensor {name}")
                break
            t = src[name]
            if tuple(t.shape) != tuple(dst.shape):
                raise MergeValidationError(f"shape of {name} differs: source {i} has {list(t.shape)}, "
                                           f"the model {list(dst.shape)}")
            inputs.append(t)
        else:
            merged = kernels.weighted_sum(inputs, coefs)
            _check_finite(name, merged, [Path(f"source{i}") for i in range(len(inputs))], inputs)
            dst.copy_(merged.to(dst.dtype))
    return model


def merge_state_dicts(sources: Sequence[Mapping[str, torch.Tensor]], kernel: Kernel) -> dict[str, torch.Tensor]:
    """Apply a kernel to in-memory state dicts (all with the same keys)."""
    keys = list(sources[0].keys())
    for i, s in enumerate(sources[1:], 1):
        if set(s.keys()) != set(keys):
            raise MergeValidationError(f"state dict {i} has different tensor names from state dict 0")
    return {k: kernel([s[k] for s in sources]) for k in keys}
