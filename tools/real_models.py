"""Developer-only: real trained models (PP-OCRv3 from rapidocr-onnxruntime 1.2.3) and labelled data rendered offline.

Downloads the wheel once with ``pip download`` into ``~/.cache/graphprune-real/`` (override with
``GRAPHPRUNE_REAL_CACHE``), extracts the text detector, the text recognizer and the orientation
classifier, and renders seeded data with PIL and the machine's fonts (``fc-list``; DejaVu on Debian):

  - ``rec``: text lines -> ``[N, 3, 48, 320]`` as rapidocr's ``TextRecognizer.resize_norm_img`` makes
    them; metric: line accuracy (CTC greedy decoding with the dictionary the model carries in its
    metadata, as rapidocr's ``CTCLabelDecode``; spaces ignored on both sides).
  - ``det``: pages with text lines -> ``[N, 3, H, W]`` normalized as rapidocr's ``TextDetector``; metric:
    box F1 at IoU 0.5 after rapidocr's own ``DBPostProcess`` (imported from the wheel).
  - ``cls``: lines upright or turned 180 degrees -> ``[N, 3, 48, 192]``; metric: accuracy.

Each kind has a ``train`` split (unlabelled, the calibration / fine-tuning samples) and a held-out
``test`` split with the ground truth (what was rendered).  The data needs Pillow, and the detector's
metric OpenCV, pyclipper, shapely and six (rapidocr's post-processing); CI never runs this file.

    python tools/real_models.py [--check]     # download, render, cache; --check scores the originals
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import zipfile
from typing import Dict, List, Tuple

import numpy as np

CACHE = os.environ.get("GRAPHPRUNE_REAL_CACHE", os.path.expanduser("~/.cache/graphprune-real"))
WHEEL = "rapidocr_onnxruntime-1.2.3-py3-none-any.whl"
MEMBERS = {
    "det": "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
    "rec": "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
    "cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
# Sample counts per split: train <= 2,000 (the budget of unlabelled samples).
SIZES = {"rec": (2000, 500), "cls": (2000, 500), "det": (400, 100)}
DET_SHAPE = (320, 480)  # H, W of a page (multiples of 32, as DetResizeForTest makes them)
# Words of consonant-vowel syllables and numbers: random strings of every character would score the
# readable ambiguity of 0/O/o and l/I/1 (a random "x0Z" has no right reading), not the model.
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "st", "tr", "pl", "gr", "sh", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CAPITALS = "ABDEFGHJLMNQRTY"  # capitals whose shape differs from their lower case
_PUNCT = ".,:-%"


def path(*parts: str) -> str:
    return os.path.join(CACHE, *parts)


def models() -> Dict[str, str]:
    """{"det" | "rec" | "cls": path of the ONNX model}, downloading and extracting on first use.

    The shipped models declare their batch dim as -1 (Paddle2ONNX); graphprune's door refuses a
    negative dim, so the extracted copies name those dims instead (the only change).
    """
    out = {k: path("models", f"{k}.onnx") for k in MEMBERS}
    if all(os.path.exists(p) for p in out.values()):
        return out
    import onnx

    wheel = path(WHEEL)
    if not os.path.exists(wheel):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "rapidocr-onnxruntime==1.2.3", "--no-deps",
                        "-d", CACHE], check=True)
    os.makedirs(path("models"), exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(path("wheel"))
    for kind, member in MEMBERS.items():
        model = onnx.load(path("wheel", member))
        for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
            for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.Clear()
                    dim.dim_param = f"{vi.name}_dim{axis}"
        onnx.save(model, out[kind])
    return out


def dictionary() -> List[str]:
    """The recognizer's classes: blank, the characters in its metadata, and a space (as CTCLabelDecode)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(models()["rec"], load_external_data=False).metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def fonts() -> List[str]:
    found = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
    found = [f for f in found if "Math" not in f and "ExtraLight" not in f]
    if not found:
        raise SystemExit("no DejaVu fonts (apt-get install fonts-dejavu-core)")
    return found


def _word(rng: np.random.Generator) -> str:
    if rng.random() < 0.2:
        return str(int(rng.integers(2, 10))) + "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(0, 4))))
    word = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(int(rng.integers(1, 4))))
    if rng.random() < 0.3:
        word = str(rng.choice(list(_CAPITALS))) + word[1:]
    if rng.random() < 0.15:
        word += str(rng.choice(list(_PUNCT)))
    return word


def _text(rng: np.random.Generator, max_chars: int) -> str:
    words, length = [], 0
    while True:
        word = _word(rng)
        if length + len(word) + 1 > max_chars and words:
            return " ".join(words)
        words.append(word)
        length += len(word) + 1


def _line_image(rng: np.random.Generator, text: str, font_files: List[str]) -> np.ndarray:
    """A tight crop of ``text`` with a small margin, BGR uint8 (as cv2.imread gives rapidocr)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(rng.choice(font_files)), int(rng.integers(24, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(3, 10))
    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (bg, bg, bg))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink)
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (img.height, img.width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)[:, :, ::-1]


def _resize_norm(img: np.ndarray, shape: Tuple[int, int, int]) -> np.ndarray:
    """rapidocr's resize_norm_img (recognizer and classifier) for one line at the model's width."""
    import cv2

    c, h, w = shape
    ratio = img.shape[1] / float(img.shape[0])
    resized_w = min(w, int(np.ceil(h * ratio)))
    resized = cv2.resize(img, (resized_w, h)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros(shape, np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def _lines(kind: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    font_files = fonts()
    xs, truth = [], []
    for i in range(n):
        if kind == "rec":
            text = _text(rng, int(rng.integers(4, 13)))
            xs.append(_resize_norm(_line_image(rng, text, font_files), (3, 48, 320)))
            truth.append(text)
        else:
            text = _text(rng, int(rng.integers(8, 16)))
            img = _line_image(rng, text, font_files)
            flip = i % 2
            if flip:
                img = img[::-1, ::-1].copy()
            xs.append(_resize_norm(img, (3, 48, 192)))
            truth.append(flip)
    return np.stack(xs), truth


def _page(rng: np.random.Generator, font_files: List[str]):
    """A page of text lines at random places that do not overlap; returns (BGR image, boxes [k, 4])."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = DET_SHAPE
    bg = int(rng.integers(210, 256))
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    boxes: List[Tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 9)) * 4):
        if len(boxes) >= 8:
            break
        font = ImageFont.truetype(str(rng.choice(font_files)), int(rng.integers(16, 34)))
        text = _text(rng, int(rng.integers(4, 22)))
        left, top, right, bottom = font.getbbox(text)
        tw, th = right - left, bottom - top
        if tw >= w - 20:
            continue
        x, y = int(rng.integers(10, w - tw - 10)), int(rng.integers(10, h - th - 10))
        box = (x, y, x + tw, y + th)
        margin = 8  # keep lines apart so that each is one region of the probability map
        if any(box[0] < b[2] + margin and b[0] < box[2] + margin and box[1] < b[3] + margin and b[1] < box[3] + margin
               for b in boxes):
            continue
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((x - left, y - top), text, font=font, fill=ink)
        boxes.append(box)
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)[:, :, ::-1], np.array(boxes, np.float32)


def _det_input(img: np.ndarray) -> np.ndarray:
    """rapidocr's NormalizeImage (ImageNet mean/std on the BGR array, as rapidocr does) + ToCHWImage."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((img.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)


def _pages(n: int, seed: int):
    rng = np.random.default_rng(seed)
    font_files = fonts()
    xs, truth = [], []
    for _ in range(n):
        img, boxes = _page(rng, font_files)
        xs.append(_det_input(img))
        truth.append(boxes.tolist())
    return np.stack(xs), truth


def data(kind: str, split: str) -> Tuple[str, list]:
    """(path of the split's .npz with the model input ``x``, ground truth per sample), cached."""
    npz, truth_file = path("data", f"{kind}_{split}.npz"), path("data", f"{kind}_{split}_truth.json")
    if not (os.path.exists(npz) and os.path.exists(truth_file)):
        os.makedirs(path("data"), exist_ok=True)
        n = SIZES[kind][0 if split == "train" else 1]
        seed = {"train": 1, "test": 2}[split] * 1000 + {"rec": 0, "cls": 1, "det": 2}[kind]
        x, truth = _pages(n, seed) if kind == "det" else _lines(kind, n, seed)
        np.savez(npz, x=x)
        with open(truth_file, "w") as fh:
            json.dump(truth, fh)
    with open(truth_file) as fh:
        return npz, json.load(fh)


# -- task metrics ---------------------------------------------------------------------------------


def ctc_decode(probs: np.ndarray, chars: List[str]) -> List[str]:
    """Greedy CTC decoding as rapidocr's CTCLabelDecode: argmax per step, repeats merged, blanks dropped."""
    out = []
    for row in probs.argmax(axis=2):
        keep = [c for i, c in enumerate(row) if c != 0 and (i == 0 or row[i - 1] != c)]
        out.append("".join(chars[c] for c in keep))
    return out


def line_accuracy(probs: np.ndarray, truth: List[str], chars: List[str]) -> float:
    decoded = ctc_decode(probs, chars)
    return float(np.mean([d.replace(" ", "") == t.replace(" ", "") for d, t in zip(decoded, truth)]))


def cls_accuracy(probs: np.ndarray, truth: List[int]) -> float:
    return float(np.mean(probs.argmax(axis=1) == np.asarray(truth)))


def _db_postprocess():
    """rapidocr's DBPostProcess with the settings of its config.yaml, imported from the extracted wheel."""
    import importlib.util

    models()
    spec = importlib.util.spec_from_file_location(
        "rapidocr_det_utils", path("wheel", "rapidocr_onnxruntime", "ch_ppocr_v3_det", "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                                use_dilation=True, score_mode="fast")


def box_f1(maps: np.ndarray, truth: List[list], iou: float = 0.5) -> float:
    """F1 of detected boxes against the rendered line boxes, one-to-one matches at IoU >= ``iou``."""
    from shapely.geometry import Polygon, box as rect

    post = _db_postprocess()
    h, w = maps.shape[2:]
    tp = n_pred = n_true = 0
    for m, boxes in zip(maps, truth):
        pred = post(m[None], [(h, w, 1.0, 1.0)])[0]["points"]
        polys = [Polygon(p).buffer(0) for p in pred]
        gts = [rect(*b) for b in boxes]
        n_pred, n_true = n_pred + len(polys), n_true + len(gts)
        used = set()
        for g in gts:
            scores = [(g.intersection(p).area / max(g.union(p).area, 1e-9), j) for j, p in enumerate(polys) if j not in used]
            best = max(scores, default=(0.0, -1))
            if best[0] >= iou:
                used.add(best[1])
                tp += 1
    precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
    return 2 * precision * recall / max(precision + recall, 1e-9)


def score(kind: str, outputs: np.ndarray, truth: list) -> float:
    """The task metric of ``kind`` on the model's first output for the test split, as a fraction."""
    if kind == "rec":
        return line_accuracy(outputs, truth, dictionary())
    if kind == "cls":
        return cls_accuracy(outputs, truth)
    return box_f1(outputs, truth)


def evaluate(kind: str, model_path: str, threads: int = 2) -> float:
    import onnxruntime as ort

    npz, truth = data(kind, "test")
    x = np.load(npz)["x"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = 8 if kind == "det" else 64
    out = np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    return score(kind, out, truth)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="score the original models on the test splits")
    parser.add_argument("--kinds", nargs="*", default=["rec", "cls", "det"])
    args = parser.parse_args(argv)
    paths = models()
    for kind in args.kinds:
        for split in ("train", "test"):
            npz, truth = data(kind, split)
            print(f"{kind} {split}: {len(truth)} samples in {npz}")
        if args.check:
            print(f"{kind}: original {evaluate(kind, paths[kind]) * 100:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
