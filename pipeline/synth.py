"""`vlcurate synth`: learnable, offline image-text data with ground truth, and realistic noise.

Each sample is a procedurally drawn scene (a shape of some kind, colour, size and position on a varied background:
a gradient with faint blobs of its own colour, different in every drawing, so that two samples of one scene are two
pictures, as two photos of one subject are) with a caption describing it in English or Chinese. Noise of known
types can be injected; every sample's ``.json`` holds the ground truth (``synth``: the true description, the
language, the noise types), so curation quality (precision and recall of dropping each noise type) can be measured
exactly. Deterministic for a seed: the same command writes byte-identical shards.

Duplicate noise (``DUPLICATE_TYPES``, off unless asked for: ``--noise duplicate_resized=0.05``) is drawn from its
own random stream, so asking for it changes only the samples it picks: such a sample is a copy of an earlier
original (any shard) with its caption and ground truth, the image kept byte for byte, re-encoded at JPEG quality
60-90, resized to 50-90% or cropped by up to 10% per side; or a look-alike: the original's scene with the shape
moved to another position, drawn afresh (a different image, with its own true caption). The ground truth names the
original: ``synth.duplicate`` = {kind, of, and the transform's parameters} or ``synth.lookalike_of``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形", "cross": "十字"}
COLOURS = {
    "red": ("红色", (220, 30, 30)), "green": ("绿色", (30, 170, 60)), "blue": ("蓝色", (40, 70, 220)),
    "yellow": ("黄色", (240, 210, 30)), "purple": ("紫色", (140, 50, 170)), "orange": ("橙色", (245, 140, 20)),
    "white": ("白色", (245, 245, 245)), "black": ("黑色", (20, 20, 20)),
}
SIZES = {"small": ("小", 0.22), "large": ("大", 0.45)}
POSITIONS = {"left": ("左边", (0.27, 0.5)), "right": ("右边", (0.73, 0.5)), "top": ("上方", (0.5, 0.27)),
             "bottom": ("下方", (0.5, 0.73)), "center": ("中间", (0.5, 0.5))}
EN_TEMPLATES = [
    "a {size} {colour} {shape} on the {position} of a {background} background",
    "a {colour} {shape}, {size}, at the {position}, {background} background",
    "photo of a {size} {colour} {shape} on a {background} background, {position}",
    "{size} {colour} {shape} placed {position} against {background}",
]
ZH_TEMPLATES = ["{background}背景的{position}有一个{size}的{colour}{shape}", "一个{size}的{colour}{shape}在{background}背景{position}"]
EN_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "centre"}

OTHER_LANGUAGE = ["un grand cercle rouge sur un fond bleu", "ein kleines grünes Quadrat auf weißem Hintergrund",
                  "un triángulo amarillo grande sobre fondo negro", "una piccola croce viola su sfondo arancione"]
OTHER_SCRIPT = ["большой красный круг на синем фоне", "赤い丸が青い背景の左にあります", "دائرة حمراء كبيرة على خلفية زرقاء",
                "नीली पृष्ठभूमि पर एक बड़ा लाल घेरा"]
EMOJI = ["😀", "🔥", "👍🏽", "🇫🇷", "❤️", "👨\u200d👩\u200d👧"]
PATTERNS = ["{c} https://cdn.example.com/img/{n}.jpg", "IMG_{n}.JPG {c}", "{c} @shop_{n}", "{c} - Stock Photo",
            "{c}!!!!!! click to enlarge"]

NOISE_TYPES = ("mismatched", "html", "emoji", "other_language", "other_script", "patterns", "too_short", "too_long",
               "tiny_image", "extreme_aspect", "corrupt_image")
# What a correct curation does with each noise type: dropped, or kept with a cleaned caption.
NOISE_EXPECTED_DROP = {"mismatched": True, "html": False, "emoji": True, "other_language": True,
                       "other_script": True, "patterns": False, "too_short": True, "too_long": True,
                       "tiny_image": True, "extreme_aspect": True, "corrupt_image": True}
# Duplicate noise: never part of ``default_noise``; a copy comes after its original, which is kept.
COPY_TYPES = ("duplicate_exact", "duplicate_reencoded", "duplicate_resized", "duplicate_cropped")
DUPLICATE_TYPES = (*COPY_TYPES, "lookalike")
NOISE_EXPECTED_DROP.update({name: True for name in COPY_TYPES} | {"lookalike": False})


@dataclasses.dataclass
class SynthOptions:
    samples: int = 1000
    seed: int = 0
    size: int = 224
    shard_size: int = 1000
    chinese: float = 0.15  # share of clean captions written in Chinese
    noise: dict[str, float] = dataclasses.field(default_factory=dict)  # noise type -> probability

    def __post_init__(self):
        unknown = set(self.noise) - set(NOISE_TYPES) - set(DUPLICATE_TYPES)
        if unknown:
            raise ValueError(f"unknown noise type(s) {sorted(unknown)}; known: "
                             f"{', '.join(NOISE_TYPES + DUPLICATE_TYPES)}")
        if sum(self.noise.get(name, 0.0) for name in NOISE_TYPES) > 1.0:
            raise ValueError("noise probabilities add up to more than 1")
        if sum(self.noise.get(name, 0.0) for name in DUPLICATE_TYPES) > 1.0:
            raise ValueError("duplicate noise probabilities add up to more than 1")


def default_noise(rate: float) -> dict[str, float]:
    """Spread ``rate`` evenly across every noise type."""
    return {name: rate / len(NOISE_TYPES) for name in NOISE_TYPES}


def random_scene(rng: random.Random) -> dict:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    return {"shape": rng.choice(list(SHAPES)), "colour": colour, "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)), "background": background}


def describe(scene: dict, language: str, rng: random.Random) -> str:
    if language == "zh":
        return rng.choice(ZH_TEMPLATES).format(
            size=SIZES[scene["size"]][0], colour=COLOURS[scene["colour"]][0], shape=SHAPES[scene["shape"]],
            position=POSITIONS[scene["position"]][0], background=COLOURS[scene["background"]][0])
    return rng.choice(EN_TEMPLATES).format(size=scene["size"], colour=scene["colour"], shape=scene["shape"],
                                           position=EN_POSITION_WORDS[scene["position"]],
                                           background=scene["background"])


def draw(scene: dict, width: int, height: int, rng: random.Random) -> Image.Image:
    base = COLOURS[scene["background"]][1]
    top = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in base)
    image = Image.new("RGB", (width, height), base)
    pixels = ImageDraw.Draw(image)
    for y in range(0, height, 4):  # a gentle vertical gradient: backgrounds are not flat
        t = y / max(1, height - 1)
        pixels.rectangle([0, y, width, y + 4], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(top, base)))
    side = min(width, height)
    for _ in range(6):  # faint blobs of the background's colour: a texture of its own in every drawing
        bx, by = rng.uniform(0, width), rng.uniform(0, height)
        br = rng.uniform(0.05, 0.2) * side
        shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
        pixels.ellipse([bx - br, by - br, bx + br, by + br], fill=shade)
    radius = SIZES[scene["size"]][1] * side / 2 * rng.uniform(0.85, 1.15)
    fx, fy = POSITIONS[scene["position"]][1]
    cx = fx * width + rng.uniform(-0.04, 0.04) * side
    cy = fy * height + rng.uniform(-0.04, 0.04) * side
    fill = COLOURS[scene["colour"]][1]
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    shape = scene["shape"]
    if shape == "circle":
        pixels.ellipse(box, fill=fill)
    elif shape == "square":
        pixels.rectangle(box, fill=fill)
    elif shape == "triangle":
        pixels.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    elif shape == "diamond":
        pixels.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    else:  # cross
        arm = radius / 3
        pixels.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)
        pixels.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def duplicate_plan(index: int, options: SynthOptions) -> tuple[str, int, random.Random] | None:
    """(duplicate type, index of an earlier sample, the sample's random stream) when sample ``index`` is drawn as
    duplicate noise, else None. Its own stream: the other samples do not change when duplicates are asked for."""
    if index == 0 or not any(options.noise.get(name, 0.0) for name in DUPLICATE_TYPES):
        return None
    rng = random.Random(f"{options.seed}:duplicate:{index}")
    roll, cumulative = rng.random(), 0.0
    for name in DUPLICATE_TYPES:
        cumulative += options.noise.get(name, 0.0)
        if roll < cumulative:
            return name, rng.randrange(index), rng
    return None


def copy_image(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, dict]:
    """The image of a copy, and the parameters of its transform."""
    if kind == "duplicate_exact":
        return data, {}
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    if kind == "duplicate_reencoded":
        quality = rng.randint(60, 90)
        return jpeg_bytes(image, quality), {"quality": quality}
    width, height = image.size
    if kind == "duplicate_resized":
        scale = rng.uniform(0.5, 0.9)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return jpeg_bytes(image.resize(size, Image.Resampling.BICUBIC)), {"scale": round(scale, 4)}
    sides = [rng.uniform(0.0, 0.10) for _ in range(4)]  # left, top, right, bottom: shares of the side
    box = (round(sides[0] * width), round(sides[1] * height), width - round(sides[2] * width),
           height - round(sides[3] * height))
    return jpeg_bytes(image.crop(box)), {"crop": [round(side, 4) for side in sides]}


def make_duplicate(index: int, plan: tuple[str, int, random.Random], options: SynthOptions,
                   scenes: list[dict]) -> dict:
    """A copy of an earlier original (a copy of a copy names the first original), or a look-alike of it."""
    kind, source, rng = plan
    while (earlier := duplicate_plan(source, options)) is not None and earlier[0] in COPY_TYPES:
        source = earlier[1]
    original = make_sample(source, options, scenes)
    truth = json.loads(original["json"])["synth"]
    key = f"synth{index:08d}"
    if kind == "lookalike":
        scene = {name: truth[name] for name in ("shape", "colour", "size", "position", "background")}
        moved = {**scene, "position": rng.choice([p for p in POSITIONS if p != scene["position"]])}
        caption = describe(moved, truth["language"], rng)
        image = jpeg_bytes(draw(moved, options.size, options.size, rng))
        metadata = {"synth": {**moved, "language": truth["language"], "true_caption": caption, "noise": None,
                              "width": options.size, "height": options.size, "lookalike_of": original["key"]}}
        return {"key": key, "jpg": image, "txt": caption.encode("utf-8"),
                "json": json.dumps(metadata, ensure_ascii=False).encode("utf-8")}
    try:
        image, transform = copy_image(original["jpg"], kind, rng)
    except OSError:  # a corrupt original (truncated JPEG) cannot be decoded: copied byte for byte instead
        kind, (image, transform) = "duplicate_exact", (original["jpg"], {})
    width, height = truth["width"], truth["height"]
    if kind != "duplicate_exact":
        with Image.open(io.BytesIO(image)) as header:
            width, height = header.size
    duplicate = {"kind": kind.removeprefix("duplicate_"), "of": original["key"], **transform}
    metadata = {"synth": {**truth, "width": width, "height": height, "duplicate": duplicate}}
    return {"key": key, "jpg": image, "txt": original["txt"],
            "json": json.dumps(metadata, ensure_ascii=False).encode("utf-8")}


def make_sample(index: int, options: SynthOptions, scenes: list[dict]) -> dict:
    plan = duplicate_plan(index, options)
    if plan is not None:
        return make_duplicate(index, plan, options, scenes)
    rng = random.Random(f"{options.seed}:{index}")
    scene = scenes[index]
    language = "zh" if rng.random() < options.chinese else "en"
    true_caption = describe(scene, language, rng)
    noise = None
    roll, cumulative = rng.random(), 0.0
    for name in NOISE_TYPES:
        cumulative += options.noise.get(name, 0.0)
        if roll < cumulative:
            noise = name
            break
    caption, width, height = true_caption, options.size, options.size
    if noise == "mismatched":
        other = scenes[(index + rng.randint(1, len(scenes) - 1)) % len(scenes)] if len(scenes) > 1 else scene
        while other == scene:
            other = random_scene(rng)
        caption = describe(other, language, rng)
    elif noise == "html":
        caption = rng.choice(["<p>{c}</p>", "<b>{c}</b> &amp; more<br>", "<span class='x'>{c}</span>"]).format(c=caption)
    elif noise == "emoji":
        caption = f"{caption} {rng.choice(EMOJI)}"
    elif noise == "other_language":
        caption = rng.choice(OTHER_LANGUAGE)
    elif noise == "other_script":
        caption = rng.choice(OTHER_SCRIPT)
    elif noise == "patterns":
        caption = rng.choice(PATTERNS).format(c=caption, n=rng.randint(1000, 9999))
    elif noise == "too_short":
        caption = scene["shape"] if language == "en" else SHAPES[scene["shape"]][:1]
    elif noise == "too_long":
        caption = ", ".join([true_caption] * 12)
    elif noise == "tiny_image":
        width = height = max(16, options.size // 6)
    elif noise == "extreme_aspect":
        width, height = options.size * 4, options.size
    image = jpeg_bytes(draw(scene, width, height, rng))
    if noise == "corrupt_image":
        image = image[: len(image) // 3]
    metadata = {"synth": {**scene, "language": language, "true_caption": true_caption, "noise": noise,
                          "width": width, "height": height}}
    return {"key": f"synth{index:08d}", "jpg": image, "txt": caption.encode("utf-8"),
            "json": json.dumps(metadata, ensure_ascii=False).encode("utf-8")}


def write_synth(output: str | Path, options: SynthOptions) -> list[Path]:
    """Write ``options.samples`` samples as WebDataset shards ``synth-NNNNN.tar``; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scene_rng = random.Random(options.seed)
    scenes = [random_scene(scene_rng) for _ in range(options.samples)]
    paths = []
    for shard_index, start in enumerate(range(0, options.samples, options.shard_size)):
        path = output / f"synth-{shard_index:05d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w") as archive:
            for index in range(start, min(start + options.shard_size, options.samples)):
                sample = make_sample(index, options, scenes)
                for extension in ("jpg", "txt", "json"):
                    info = tarfile.TarInfo(f"{sample['key']}.{extension}")
                    info.size, info.mtime, info.mode = len(sample[extension]), 0, 0o644
                    archive.addfile(info, io.BytesIO(sample[extension]))
        tmp.replace(path)
        paths.append(path)
    return paths
