"""quantize_checkpoint, dequantize_checkpoint, inspect_checkpoint: Hugging Face model folders through the service.

Each input shard becomes one output shard of the same name, written tensor by tensor while later tensors
are still at the server (`workers` calls in flight, at most `window_bytes` of input among them), so memory
stays near window_bytes plus the largest tensor whatever the model's size. A finished shard is recorded
(size and SHA-256) in OUT/.quantd-checkpoint.json with the settings; a rerun with the same settings skips
every shard whose file still has that size and digest.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import json
import math
import re
import shutil
from collections import deque
from pathlib import Path

import torch

from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec

from .files import INDEX, SINGLE, ModelFolder, ShardWriter, _planned, file_digest, write_json
from .profiles import DEFAULT_IGNORE, FLOATS, LEGACY_KEY, PROFILES, QuantdLegacy, detect, fused_groups, pow2

MANIFEST = ".quantd-checkpoint.json"


@dataclasses.dataclass
class Decision:
    name: str
    action: str          # "quantize", "keep" or "unsupported"
    reason: str = ""


@dataclasses.dataclass
class Result:
    """What a run did: per-tensor decisions, shards written and skipped, bytes read and written."""

    decisions: list
    written: list
    skipped: list
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def quantized(self) -> list:
        return [d.name for d in self.decisions if d.action == "quantize"]


def _matches(patterns, name) -> bool:
    return any(re.search(p, name) for p in patterns)


def plan(folder: ModelFolder, profile, spec, ignore=(), include=()) -> list:
    """Which tensors are quantized, and why the others are kept."""
    decisions = []
    for shard in folder.shards:
        for name, entry in folder.entries(shard).items():
            if not profile.candidate(name, entry.dtype, entry.shape):
                decisions.append(Decision(name, "keep", "not a target of the profile"))
            elif _matches(ignore, name) or (_matches(DEFAULT_IGNORE, name) and not _matches(include, name)):
                decisions.append(Decision(name, "keep", "ignored"))
            elif (why := profile.unsupported(spec, entry.shape)) is not None:
                decisions.append(Decision(name, "unsupported", why))
            else:
                decisions.append(Decision(name, "quantize"))
    return decisions


def _meta_quantized(spec, shape):
    from quantd.kernels.spec import QuantizedTensor
    return QuantizedTensor.from_stored({name: torch.empty(tshape, dtype=dtype, device="meta")
                                        for name, tshape, dtype in spec.storage(shape).tensors()}, spec, shape)


def _kept_modules(folder, decisions, profile) -> list:
    """Modules of kept 2-D floating-point weights but embeddings (not Linear layers), named as the loaders'
    skip lists name them."""
    entries = {n: e for s in folder.shards for n, e in folder.entries(s).items()}
    return sorted(d.name.removesuffix(".weight") for d in decisions
                  if d.action != "quantize" and d.name.endswith(".weight") and "embed" not in d.name
                  and entries[d.name].dtype in FLOATS and len(entries[d.name].shape) == 2)


class _Manifest:
    def __init__(self, out: Path, settings: dict):
        self.path, self.settings = out / MANIFEST, settings
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.shards = old.get("shards", {}) if old.get("settings") == settings else {}

    def finished(self, out: Path, shard: str) -> bool:
        record, path = self.shards.get(shard), out / shard
        return (record is not None and path.is_file() and path.stat().st_size == record["size"]
                and file_digest(path) == record["sha256"])

    def record(self, shard: str, size: int, digest: str) -> None:
        self.shards[shard] = {"size": size, "sha256": digest}
        write_json(self.path, {"settings": self.settings, "shards": dict(sorted(self.shards.items()))})


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads their own heaps (arenas); tensor-sized buffers freed in the pool's and gRPC's threads
    then stay resident, so peak RSS grew with the model instead of with the window (measured: 668-906 MiB for a
    1 GiB model with a 64 MiB window; 427-446 MiB with at most 2 arenas). Only threads that first allocate after this call obey: call it before making the
    client (the CLI does)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def _progress(total: int, desc: str, show: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None if show else True)


def _run_shard(writer: ShardWriter, jobs, workers: int, window_bytes: int, bar) -> None:
    """Run jobs ((input bytes, fn returning {name: tensor})) `workers` at a time, at most window_bytes of
    input in flight (always at least one job), writing each result as it is ready."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        flight, in_flight = deque(), 0
        for nbytes, fn in jobs:
            while flight and (len(flight) >= workers or in_flight + nbytes > window_bytes):
                in_flight -= _finish(writer, flight.popleft(), bar)
            flight.append((nbytes, pool.submit(fn)))
            in_flight += nbytes
        while flight:
            _finish(writer, flight.popleft(), bar)


def _finish(writer, job, bar) -> int:
    nbytes, future = job
    for name, tensor in future.result().items():
        writer.write(name, tensor)
    bar.update(nbytes)
    return nbytes


def _convert(folder: ModelFolder, out, shards: dict, config: dict, settings: dict, desc: str,
             workers: int, window_bytes: int, progress: bool, log) -> tuple[list, list, int, int]:
    """Write every shard of `shards` ({name: [(input bytes, {name: (dtype, shape)} it writes, fn)]}), resuming;
    then the index, config.json and the other files. Returns (written, skipped, input bytes, output bytes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    limit_malloc_arenas()
    manifest = _Manifest(out, settings)
    todo = [s for s in shards if not manifest.finished(out, s)]
    skipped = [s for s in shards if s not in todo]
    if skipped:
        log(f"{len(skipped)} shard(s) already finished, skipped: {', '.join(skipped)}")
    total = sum(job[0] for s in todo for job in shards[s])
    with _progress(total, desc, progress) as bar:
        for shard in todo:
            planned = {n: v for job in shards[shard] for n, v in job[1].items()}
            writer = ShardWriter(out / shard, planned, metadata={"format": "pt"})
            try:
                _run_shard(writer, [(nbytes, fn) for nbytes, _, fn in shards[shard]], workers, window_bytes, bar)
            except BaseException:
                writer.abort()
                raise
            manifest.record(shard, *writer.close())
    if list(shards) != [SINGLE]:
        weight_map = {n: s for s, jobs in shards.items() for job in jobs for n in job[1]}
        total_size = sum(_planned_bytes(job[1]) for jobs in shards.values() for job in jobs)
        write_json(out / INDEX, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(out / "config.json", config)
    for path in folder.other_files():
        shutil.copyfile(path, out / path.name)
    return todo, skipped, total, sum(manifest.shards[s]["size"] for s in shards)


def quantize_checkpoint(client, src, dst, *, profile: str = "hf-fp8", scheme: str | None = None, ignore=(), include=(),
                        pow2_scales: bool = False, skip_unsupported: bool = False, dry_run: bool = False,
                        **options) -> Result:
    """Quantize the model folder `src` into `dst` in `profile`'s layout, through `client` (a QuantdClient).
    options: workers (4), window_bytes (1 GiB), max_shard_bytes (0: one output shard per input shard),
    progress (True), log (print)."""
    folder = ModelFolder(src)
    if folder.config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized (config.json has a quantization_config)")
    prof = PROFILES.get(profile)
    if prof is None:
        raise ValueError(f"unknown profile {profile!r} (expected one of {', '.join(PROFILES)})")
    chosen = prof.scheme(scheme)
    spec = pow2(chosen.spec) if pow2_scales else chosen.spec
    decisions = plan(folder, prof, spec, ignore, include)
    result = Result(decisions, [], [])
    unsupported = [d for d in decisions if d.action == "unsupported"]
    if unsupported and not skip_unsupported:
        raise ValueError(f"{len(unsupported)} tensor(s) the scheme {chosen.name} cannot take (--skip-unsupported keeps "
                         "them as they are): " + "; ".join(f"{d.name}: {d.reason}" for d in unsupported[:10]))
    if dry_run:
        return result
    quantize = {d.name for d in decisions if d.action == "quantize"}
    scales = _shared_tensor_scales(folder, quantize, spec, options.get("log", print)) if chosen.fused_tensor_scale else {}

    def job(shard, name, entry):
        if name not in quantize:
            return entry.nbytes, {name: (entry.dtype, entry.shape)}, lambda: {name: folder.tensor(shard, name)}
        shape = prof.service_input(torch.empty(entry.shape, device="meta")).shape
        return entry.nbytes, _planned(prof.store(name, _meta_quantized(spec, shape))), lambda: prof.store(
            name, client.quantize(prof.service_input(folder.tensor(shard, name)), spec, report=False,
                                  scales=scales.get(name)))

    config = dict(folder.config, quantization_config=prof.quantization_config(chosen, spec, _kept_modules(folder, decisions, prof)))
    settings = {"operation": "quantize", "profile": prof.name, "scheme": chosen.name, "spec": spec.describe(),
                "quantize": sorted(quantize)}
    jobs = {s: [job(s, n, e) for n, e in folder.entries(s).items()] for s in folder.shards}
    return _write(folder, dst, decisions, jobs, config, settings, "quantize", **options)


def _shared_tensor_scales(folder: ModelFolder, quantize: set, spec: QuantSpec, log) -> dict:
    """{name: tensor scale} for the weights of fused modules (profiles.fused_groups): each group's parts share the
    tensor scale of the group's largest amax, found by reading those weights once before quantizing."""
    shard_of = {n: s for s in folder.shards for n in folder.entries(s)}
    groups = fused_groups(quantize)
    if groups:
        log(f"{len(groups)} fused module(s): reading their {sum(map(len, groups))} weights once for shared tensor scales")
    scales = {}
    for group in groups:
        amax = max(float(reference.amax(folder.tensor(shard_of[n], n))) for n in group)
        scales.update(dict.fromkeys(group, reference.tensor_scale(amax, spec)))
    return scales


class _Stored:
    """A quantized model folder read back: its profile and scheme, every quantized tensor (by original name) and
    the names it is stored under, and jobs that rewrite each quantized tensor and copy the rest."""

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self.prof, self.scheme = _detect(folder)
        self.shard_of = {n: s for s in folder.shards for n in folder.entries(s)}
        self.originals = self.prof.originals(self.shard_of)
        self.stored = {o: _stored_names(self.prof, self.scheme, o, folder, self.shard_of) for o in self.originals}
        companions = {n for names in self.stored.values() for n in names}
        self.kept = [n for n in self.shard_of if n not in companions]
        self.decisions = [Decision(o, "quantize") for o in self.originals] + [Decision(n, "keep") for n in self.kept]

    def get(self, name) -> torch.Tensor:
        return self.folder.tensor(self.shard_of[name], name)

    def load(self, original, get=None):
        return self.prof.load(original, get or self.get, self.scheme)

    def meta(self, original):
        return self.load(original, _meta_get(self.folder, self.shard_of))

    def jobs(self, planned_of, job_of) -> dict:
        """{input shard: jobs}: quantized tensors become planned_of(original) ({name: (dtype, shape)}), written by
        job_of(original) ({name: tensor}); the rest is copied."""
        entry = lambda n: self.folder.entries(self.shard_of[n])[n]  # noqa: E731

        def jobs(shard):
            mine = [o for o in self.originals if self.shard_of[self.prof.base(o) + self.prof.scale_suffix] == shard]
            kept = [n for n in self.kept if self.shard_of[n] == shard]
            return ([(entry(n).nbytes, {n: (entry(n).dtype, entry(n).shape)}, lambda n=n: {n: self.get(n)}) for n in kept]
                    + [(sum(entry(c).nbytes for c in self.stored[o]), planned_of(o), lambda o=o: job_of(o)) for o in mine])
        return {s: jobs(s) for s in self.folder.shards}


def dequantize_checkpoint(client, src, dst, *, dtype: torch.dtype = torch.bfloat16, **options) -> Result:
    """Write the quantized model folder `src` (any profile) as a plain `dtype` model into `dst` (options as for
    quantize_checkpoint)."""
    stored = _Stored(ModelFolder(src))
    prof = stored.prof
    jobs = stored.jobs(
        lambda o: {o: (dtype, prof.service_output(torch.empty(stored.meta(o).shape, device="meta")).shape)},
        lambda o: {o: prof.service_output(client.dequantize(stored.load(o), dtype))})
    config = {k: v for k, v in stored.folder.config.items() if k != "quantization_config"}
    settings = {"operation": "dequantize", "profile": prof.name, "scheme": stored.scheme.name, "dtype": str(dtype)}
    return _write(stored.folder, dst, stored.decisions, jobs, config, settings, "dequantize", **options)


def convert_checkpoint(client, src, dst, *, profile: str, scheme: str | None = None, allow_lossy: bool = False,
                       **options) -> Result:
    """Rewrite the quantized model folder `src` in `profile`'s layout. Where both store the same codes and scales
    (hf-fp8 <-> compressed-tensors fp8-block) the bytes are re-laid out without the service; any other pair is
    lossy and refused unless allow_lossy, which dequantizes to bf16 (in `dst`.bf16, removed after) and
    quantizes again through `client`."""
    stored = _Stored(ModelFolder(src))
    target = PROFILES.get(profile)
    if target is None:
        raise ValueError(f"unknown profile {profile!r} (expected one of {', '.join(PROFILES)})")
    chosen = target.scheme(scheme)
    why = _why_not_exact(stored, target, chosen)
    if why is not None:
        if not allow_lossy:
            raise ValueError(f"{stored.prof.name} {stored.scheme.name} -> {target.name} {chosen.name} is not exact: {why} "
                             "(--allow-lossy dequantizes and quantizes again through the service)")
        plain = Path(dst).with_name(Path(dst).name + ".bf16")
        dequantize_checkpoint(client, src, plain, **options)
        result = quantize_checkpoint(client, plain, dst, profile=profile, scheme=scheme, **options)
        shutil.rmtree(plain)
        return result
    qconfig = stored.folder.config.get("quantization_config") or {}
    spec = pow2(chosen.spec) if qconfig.get("scale_fmt") == "ue8m0" else chosen.spec
    jobs = stored.jobs(lambda o: _planned(target.store(o, _meta_quantized(spec, stored.meta(o).shape))),
                       lambda o: target.store(o, stored.load(o)))
    config = dict(stored.folder.config, quantization_config=target.quantization_config(
        chosen, spec, _kept_modules(stored.folder, stored.decisions, target)))
    settings = {"operation": "convert", "from": [stored.prof.name, stored.scheme.name], "profile": target.name,
                "scheme": chosen.name}
    return _write(stored.folder, dst, stored.decisions, jobs, config, settings, "convert", **options)


def _why_not_exact(stored: _Stored, target, chosen) -> str | None:
    if target.weight_suffix != stored.prof.weight_suffix:
        return f"{target.name} and {stored.prof.name} quantize different tensors"
    encoding = chosen.spec.scale_encoding   # fp32 or power-of-two scales: the same numbers either way
    other = [o for o in stored.originals if dataclasses.replace(stored.meta(o).spec, scale_encoding=encoding) != chosen.spec]
    if other:
        return f"{len(other)} tensor(s) (e.g. {other[0]}) are {stored.meta(other[0]).spec.describe()}, not {chosen.spec.describe()}"
    return None


def _write(folder, dst, decisions, jobs, config, settings, desc, *, workers: int = 4, window_bytes: int = 1 << 30,
           max_shard_bytes: int = 0, progress: bool = True, log=print) -> Result:
    result = Result(decisions, [], [])
    shards = _shards(folder, jobs, max_shard_bytes)
    result.written, result.skipped, result.bytes_in, result.bytes_out = _convert(
        folder, dst, shards, config, dict(settings, max_shard_bytes=max_shard_bytes), desc, workers, window_bytes,
        progress, log)
    return result


def _planned_bytes(planned: dict) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in planned.values())


def _shards(folder, jobs: dict, max_shard_bytes: int) -> dict:
    """{output shard: jobs}: one per input shard of the same name, or (max_shard_bytes) refilled in order up to
    that many tensor bytes each (a job's tensors stay together; a bigger job gets a shard of its own)."""
    if not max_shard_bytes:
        return jobs
    groups, size = [[]], 0
    for job in (j for shard_jobs in jobs.values() for j in shard_jobs):
        nbytes = _planned_bytes(job[1])
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(job)
        size += nbytes
    if len(groups) == 1 and folder.index is None:
        return {SINGLE: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def _detect(folder: ModelFolder):
    """detect(config.json), or quantd's old layout: shards with the `quantd` metadata key and no quantization_config."""
    layout = {}
    for shard in folder.shards:
        layout.update(json.loads(folder.headers[shard][1].get(LEGACY_KEY, "{}")))
    if layout and not folder.config.get("quantization_config"):
        legacy = QuantdLegacy(layout)
        return legacy, legacy.scheme(None)
    return detect(folder.config)


def _meta_get(folder, shard_of):
    def get(name):
        entry = folder.entries(shard_of[name])[name]
        return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
    return get


def _stored_names(prof, scheme, original, folder, shard_of) -> list:
    """Names a quantized tensor is stored under, recorded by running the profile's load on meta tensors."""
    seen = []
    meta = _meta_get(folder, shard_of)

    def get(name):
        if name not in shard_of:
            raise KeyError(name)
        seen.append(name)
        return meta(name)
    prof.load(original, get, scheme)
    return seen


def inspect_checkpoint(src) -> dict:
    """Profile, scheme, counts and bytes of a model folder, and `problems`: every tensor the config implies
    that is missing or has the wrong dtype or shape."""
    folder = ModelFolder(src)
    entries = {n: e for s in folder.shards for n, e in folder.entries(s).items()}
    report = {"profile": None, "scheme": None, "quantized": 0, "kept": len(entries),
              "bytes": sum(e.nbytes for e in entries.values()), "problems": []}
    if not folder.config.get("quantization_config"):
        return report
    prof, chosen = detect(folder.config)
    report.update(profile=prof.name, scheme=chosen.name)
    originals = prof.originals(entries)
    stored = set()
    for original in originals:
        try:
            qt = prof.load(original, lambda n: torch.empty(entries[n].shape, dtype=entries[n].dtype, device="meta"), chosen)
        except KeyError as exc:
            report["problems"].append(f"{original}: stored tensor {exc.args[0]} is missing")
            continue
        spec = qt.spec
        if prof.name == "hf-fp8" and folder.config["quantization_config"].get("scale_fmt") == "ue8m0":
            spec = pow2(spec)
        want = _planned(prof.store(original, _meta_quantized(spec, qt.shape)))
        for name, (dtype, shape) in want.items():
            stored.add(name)
            have = entries.get(name)
            if have is None:
                report["problems"].append(f"{name}: missing")
            elif (have.dtype, have.shape) != (dtype, shape):
                report["problems"].append(f"{name}: {str(have.dtype)[6:]} {list(have.shape)}, expected "
                                          f"{str(dtype)[6:]} {list(shape)}")
    code_dtypes = {chosen.spec.code_dtype}
    for name, entry in entries.items():
        if name not in stored and entry.dtype in code_dtypes and entry.dtype not in FLOATS and len(entry.shape) >= 2:
            report["problems"].append(f"{name}: {str(entry.dtype)[6:]} weight outside any complete quantized tensor")
    report.update(quantized=len(originals), kept=len(entries) - len(stored))
    return report
