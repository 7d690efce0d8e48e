"""One loader for every model this project runs: the moderator, the baseline guards, the chat targets,
the local judge and export's equivalence check.

Rules, decided here once:
- device: an explicit ``device`` is always honoured; ``None`` means CUDA when a GPU is visible, else the
  CPU; ``"auto"`` (or an explicit ``device_map``) spreads a model too large for one GPU over all of
  them with ``device_map="auto"``. A model that does not fit the chosen GPU is refused before it is
  copied there, with that advice.
- dtype: an explicit ``dtype`` is honoured (``"auto"``: the checkpoint's own); ``None`` means float32
  on the CPU (bf16 matmuls are slow there) and bfloat16 on CUDA (float16 where bf16 is unsupported).
- weights: safetensors only; a PEFT adapter directory loads its base (named in the adapter config),
  and a pickled ``adapter_model.bin`` is refused, never loaded.
- special files: a local directory holding a FIFO, socket or device is refused by name before anything
  in it is opened (a FIFO blocks whoever opens it).
- padding: the tokenizer pads on the LEFT (batched scoring reads the last position and generation
  appends there), with the end-of-sequence token as padding when the tokenizer has none.
- image bounds: applied to processors that resize images into a pixel budget (``moderator.images``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moderator.images import ImageBounds, bound_image_pixels, supports_pixel_bounds
from moderator.manifest import special_file_problems

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Files that mean a directory carries its own processor/tokenizer (else an adapter uses its base's).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ModelLoadError(ValueError):
    """A model cannot be loaded as asked; the message names the path or argument."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The named model directory does not exist (an OSError too, as transformers' own not-found errors)."""


def resolve_device(device: str | None = None) -> str:
    """``None``: ``"cuda"`` when a GPU is visible, else ``"cpu"``; ``"auto"`` stays ``"auto"``; anything else
    is returned as given once torch accepts it (a CUDA device with no GPU visible is refused)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r}: not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested, but no CUDA GPU is visible to torch")
    return device


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A dtype name or ``torch.dtype`` as torch knows it; ``"auto"`` and ``None`` pass through."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def _cuda_supports_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported()
    except (RuntimeError, AssertionError):  # no device to ask: every GPU this project targets has bf16
        return True


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """An explicit dtype as given (``"auto"``: the checkpoint's); ``None``: float32 on CPU, bf16 on CUDA."""
    parsed = parse_dtype(dtype)
    if parsed is not None:
        return parsed
    on_gpu = device == "auto" or torch.device(device).type == "cuda"
    if on_gpu and torch.cuda.is_available():
        return torch.bfloat16 if _cuda_supports_bf16() else torch.float16
    return torch.float32


def use_left_padding(processor: Any) -> None:
    """Make the processor's tokenizer pad on the left, with EOS as padding when it has no pad token."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # e.g. Llama 3 tokenizers; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token


def require_left_padding(processor: Any, who: str) -> None:
    """Refuse a processor that pads on the right: batched scoring and generation would read padding."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.padding_side != "left" or tokenizer.pad_token is None:
        raise ModelLoadError(
            f"{who}: the tokenizer pads on the {tokenizer.padding_side} (pad token {tokenizer.pad_token!r}); batched "
            "inference needs left padding: load with moderator.loading.load_vlm or call use_left_padding(processor)"
        )


def looks_like_a_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else that is not a directory was meant as a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _refuse_pickled_weights(directory: Path, adapter: bool) -> None:
    if adapter:
        if not (directory / ADAPTER_WEIGHTS_FILE).is_file():
            found = sorted(p.name for p in directory.glob("adapter_model.*"))
            raise ModelLoadError(
                f"{directory / ADAPTER_WEIGHTS_FILE}: missing (found {found or 'nothing'}); adapters load from "
                "safetensors only, a pickled adapter_model.bin can run code and is never loaded"
            )
        return
    if not any(directory.glob("*.safetensors")):
        pickles = sorted(p.name for p in directory.iterdir() if p.name.lower().endswith(PICKLE_WEIGHT_SUFFIXES))
        if pickles:
            raise ModelLoadError(
                f"{directory}: holds pickled weights only ({', '.join(pickles)}); models load from safetensors "
                "only (pickles can run code): convert them with save_pretrained(safe_serialization=True)"
            )


def _check_fits(model: Any, device: str) -> None:
    """Refuse a model larger than the GPU's free memory before copying it there (an OOM halfway is worse)."""
    if torch.device(device).type != "cuda":
        return
    try:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):
        return  # memory cannot be queried: let the copy decide
    needed = model.get_memory_footprint()
    if needed > free:
        raise ModelLoadError(
            f"{type(model).__name__} needs {needed / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free; "
            "pass device='auto' to spread it over the GPUs (device_map='auto'), or a smaller dtype"
        )


def load_vlm(
    path_or_name: str | Path,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    model_cls: Any = None,
    processor_cls: Any = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    image_bounds: ImageBounds | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` in eval mode under the rules in the module docstring.

    ``model_cls``/``processor_cls`` default to ``AutoModelForImageTextToText``/``AutoProcessor``; text
    models pass ``AutoModelForCausalLM``/``AutoTokenizer``. A local directory holding
    ``adapter_config.json`` is a PEFT adapter. ``image_bounds`` bound processors that support pixel
    budgets and are ignored by others (their image size is fixed by the architecture).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_cls = model_cls or AutoModelForImageTextToText
    processor_cls = processor_cls or AutoProcessor
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if device == "auto" and device_map is None:
        device_map = "auto"
    name = str(path_or_name)
    local = Path(name).expanduser()
    if not local.is_dir():
        if local.exists() or looks_like_a_path(name):
            raise ModelNotFoundError(f"{name}: model directory not found")
        local = None

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    model_kwargs: dict[str, Any] = {**common, "dtype": torch_dtype, "use_safetensors": True}
    if attn_implementation:
        model_kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        model_kwargs["device_map"] = device_map

    if local is not None:
        special = special_file_problems(local)
        if special:  # a FIFO would block the load (or crash it deep in transformers): refused, never opened
            raise ModelLoadError(f"{local}: refused: {special[0]}")
    is_adapter = local is not None and (local / ADAPTER_CONFIG_FILE).is_file()
    if local is not None:
        _refuse_pickled_weights(local, adapter=is_adapter)
    if is_adapter:
        from peft import PeftConfig, PeftModel

        # AutoPeftModel does not map VLMs: load the base with the requested class, then the adapter.
        adapter_config = PeftConfig.from_pretrained(str(local))
        base = adapter_config.base_model_name_or_path
        if not base:
            raise ModelLoadError(f"{local / ADAPTER_CONFIG_FILE}: field 'base_model_name_or_path' is empty")
        base_model = model_cls.from_pretrained(base, revision=adapter_config.revision, **model_kwargs)
        model = PeftModel.from_pretrained(base_model, str(local))
        own_processor = any((local / f).is_file() for f in PROCESSOR_FILES)
        processor = processor_cls.from_pretrained(
            str(local) if own_processor else base,
            revision=None if own_processor else adapter_config.revision,
            **common,
        )
    else:
        model = model_cls.from_pretrained(name, revision=revision, **model_kwargs)
        processor = processor_cls.from_pretrained(name, revision=revision, **common)

    if device_map is None:
        _check_fits(model, device)
        model = model.to(device)
    use_left_padding(processor)
    if image_bounds is not None and image_bounds.is_set and supports_pixel_bounds(processor):
        bound_image_pixels(processor, image_bounds.min_pixels, image_bounds.max_pixels)
    return model.eval(), processor
