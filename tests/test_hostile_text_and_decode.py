"""Hostile shard content: captions made to slow down the cleaning patterns or the HTML parser, markup that would
survive cleaning, decompression bombs, and training state that would run code when loaded."""

import html
import io
import json
import pickle
import statistics
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
from PIL import Image

from conftest import ROOT, write_tar
from helpers import curate
from stages.caption_cleaning import (DEFAULT_BOILERPLATE, PATTERN_RULES, HtmlParams, HtmlStage, PatternsParams,
                                     PatternsStage, has_markup)

CAPTION_BYTES = 16_384  # the largest caption the shard reader passes on


def _fill(unit: str, size: int = CAPTION_BYTES) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def _normal_caption() -> str:
    sentences = [
        "A brown dog runs across a grassy field near the river on a sunny afternoon.",
        "Two children in red jackets build a snowman in front of their house, while their father watches.",
        "Modern kitchen with white cabinets, a marble island and three pendant lamps over it.",
        "Close-up of a bee on a yellow flower, with the garden out of focus behind it.",
        "Vintage 1967 car parked on a cobbled street in the old town; the paint is faded blue.",
    ]
    return _fill(" ".join(sentences) + " ")


def _adversarial_captions() -> dict[str, str]:
    """16 KB captions where a backtracking pattern would rescan long runs from every position."""
    n = CAPTION_BYTES
    units = ["a", "1", "-", "_", ".", "@", "+", " ", "|", ":", "#", "!", "…", "\x01", "\u200b", "<", "&",
             "a-", "a.", "a_", "a+", "a@", "@a", "@_", "1-", "a ", "- ", " -", "a|", "-.", "_.", ".@", "a.@",
             "a-b_c.1@", "a@a.", "a@a-", "x.jp", "www.", "http://", "img_", "img_123", "dsc-1_", "&amp;", "&#",
             "- stock ", " | ", "a\t", "字-", "é."]
    captions = {}
    for unit in units:
        captions[f"{unit!r}*"] = _fill(unit)
        for tail in ("a", "@", ".", "!"):  # runs that end where a match would need something else
            captions[f"{unit!r}*+{tail}"] = _fill(unit, n - 1) + tail
    captions.update({
        "local part without @": "a" * (n - 1) + "@",
        "e-mail with a failing domain": "a." * 40 + "@" + _fill("-.", n - 81),
        "file stem without extension": "x" + "-" * (n - 2) + "x",
        "spaces before a non-phrase": "x" + " " * (n - 2) + "x",
        "control characters": "\x01" * n,
        "separators inside the caption": "Sooo!! " + _fill("- ", n - 9) + "a",
        "separators with long spaces": _fill("-" + " " * 60 + "x"),
        "hyphens between words": _fill("-" * 100 + "x"),
        "nested divs": _fill("<div>"),
        "nested lists": _fill("<ul>"),
        "inline in block": _fill("<i><div>"),
        "one tag, many attributes": "<a " + " ".join(f"a{i}" for i in range(5000))[:n - 4] + ">",
        "tags just under the limits": "".join("<a " + " ".join(f"b{i}" for i in range(600))[:2040] + ">"
                                              for _ in range(8)),
        "long numeric reference": "&#" + "9" * (n - 3) + ";",
        "escaped entities": _fill("&amp;amp;lt;"),
        "raw text element": "<textarea>" + _fill("<b>x", n - 30) + "</textarea>",
    })
    return captions


def _rule_stages() -> dict[str, object]:
    stages = {}
    for rule in PATTERN_RULES:
        stages[f"patterns:{rule}"] = PatternsStage(PatternsParams(rules={r: r == rule for r in PATTERN_RULES},
                                                                  boilerplate=[]))
    stages["patterns:boilerplate"] = PatternsStage(PatternsParams(rules={r: False for r in PATTERN_RULES}))
    stages["patterns:all"] = PatternsStage(PatternsParams(rules={r: True for r in PATTERN_RULES},
                                                          boilerplate=list(DEFAULT_BOILERPLATE)))
    stages["html"] = HtmlStage(HtmlParams())
    return stages


RULE_STAGES = _rule_stages()
ADVERSARIAL = _adversarial_captions()
RATIO, SLACK_S = 20, 0.01  # a linear pattern stays within a small factor of normal text of the same length


def _seconds(fn, text: str) -> float:
    start = time.perf_counter()
    fn(text)
    return time.perf_counter() - start


@pytest.mark.parametrize("name", list(RULE_STAGES))
def test_cleaning_time_on_adversarial_captions_is_bounded_by_normal_text(name):
    stage = RULE_STAGES[name]
    normal = _normal_caption()
    assert len(normal) == CAPTION_BYTES
    baseline = statistics.median(_seconds(stage.clean, normal) for _ in range(5))
    limit = RATIO * baseline + SLACK_S
    slow = {}
    for label, caption in ADVERSARIAL.items():
        best = _seconds(stage.clean, caption)
        for _ in range(2):  # the best of up to three runs: a preempted run is not a slow pattern
            if best <= limit:
                break
            best = min(best, _seconds(stage.clean, caption))
        if best > limit:
            slow[label] = round(best * 1000, 1)
    assert not slow, f"{name}: normal caption {baseline * 1000:.2f} ms, limit {limit * 1000:.1f} ms, slow: {slow}"


PAYLOAD = "A red car <img src=x onerror=alert(1)> parked on a <b>quiet</b> road"


def _escaped(text: str, levels: int) -> str:
    for _ in range(levels):
        text = html.escape(text)
    return text


@pytest.mark.parametrize("levels", range(1, 7))
def test_html_escaped_several_times_never_keeps_markup(levels):
    caption = _escaped(PAYLOAD, levels)
    [row] = curate([{"stage": "html"}], [caption])
    if levels <= HtmlParams().max_unescape_rounds:
        assert row["drop_reason"] is None and row["caption"] == "A red car parked on a quiet road"
    else:  # escaped more deeply than the stage unescapes: dropped, never passed on with markup
        assert row["drop_reason"] == "html:markup_left" and row["html_markup_left"]
    [deep] = curate([{"stage": "html", "max_unescape_rounds": 6}], [caption])
    assert deep["drop_reason"] is None and deep["caption"] == "A red car parked on a quiet road"


def test_html_leaves_no_unclosed_raw_text_or_oversized_markup():
    captions = [
        "Sunset &lt;img src=x onerror=alert(1)",  # an unclosed tag once unescaped
        "<textarea><b>bold</b> text</textarea>",  # raw-text element: its text is markup again
        "Tom &amp;amp; Jerry",
        "&ltimg src=x onerror=alert(1)&gt",  # references without ';' that decode to a tag
        "x " + "<div>" * 300 + "deep",  # more tags than are parsed
        "<a " + "b " * 2000 + ">long tag</a>",  # a tag longer than is parsed
        "a picture &#" + "9" * 5000 + "; of a cat",  # html.unescape alone raises on this
        "I <3 NY, 1 < 2 > 0",  # not markup
    ]
    rows = curate([{"stage": "html"}], captions)
    assert [r["drop_reason"] for r in rows] == [None, None, None, "html:markup_left", "html:markup_left",
                                                "html:markup_left", None, None]
    assert [r["caption"] for r in rows[:3]] == ["Sunset", "bold text", "Tom & Jerry"]
    assert rows[6]["caption"] == "a picture \ufffd of a cat" and not rows[6].get("error_stage")
    assert rows[7]["caption"] == "I <3 NY, 1 < 2 > 0"
    for row in rows:
        assert row["drop_reason"] is not None or not has_markup(row["caption"]), row


# ---- decompression bombs ---------------------------------------------------------------------------------------

BOMB_SIDE = 14_142  # 14,142 x 14,142 = 200 million pixels: 600 MB as RGB, from a file of about 200 KB


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A valid PNG that declares 14,142 x 14,142 pixels in a small file (a mostly constant image). Built in a
    child process, so that this process's peak memory stays low."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    script = textwrap.dedent(f"""
        from PIL import Image
        image = Image.new("L", ({BOMB_SIDE}, {BOMB_SIDE}), 255)
        image.paste(0, (0, 0, 64, 64))
        image.save({str(path)!r}, compress_level=9)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert path.stat().st_size < 300_000
    return path


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("pil_limit", ["default", "off"])
def test_decode_stage_drops_a_bomb_with_its_own_reason(bomb, pil_limit, monkeypatch):
    if pil_limit == "off":  # the bound is the stage's own, not PIL's global
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    rows = curate([{"stage": "decode"}], ["a bomb", "a photo"], [bomb.read_bytes(), _png((300, 200))])
    assert rows[0]["drop_reason"] == "decode:too_many_pixels"
    assert rows[0]["decode_error"].startswith("ImageTooLarge: ")
    if pil_limit == "off":
        assert rows[0]["decode_error"].startswith(f"ImageTooLarge: {BOMB_SIDE}x{BOMB_SIDE} image has 199,996,164")
    assert rows[1]["drop_reason"] is None and rows[1]["decode_error"] == ""
    small = curate([{"stage": "decode", "max_pixels": 10_000}], ["a photo"], [_png((300, 200))])
    assert small[0]["drop_reason"] == "decode:too_many_pixels"


def test_decoders_refuse_formats_outside_the_web_ones():
    from models.imaging import open_bounded

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="TIFF")
    with pytest.raises(Image.UnidentifiedImageError):
        open_bounded(buffer.getvalue())
    with open_bounded(_png((32, 32))) as image:
        assert image.size == (32, 32)


def test_a_bomb_is_refused_everywhere_pixels_are_decoded_without_allocating(bomb):
    """The decode stage, report thumbnails and training preprocessing, with PIL's own limit switched off: each
    refuses the bomb from its header, in a process whose peak memory barely moves."""
    script = textwrap.dedent(f"""
        import json, resource, sys, time
        import numpy as np
        from PIL import Image
        sys.path.insert(0, {str(ROOT)!r})
        from models.imaging import ImageTooLarge
        from models.training.clip import ClipTask
        from models.training.data import open_image, preprocess_block
        from models.training.recipe import load_train_config
        from pipeline.report import _thumbnail
        from stages.image_decode import decode_square

        Image.MAX_IMAGE_PIXELS = None  # the bound must not depend on PIL's global
        bomb = open({str(bomb)!r}, "rb").read()
        model, train = load_train_config(ClipTask, {str(ROOT / "configs" / "train-clip-tiny.yaml")!r}, [])
        task = ClipTask(model, train, __import__("pathlib").Path({str(bomb.parent)!r}))
        task._ready()
        results = {{}}

        def refused(name, call):
            start = time.perf_counter()
            try:
                results[name] = call()
            except ImageTooLarge:
                results[name] = "ImageTooLarge"
            results[name + "_seconds"] = time.perf_counter() - start

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        refused("decode", lambda: decode_square(bomb, 224) and "decoded")
        refused("report", lambda: _thumbnail(bomb))
        refused("training", lambda: open_image(bomb) and "decoded")
        good = {_png((64, 64))!r}
        prepared = preprocess_block({{"jpg": np.array([bomb, good], dtype=object),
                                 "txt": np.array([b"a bomb", b"a red square"], dtype=object)}}, task)
        results["training_batch_rows"] = len(prepared["tokens"])
        results["peak_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["decode"] == results["training"] == "ImageTooLarge", results
    assert results["report"] is None, results  # no thumbnail
    assert results["training_batch_rows"] == 1, results  # the bomb is skipped, the good sample trains
    assert results["peak_growth_mb"] < 64, results  # decoding it needs 200 MB (L) to 600 MB (RGB) and more
    # From the header: milliseconds (decoding it takes seconds); generous for a loaded machine.
    assert max(results[f"{name}_seconds"] for name in ("decode", "report", "training")) < 2, results


# ---- training state ----------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_training_state_loads_tensors_and_never_runs_code(tmp_path):
    import torch
    from diffusers.training_utils import EMAModel

    from models.training.loop import load_state

    module = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    ema = EMAModel(module.parameters())
    ema.step(module.parameters())
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "extra": {"ema": ema.state_dict()}, "step": 7},
               tmp_path / "state.pt")
    state = load_state(tmp_path / "state.pt")
    assert state["step"] == 7 and torch.equal(state["model"]["weight"], module.weight.detach())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ema.load_state_dict(state["extra"]["ema"])

    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "step": _RunsCode(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path / "hostile.pt")
    assert not marker.exists()


def test_held_out_samples_skip_links_and_oversized_members(tmp_path, monkeypatch):
    from models.training import data

    shard = write_tar(tmp_path / "eval.tar", [("a.jpg", _png((8, 8))), ("a.txt", b"a red square"),
                                              ("b.jpg", b"x" * 500), ("b.txt", b"too large")])
    with tarfile.open(shard, "a") as archive:
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        archive.addfile(tarfile.TarInfo("c.txt"), io.BytesIO(b""))
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 100)
    samples = data.read_samples([str(shard)])
    assert samples["txt"] == [b"a red square"] and len(samples["jpg"]) == 1
