"""Loading images from input/ and saving them to output/ (or temp/ for previews).

``LoadImage`` gives an IMAGE and a MASK of 1 − alpha (transparent = the area to change; a
64×64 zero mask when the file has no alpha, as ComfyUI does), applies the EXIF orientation
and turns the frames of an animated file into a batch. ``SaveImage`` writes numbered PNGs
(``prefix_00001_.png``, never overwriting) with the workflow embedded as text chunks:
``prompt`` (the API-format workflow) and one chunk per key of the client's
``extra_pnginfo`` (the editor's UI-format ``workflow``), which ``nodeflow run`` and
ComfyUI both read back. The environment variable ``NODEFLOW_DISABLE_METADATA=1`` leaves the
metadata out (ComfyUI's ``--disable-metadata``). ``SaveImage`` has exactly ComfyUI's widgets:
editor files store its values by position, so an extra widget would take the next value.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import time
from pathlib import Path, PurePosixPath
from typing import Any

from nodeflow import Combo, Hidden, Node, Output, Result, Socket, String
from nodeflow.folders import UnsafePath, folders, safe_relative
from nodeflow.spec import LiteralError

#: ComfyUI's clients may name a file in another folder: ``"x.png [output]"``.
_ANNOTATED = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")


def image_path(name: str, default_kind: str = "input") -> Path:
    """The file a LoadImage ``image`` value names: a file in ``default_kind`` (input/;
    subfolders allowed), or ``"name [output]"`` / ``"name [temp]"`` / ``"name [input]"``.
    Confined to that folder; raises ``UnsafePath`` or ``FileNotFoundError`` saying what was
    wrong."""
    kind = default_kind
    match = _ANNOTATED.match(name)
    if match:
        name, kind = match["name"], match["kind"]
    path = folders().io_path(kind, name)
    if not path.is_file():
        raise FileNotFoundError(f"image file {name!r} not found in the {kind} folder ({folders().io_dir(kind)})")
    return path


class ImageFile(Combo):
    """The ``image`` input of the loaders: one of the images in input/ (``folder``), or any
    existing file named as above (an upload that is not listed yet, or a ComfyUI-style
    annotated name)."""

    #: The folder a plain name is looked up in.
    folder: str = "input"

    def check(self, value: Any) -> LiteralError | None:
        if isinstance(value, str):
            try:
                image_path(value, self.folder)
                return None
            except UnsafePath as exc:
                return LiteralError(type="value_not_in_list", message=str(exc),
                                    expected=f"a file name inside the {self.folder} folder")
            except (FileNotFoundError, OSError):
                pass
        err = super().check(value)
        if err is not None:
            err.message = "Image file not found"
        return err

    def options(self) -> dict[str, Any]:
        extra = {"image_upload": True}
        if self.folder != "input":
            extra["image_folder"] = self.folder
        return super().options() | extra


def _image_choices() -> list[str]:
    return folders().list_images("input")


def _output_image_choices() -> list[str]:
    return [f"{name} [output]" for name in folders().list_images("output")]


def _file_hash(name: Any, default_kind: str = "input") -> str | None:
    try:
        path = image_path(name, default_kind)
    except (OSError, ValueError, TypeError):
        return None  # the run reports what is wrong
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_readable(name: Any, default_kind: str = "input") -> list[str] | None:
    """A validation-time check that the file is an image PIL can identify (reads the header)."""
    if not isinstance(name, str):
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        path = image_path(name, default_kind)
    except (OSError, ValueError):
        return None  # reported by the input's own check
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header is parsed on open
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return [f"input image {name!r} is not an image file that can be read ({type(exc).__name__}: {exc})"]
    return None


def _header_size(name: Any, default_kind: str = "input") -> tuple[int, int, int] | None:
    """``(frames, height, width)`` of an image file, from its header (nothing is decoded)."""
    if not isinstance(name, str):
        return None
    with _open(name, default_kind) as im:
        width, height = im.size
        return max(int(getattr(im, "n_frames", 1) or 1), 1), height, width


def _open(name: str, default_kind: str = "input"):
    from PIL import Image, UnidentifiedImageError

    path = image_path(name, default_kind)
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"input image {name!r} is not an image file that can be read: {exc}") from None


def _rgb_array(frame):
    """One PIL frame as float32 RGB ``[H, W, 3]`` in 0..1 (16-bit and float modes scaled)."""
    import numpy as np

    if frame.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = np.clip(np.asarray(frame, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if frame.mode == "F":
        gray = np.clip(np.asarray(frame, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0


def _alpha_array(frame):
    """The frame's alpha in 0..1, or ``None`` when it has none (palette and colour-key
    transparency count)."""
    import numpy as np

    if "A" in frame.getbands():
        return np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
    if "transparency" in frame.info and frame.mode in ("P", "L", "RGB", "1"):
        return np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
    return None


class LoadImage(Node):
    """Loads an image from input/: the IMAGE and a MASK of 1 − alpha (transparent areas are
    to be painted; a 64×64 zero mask when there is no alpha). The EXIF orientation is applied;
    the frames of an animated file (GIF, APNG, WebP, TIFF pages) become a batch (frames of
    another size than the first are skipped)."""

    category = "image"
    display_name = "Load Image"
    inputs = {"image": ImageFile(choices=_image_choices, tooltip="a file in the input folder")}
    outputs = [Output("IMAGE", "IMAGE"), Output("MASK", "MASK")]
    #: Where a plain file name is looked up.
    folder = "input"

    @classmethod
    def fingerprint(cls, image=None, **_):
        return _file_hash(image, cls.folder)

    @classmethod
    def validate_inputs(cls, image=None, **_):
        return _check_readable(image, cls.folder)

    @classmethod
    def file_pixels(cls, image=None, **_):
        return _header_size(image, cls.folder)

    def run(self, image):
        import numpy as np
        import torch
        from PIL import ImageOps, ImageSequence

        with _open(image, self.folder) as im:
            frames, alphas, size = [], [], None
            for index, frame in enumerate(ImageSequence.Iterator(im)):
                if index and im.format == "MPO":
                    break  # the other "frames" of an MPO are depth or stereo views
                frame = ImageOps.exif_transpose(frame)
                if size is None:
                    size = frame.size
                elif frame.size != size:
                    continue
                frames.append(_rgb_array(frame))
                alphas.append(_alpha_array(frame))
        if not frames:
            raise ValueError(f"input image {image!r} has no frames")
        pixels = torch.from_numpy(np.stack(frames))
        if any(a is not None for a in alphas):
            h, w = frames[0].shape[:2]
            mask = torch.from_numpy(np.stack([1.0 - a if a is not None else np.zeros((h, w), np.float32)
                                              for a in alphas]))
        else:
            mask = torch.zeros((len(frames), 64, 64), dtype=torch.float32)
        return pixels, mask


class LoadImageOutput(LoadImage):
    """Loads an image from the output folder (to feed a result back in): the IMAGE and a
    MASK of 1 − alpha, as LoadImage. The choices are the output images in ComfyUI's
    ``"name [output]"`` form; a plain name is looked up in output/ too (ComfyUI would look
    in input/)."""

    display_name = "Load Image (from Outputs)"
    inputs = {"image": ImageFile(choices=_output_image_choices, folder="output",
                                 tooltip="a file in the output folder")}
    folder = "output"


class LoadImageMask(Node):
    """Loads one channel of an image from input/ as a MASK (``alpha`` gives 1 − alpha, so
    transparent areas are 1; the colour channels are taken as they are)."""

    category = "mask"
    display_name = "Load Image (as Mask)"
    inputs = {
        "image": ImageFile(choices=_image_choices, tooltip="a file in the input folder"),
        "channel": Combo(choices=["alpha", "red", "green", "blue"]),
    }
    outputs = [Output("MASK")]

    @classmethod
    def fingerprint(cls, image=None, **_):
        return _file_hash(image)

    @classmethod
    def validate_inputs(cls, image=None, **_):
        return _check_readable(image)

    @classmethod
    def file_pixels(cls, image=None, **_):
        size = _header_size(image)
        return (1, size[1], size[2]) if size is not None else None

    def run(self, image, channel):
        import numpy as np
        import torch
        from PIL import ImageOps

        with _open(image) as im:
            frame = ImageOps.exif_transpose(im)
            if channel == "alpha":
                alpha = _alpha_array(frame)
                values = 1.0 - alpha if alpha is not None else np.zeros(frame.size[::-1], np.float32)
            else:
                values = _rgb_array(frame)[:, :, ["red", "green", "blue"].index(channel)]
        return (torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).unsqueeze(0),)


# -- saving ----------------------------------------------------------------------------------------


def metadata_disabled() -> bool:
    """The process-wide switch (ComfyUI's ``--disable-metadata``)."""
    return os.environ.get("NODEFLOW_DISABLE_METADATA", "").strip().lower() in ("1", "true", "yes", "on")


# A date format may hold "/" (``%date:yyyy/MM/dd%`` makes subfolders); other tokens may not.
_TOKEN = re.compile(r"%(date:[^%]*|[^%/\\]+)%")
_DATE_PART = re.compile(r"yyyy|yy|MM|M|dd|d|HH|H|hh|h|mm|m|ss|s")


def expand_prefix(prefix: str, width: int, height: int, prompt: dict | None = None,
                  now: time.struct_time | None = None) -> str:
    """Replace ComfyUI's tokens in a file-name prefix: ``%width%``, ``%height%``, ``%year%``,
    ``%month%``, ``%day%``, ``%hour%``, ``%minute%``, ``%second%``, the editor's
    ``%date:yyyy-MM-dd%`` (a ``/`` in the format makes subfolders: ``%date:yyyy/MM/dd%/name``)
    and ``%NodeTitle.input%`` (a literal input of the node with that title or class in the
    workflow). Unknown tokens are left as they are."""
    now = now or time.localtime()
    simple = {"width": str(width), "height": str(height), "year": str(now.tm_year),
              "month": f"{now.tm_mon:02d}", "day": f"{now.tm_mday:02d}", "hour": f"{now.tm_hour:02d}",
              "minute": f"{now.tm_min:02d}", "second": f"{now.tm_sec:02d}"}
    parts = {"yyyy": f"{now.tm_year:04d}", "yy": f"{now.tm_year % 100:02d}", "MM": f"{now.tm_mon:02d}",
             "M": str(now.tm_mon), "dd": f"{now.tm_mday:02d}", "d": str(now.tm_mday),
             "HH": f"{now.tm_hour:02d}", "H": str(now.tm_hour), "hh": f"{now.tm_hour:02d}",
             "h": str(now.tm_hour), "mm": f"{now.tm_min:02d}", "m": str(now.tm_min),
             "ss": f"{now.tm_sec:02d}", "s": str(now.tm_sec)}

    def token(match: re.Match) -> str:
        body = match[1]
        if body in simple:
            return simple[body]
        if body.startswith("date:"):
            return _DATE_PART.sub(lambda m: parts[m[0]], body[5:])
        if "." in body and isinstance(prompt, dict):
            title, _, field = body.rpartition(".")
            for node in prompt.values():
                if not isinstance(node, dict):
                    continue
                meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {}
                if title in (meta.get("title"), node.get("class_type")):
                    value = (node.get("inputs") or {}).get(field)
                    if isinstance(value, (str, int, float, bool)):
                        return re.sub(r"[/\\:*?\"<>|]", "_", str(value))
        return match[0]

    return _TOKEN.sub(token, prefix)


def _split_prefix(prefix: str) -> tuple[str, str]:
    """(subfolder, file name stem) of a prefix; raises ``UnsafePath`` for names that would
    leave the folder (absolute paths, ``..``)."""
    try:
        rel = safe_relative(prefix)
    except UnsafePath as exc:
        raise UnsafePath(f"filename_prefix {prefix!r} would leave the output folder ({exc}); "
                         f"use a relative name such as 'name' or 'subfolder/name'") from None
    parent = rel.parent
    return ("" if parent == PurePosixPath(".") else parent.as_posix()), rel.name


def _next_counter(directory: Path, stem: str) -> int:
    pattern = re.compile(re.escape(stem) + r"_(\d+)_")
    highest = 0
    if directory.is_dir():
        for entry in os.listdir(directory):
            match = pattern.match(entry)
            if match:
                highest = max(highest, int(match[1]))
    return highest + 1


def save_images(images, filename_prefix: str, kind: str, compress_level: int, prompt=None,
                extra_pnginfo=None, embed: bool = True) -> list[dict[str, str]]:
    """Write each image of a batch as ``<prefix>_<counter:05>_.png`` in ``kind`` (output or
    temp) and return ComfyUI's image entries ``{"filename", "subfolder", "type"}``."""
    from PIL.PngImagePlugin import PngInfo

    from nodeflow.imaging import to_pil

    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected an IMAGE batch [B, H, W, C], got shape {list(images.shape)}")
    height, width = int(images.shape[1]), int(images.shape[2])
    subfolder, stem = _split_prefix(expand_prefix(filename_prefix, width, height, prompt))
    info = None
    if embed and not metadata_disabled():
        info = PngInfo()
        if prompt is not None:
            info.add_text("prompt", json.dumps(prompt, default=str))
        for key, value in (extra_pnginfo or {}).items():
            info.add_text(str(key), json.dumps(value, default=str))
    store = folders()
    # Resolving a name inside the subfolder confines the subfolder itself (symlinks too).
    directory = store.io_path(kind, stem, subfolder).parent
    directory.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(directory, stem.replace("%batch_num%", "0"))
    results = []
    for number, image in enumerate(images):
        name_stem = stem.replace("%batch_num%", str(number))
        picture = to_pil(image)
        while True:
            filename = f"{name_stem}_{counter:05}_.png"
            path = store.io_path(kind, filename, subfolder)
            try:
                handle = open(path, "xb")  # noqa: SIM115 - never overwrite, even with another writer racing us
            except FileExistsError:
                counter += 1
                continue
            break
        try:
            with handle:
                picture.save(handle, format="PNG", pnginfo=info, compress_level=compress_level)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        results.append({"filename": filename, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def _validate_prefix(filename_prefix: Any) -> list[str] | None:
    if not isinstance(filename_prefix, str):
        return None
    if not filename_prefix.strip():
        return ["filename_prefix is empty; give a name such as 'ComfyUI' or 'subfolder/name'"]
    try:
        _split_prefix(expand_prefix(filename_prefix, 0, 0))
    except UnsafePath as exc:
        return [str(exc)]
    return None


class SaveImage(Node):
    """Saves images to the output folder as numbered PNGs (``prefix_00001_.png``; the prefix
    may name a subfolder, ``sub/name``, and use ``%date:yyyy-MM-dd%``, ``%width%`` and
    similar tokens; a trailing ``/`` is dropped, as ComfyUI does, so ``a/`` saves
    ``a_00001_.png``) with the workflow embedded, unless ``NODEFLOW_DISABLE_METADATA=1`` is set."""

    category = "image"
    display_name = "Save Image"
    inputs = {
        "images": Socket("IMAGE", tooltip="the images to save"),
        "filename_prefix": String(default="ComfyUI",
                                  tooltip="the file name start; may include a subfolder and %date:yyyy-MM-dd% "
                                          "style tokens"),
    }
    hidden = {"prompt": Hidden("PROMPT"), "extra_pnginfo": Hidden("EXTRA_PNGINFO")}
    #: As in current ComfyUI: the images pass through (templates link from this output).
    outputs = [Output("IMAGE", "images")]
    output_node = True

    @classmethod
    def validate_inputs(cls, filename_prefix=None, **_):
        return _validate_prefix(filename_prefix)

    def run(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        results = save_images(images, filename_prefix, "output", 4, prompt, extra_pnginfo)
        return Result(images, ui={"images": results})


class PreviewImage(Node):
    """Shows images without keeping them: they are written to the temp folder (with a random
    name, fast compression)."""

    category = "image"
    display_name = "Preview Image"
    inputs = {"images": Socket("IMAGE")}
    hidden = {"prompt": Hidden("PROMPT"), "extra_pnginfo": Hidden("EXTRA_PNGINFO")}
    #: As in current ComfyUI: the images pass through (templates link from this output).
    outputs = [Output("IMAGE", "images")]
    output_node = True

    def run(self, images, prompt=None, extra_pnginfo=None):
        prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        results = save_images(images, prefix, "temp", 1, prompt, extra_pnginfo)
        return Result(images, ui={"images": results})
