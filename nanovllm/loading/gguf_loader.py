"""Load a GGUF checkpoint (llama.cpp's single-file format) as a transformers config, HF-named
float32 tensors and a transformers tokenizer.

Why: the bundled default model ships as a Q4_1 GGUF, and users bring GGUFs of their own; the
engine's models speak Hugging Face names and layouts. So this module translates:

- metadata  -> a transformers config of the architecture (`gguf_models.py`: llama and
  Mixtral, qwen2, qwen3, qwen3moe, gemma2, gemma3);
- tensors   -> float32 in HF shape `[out_features, in_features]`, dequantized through
  `gguf.quants.dequantize`, with what llama.cpp's converter changed undone (llama's Q/K row
  permutation, Gemma's 1 + w norms, stacked experts split per expert);
- tokenizer -> transformers' own GGUF conversion, with the file's chat template.

The header is walked here rather than with `gguf.GGUFReader`: the reader builds a numpy view for
every vocabulary string and merge (~100k for SmolLM2), which takes ~3 s; skipping over them takes
~0.05 s. Tensor data stays memory-mapped until `iter_tensors` dequantizes it, one tensor at a time.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from nanovllm.kernels.launch_math import cdiv
from nanovllm.loading.config_check import validate_hf_config
from nanovllm.loading.gguf_models import EXPERT, SUPPORTED_ARCHITECTURES, GGUFArchitecture, architecture_of

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)  # v1 (2023) counted with 32-bit ints; nothing ships it any more
HEADER_BYTES = 24  # magic u32, version u32, tensor_count u64, kv_count u64
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"

# Fixed-size metadata value types (little-endian struct formats).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


# GGUF tensor stems -> HF module names; the ".weight" / ".bias" suffix carries over. Per-layer
# names and what each architecture needs undone: gguf_models.py.
_GLOBAL_TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(\d+)\.weight")  # older Mixtral files: one tensor per expert
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


# ----------------------------------------------------------------------------- header


class _TensorInfo(NamedTuple):
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # torch order (GGUF stores ne[0], the fastest-moving dim, first)
    qtype: GGMLQuantizationType
    start: int  # absolute file offset of the data
    nbytes: int


class _Header(NamedTuple):
    metadata: dict[str, Any]  # string arrays (vocabulary, merges) are skipped: the tokenizer reads them
    tensors: tuple[_TensorInfo, ...]


class _Cursor:
    """Reads GGUF's little-endian scalars, length-prefixed strings and typed arrays from a buffer."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)  # struct.error past the end
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.pos + length > len(self.buf):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8")
        self.pos += length
        return text

    def value(self, value_type: int):
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self.scalar(_SCALAR_FORMATS[GGUFValueType(value_type)])

    def array(self):
        element_type, count = self.scalar("<I"), self.scalar("<Q")
        if element_type == GGUFValueType.STRING:  # vocabulary / merges: walk past them, ~100k entries
            for _ in range(count):
                self.pos += 8 + self.scalar("<Q")
            return None
        if element_type not in _SCALAR_FORMATS:
            raise ValueError(f"unsupported metadata array element type {element_type}")
        dtype = np.dtype(_SCALAR_FORMATS[GGUFValueType(element_type)])
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)  # ValueError if short
        self.pos += values.nbytes
        return values.tolist()


def _invalid(path: str, reason: str) -> ValueError:
    return ValueError(f"{path}: not a valid GGUF file ({reason})")


def _parse_header(path: str) -> _Header:
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise _invalid(path, f"{size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        buf = f.read(HEADER_BYTES)
    if buf[:4] != GGUF_MAGIC:
        raise _invalid(path, f"starts with {buf[:4]!r}, not the magic {GGUF_MAGIC!r}")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise _invalid(path, f"version {version}; supported: {SUPPORTED_GGUF_VERSIONS} little-endian")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data))
    try:
        cursor.pos = 8
        tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        raw_tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            ndim = cursor.scalar("<I")
            ne = [cursor.scalar("<Q") for _ in range(ndim)]
            raw_tensors.append((name, tuple(reversed(ne)), cursor.scalar("<I"), cursor.scalar("<Q")))
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
        raise _invalid(path, f"header ends early or is corrupt: {e}") from None
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _invalid(path, f"general.alignment {alignment!r} is not a power of two")
    data_start = cdiv(cursor.pos, alignment) * alignment  # next multiple of the alignment
    arch = _architecture(path, metadata)
    spec = architecture_of(arch, metadata)
    tensors = tuple(_tensor_info(path, size, data_start, arch, spec, *raw) for raw in raw_tensors)
    return _Header(metadata, tensors)


def _architecture(path: str, metadata: dict) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _tensor_info(path: str, file_size: int, data_start: int, arch: str, spec: GGUFArchitecture,
                 name: str, shape: tuple[int, ...], type_id: int, offset: int) -> _TensorInfo:
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type id {type_id}") from None
    _check_dequantizable(path, name, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_size:
        raise _invalid(path, f"tensor {name!r} of shape {shape} does not split into {qtype.name} blocks")
    nbytes = int(np.prod(shape)) // block_size * type_size
    start = data_start + offset
    if start + nbytes > file_size:
        raise _invalid(path, f"truncated: tensor {name!r} needs bytes up to {start + nbytes}, file has {file_size}")
    return _TensorInfo(name, _hf_name(path, arch, spec, name), shape, qtype, start, nbytes)


def _hf_name(path: str, arch: str, spec: GGUFArchitecture, gguf_name: str) -> str:
    """The HF name of a tensor; stacked experts get an EXPERT placeholder (split on reading)."""
    if name := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, stem, suffix = name.groups()
        if module := spec.layer_tensor_name(stem):
            return f"model.layers.{layer}.{module}.{suffix}"
    elif name := _EXPERT_TENSOR.fullmatch(gguf_name):
        layer, stem, expert = name.groups()
        if module := spec.expert_tensor_name(stem, int(expert)):
            return f"model.layers.{layer}.{module}.weight"
    elif (name := _GLOBAL_TENSOR.fullmatch(gguf_name)) and name.group(1) in _GLOBAL_TENSOR_NAMES:
        return f"{_GLOBAL_TENSOR_NAMES[name.group(1)]}.{name.group(2)}"
    # e.g. rope_freqs.weight (llama-3 rope scaling): refusing beats a silently wrong model
    raise ValueError(f"{path}: tensor {gguf_name!r} of a {arch!r} GGUF is not supported by nanovllm")


@functools.lru_cache(maxsize=None)
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf.quants can dequantize this type (checked on one zero block)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_dequantizable(path: str, tensor_name: str, qtype: GGMLQuantizationType) -> None:
    if not _dequantizable(qtype):
        supported = [t.name for t in GGMLQuantizationType if _dequantizable(t)]
        raise ValueError(
            f"{path}: tensor {tensor_name!r} has type {qtype.name}, which the gguf package cannot dequantize; "
            f"supported: {', '.join(supported)}"
        )


def _file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, mtime_ns, size): the cache key, so an edited file is read again."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: is not a file; pass the path of a .gguf file")
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _cached_header(path: str, mtime_ns: int, size: int) -> _Header:
    return _parse_header(path)


# ----------------------------------------------------------------------------- config


def _hf_config(path: str, header: _Header):
    import transformers

    meta = header.metadata
    arch = meta["general.architecture"]

    def get(key: str, default: Any = KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tensor_names = {t.gguf_name for t in header.tensors}
    shapes = {t.gguf_name: t.shape for t in header.tensors}
    hidden_size, num_heads = get("embedding_length"), get("attention.head_count")
    spec = architecture_of(arch, meta)
    config_class = getattr(transformers, spec.config_class_name)
    heads_ok = isinstance(num_heads, int) and num_heads > 0 and isinstance(hidden_size, int)
    kwargs = dict(
        architectures=[spec.hf_architecture],
        dtype=torch.float32,  # what iter_tensors yields
        vocab_size=get("vocab_size", shapes.get("token_embd.weight", (None,))[0]),
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("attention.head_count_kv", num_heads),
        head_dim=get("attention.key_length", hidden_size // num_heads if heads_ok else None),
        max_position_embeddings=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),  # transformers 5 keeps it in rope_parameters
        rope_scaling=_rope_scaling(path, get),
        attention_bias="blk.0.attn_q.bias" in tensor_names,  # qwen2 reads its biases regardless
        tie_word_embeddings="output.weight" not in tensor_names,  # no head tensor: reuse the embedding
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if spec.config_extras is not None:
        kwargs |= spec.config_extras(get, kwargs, tensor_names)
    validate_hf_config(kwargs, path)  # transformers divides by num_attention_heads while building some configs
    return config_class(**kwargs)


def _rope_scaling(path: str, get) -> dict | None:
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": get("rope.scaling.factor"),
                "original_max_position_embeddings": get("rope.scaling.original_context_length")}
    raise ValueError(f"{path}: rope scaling {kind!r} is not supported (none, linear, yarn)")


# ----------------------------------------------------------------------------- checkpoint


def _reverse_qk_permutation(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` (convert_hf_to_gguf.py): per head, HF keeps the two rotary
    halves as consecutive row blocks, llama.cpp interleaves them row by row."""
    rows = weights.shape[0]
    per_head = weights.reshape(num_heads, rows // num_heads // 2, 2, *weights.shape[1:])  # [H, D/2, 2, ...]
    return per_head.swapaxes(1, 2).reshape(weights.shape)  # [H*D, ...] as [H, 2, D/2, ...]


@dataclass
class GGUFCheckpoint:
    """A parsed GGUF file: its transformers config and chat template; tensors on demand."""

    hf_config: Any  # transformers.PretrainedConfig
    chat_template: str | None
    path: str
    _spec: GGUFArchitecture = field(default=SUPPORTED_ARCHITECTURES["llama"], repr=False)
    _tensors: tuple[_TensorInfo, ...] = field(default=(), repr=False)

    def tensor_types(self) -> dict[str, str]:
        """{HF name: ggml type name (e.g. "Q4_K", "F16")} of every tensor, without reading data."""
        return {t.hf_name: t.qtype.name for t in self._tensors}

    def iter_tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, Any]]:
        """Yield (HF name, float32 tensor in HF shape) one at a time, in file order. With
        `keep_quantized`, 2-D tensors of the types in `gguf_quant.KEPT_QUANTIZED` come as
        `QuantCodes` (codes and per-group scales, rows in HF order) instead."""
        from nanovllm.loading import gguf_quant

        arch = self._spec
        # A plain ndarray over the map: np.memmap's subclass hooks cost ~1 s per model in gguf's row loop.
        data = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        heads = {"attn_q": self.hf_config.num_attention_heads, "attn_k": self.hf_config.num_key_value_heads}
        for t in self._tensors:
            raw = data[t.start : t.start + t.nbytes].reshape(*t.shape[:-1], -1)  # [*rows, bytes per row]
            stem = t.gguf_name.split(".")[-2]
            permute = arch.permute_qk and stem in heads
            if (keep_quantized and EXPERT not in t.hf_name
                    and (codes := gguf_quant.read_quantized(raw, t.qtype, t.shape)) is not None):
                if permute:
                    order = _reverse_qk_permutation(np.arange(t.shape[0]), heads[stem])
                    codes = codes.select_rows(torch.from_numpy(np.ascontiguousarray(order)))
                yield t.hf_name, codes
                continue
            weights = gguf.quants.dequantize(raw, t.qtype)  # [*rows, cols] float32
            if permute:
                weights = _reverse_qk_permutation(weights, heads[stem])
            if arch.norm_offset and stem.endswith("norm"):
                weights = weights - np.float32(arch.norm_offset)
            if not weights.flags.writeable:  # F32 is a view of the read-only map
                weights = np.array(weights)
            tensor = torch.from_numpy(weights)
            if EXPERT in t.hf_name:  # [E, rows, cols] stacked experts -> one tensor per expert
                for expert, part in enumerate(tensor):
                    yield t.hf_name.replace(EXPERT, str(expert)), part
            else:
                yield t.hf_name, tensor


def read_gguf_checkpoint(path: str | os.PathLike) -> GGUFCheckpoint:
    """Parse a GGUF file's header (cached per file version); the tensors stay on disk."""
    key = _file_key(path)
    header = _cached_header(*key)
    return GGUFCheckpoint(
        hf_config=_hf_config(key[0], header),  # a fresh config each call: callers may edit it
        chat_template=header.metadata.get(CHAT_TEMPLATE_KEY),
        path=key[0],
        _spec=architecture_of(header.metadata["general.architecture"], header.metadata),
        _tensors=header.tensors,
    )


# ----------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int, size: int):
    from transformers import PreTrainedTokenizerFast

    chat_template = _cached_header(path, mtime_ns, size).metadata.get(CHAT_TEMPLATE_KEY)
    # Not AutoTokenizer: for llama it also builds a config through gguf.GGUFReader, ~6 s more.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_gguf_tokenizer(path: str | os.PathLike):
    """The file's tokenizer as a transformers fast tokenizer, chat template set.

    Building it from the GGUF vocabulary takes ~1 s, so it is cached per file version; each call
    returns its own copy (~0.3 s), free to modify.
    """
    key = _file_key(path)
    _cached_header(*key)  # a clear ValueError for a bad file before transformers sees it
    return copy.deepcopy(_cached_tokenizer(*key))
