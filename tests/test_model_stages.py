"""Model stages with tiny models built by the tests: loading through the real code paths, scoring real
Flickr8k photos, decode in draft mode, and a run on Ray with `vlcurate select` changing the CLIP threshold."""

import io
import json
import shutil
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image

from conftest import FLICKR, MYNTRA, photos_and_captions, require
from helpers import curate
from pipeline.config import ConfigError, parse_config
from pipeline.run import run_curation, select_thresholds
from stages.image_decode import decode_square
from models.tiny import TINY_CLIP


@pytest.fixture(scope="session")
def tiny(tiny_models):
    return tiny_models


def real_photos(shard, limit):
    return photos_and_captions(shard, limit)


def clip_entry(tiny, **extra):
    return {"stage": "clip_score", "model": TINY_CLIP, "pretrained": tiny["clip"]["checkpoint"],
            "model_config": tiny["clip"]["model_config"], "resources": {"num_gpus": 0, "batch_size": 4}, **extra}


def capfilt_entry(tiny, **extra):
    return {"stage": "capfilt", "captioner": tiny["blip"]["captioner"], "filter": tiny["blip"]["filter"],
            "resources": {"num_gpus": 0, "batch_size": 4}, "num_captions": 2, "max_length": 12, "image_size": 32,
            **extra}


def test_draft_decode_matches_full_decode_size_and_content():
    photos, _ = real_photos(require(MYNTRA / "myntra-00000.tar"), 3)
    for data in photos:
        draft = decode_square(data, 224, draft=True)
        full = decode_square(data, 224, draft=False)
        assert draft.size == full.size == (224, 224) and draft.mode == full.mode == "RGB"
        difference = np.abs(np.asarray(draft, dtype=np.int16) - np.asarray(full, dtype=np.int16)).mean()
        assert difference < 4.0  # same picture: a few levels of resampling noise on 0-255
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (300, 400))
            assert max(image.size) < 2400 / 2  # the decoder really scaled down in the DCT domain


def test_clip_score_loads_checkpoint_and_local_dir_alike(tiny):
    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 6)
    from_checkpoint = curate([clip_entry(tiny)], captions, photos)
    local_dir = {"stage": "clip_score", "model": "local-dir:" + tiny["clip"]["local_dir"], "pretrained": "",
                 "resources": {"num_gpus": 0}}
    from_dir = curate([local_dir], captions, photos)
    scores = [r["clip_score"] for r in from_checkpoint]
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 6
    assert scores == pytest.approx([r["clip_score"] for r in from_dir], abs=1e-5)


def test_clip_score_is_cosine_similarity_of_normalised_embeddings(tiny):
    import open_clip
    import torch

    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 2)
    rows = curate([clip_entry(tiny, image_size=32)], captions, photos)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=tiny["clip"]["checkpoint"])
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        image = preprocess(decode_square(photos[0], 32)).unsqueeze(0)
        a = model.encode_image(image)
        b = model.encode_text(tokenizer([captions[0]]))
    expected = torch.nn.functional.cosine_similarity(a, b).item()
    assert rows[0]["clip_score"] == pytest.approx(expected, abs=1e-5)


def test_missing_pretrained_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="needs 'pretrained'"):
        parse_config({"stages": [clip_entry(tiny, pretrained="")]}, [])


def test_capfilt_writes_synthetic_captions_and_scores_every_candidate(tiny):
    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 4)
    rows = curate([capfilt_entry(tiny, itm_threshold=0.0)], captions, photos)
    for row in rows:
        assert len(row["capfilt_synthetic"]) == 2 and len(row["capfilt_synthetic_itm"]) == 2
        assert all(0.0 <= p <= 1.0 for p in [row["capfilt_web_itm"], *row["capfilt_synthetic_itm"]])
        assert not any(text.startswith("a picture of") for text in row["capfilt_synthetic"])
        assert row["drop_reason"] is None and row["output_captions"] == [row["caption"]]
    again = curate([capfilt_entry(tiny, itm_threshold=0.0)], captions, photos)
    assert [r["capfilt_synthetic"] for r in again] == [r["capfilt_synthetic"] for r in rows]  # reproducible


def test_capfilt_policy_decides_the_written_captions(tiny):
    from stages.model_scores import CapFiltParams, CapFiltStage

    row = {"caption": "web", "capfilt_web_itm": 0.2, "capfilt_synthetic": ["syn a", "syn b", "syn c"],
           "capfilt_synthetic_itm": [0.7, 0.4, 0.9]}
    replace = CapFiltStage(CapFiltParams(policy="replace"))
    extra = CapFiltStage(CapFiltParams(policy="extra_pairs"))
    assert replace.output_captions(row) == ["syn c"]  # the noisy web caption is replaced by the best synthetic
    assert extra.output_captions(row) == ["syn c", "syn a"]
    assert extra.output_captions({**row, "capfilt_web_itm": 0.8}) == ["web", "syn c", "syn a"]
    assert replace.output_captions({**row, "capfilt_synthetic_itm": [0.1, 0.1, 0.1]}) is None


def test_model_stages_on_ray_then_select_a_new_clip_threshold(ray_cluster, tiny, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("flickr8k-00002.tar", "flickr8k-00003.tar"):
        shutil.copy(require(FLICKR / name), inputs / name)
    raw = {"name": "tiny-models", "stages": [
        {"stage": "html"}, {"stage": "length"}, {"stage": "image_size"},
        {"stage": "decode", "size": 32},
        clip_entry(tiny, image_size=32),
        capfilt_entry(tiny, itm_threshold=0.0),
    ]}
    config = parse_config(raw, [])
    out = tmp_path / "out"
    result = run_curation(config, [str(inputs)], str(out), progress=False)
    assert not result.failed
    manifests = pl.read_parquet(out / "manifests" / "*.parquet")
    reached = manifests.filter(pl.col("drop_reason").is_null() | pl.col("drop_reason").str.starts_with("clip_score")
                               | pl.col("drop_reason").str.starts_with("capfilt"))
    assert reached.height > 100
    assert reached["clip_score"].null_count() == 0 and reached["capfilt_web_itm"].null_count() == 0
    assert (reached["capfilt_synthetic"].list.len() == 2).all()
    too_small = manifests.filter(pl.col("drop_reason") == "image_size:too_small")
    assert too_small.height > 0 and too_small["clip_score"].null_count() == too_small.height  # never scored
    assert "pixels" not in manifests.columns

    median = float(reached["clip_score"].median())
    stats = select_thresholds(str(out), [f"clip_score.threshold={median}"])
    after = pl.read_parquet(out / "manifests" / "*.parquet")
    assert stats["kept"] == (reached["clip_score"] >= median).sum()
    assert after["clip_score"].equals(manifests["clip_score"])  # nothing recomputed
    assert (after.filter(pl.col("drop_reason") == "clip_score:low_score")["clip_score"] < median).all()
    kept_written = 0
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    metadata = json.loads(archive.extractfile(member).read())
                    assert metadata["vlcurate"]["clip_score"] >= median
                    kept_written += 1
    assert kept_written == stats["kept"]


@pytest.mark.slow  # a model-recipe run end to end (a pool of CLIP actors)
def test_top_fraction_keeps_exactly_that_share_over_the_run(ray_cluster, tiny, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("flickr8k-00002.tar", "flickr8k-00003.tar"):
        shutil.copy(require(FLICKR / name), inputs / name)
    config = parse_config({"stages": [{"stage": "image_size"}, clip_entry(tiny, image_size=32, top_fraction=0.3)]},
                          [])
    result = run_curation(config, [str(inputs)], str(tmp_path / "out"), progress=False)
    manifests = pl.read_parquet(tmp_path / "out" / "manifests" / "*.parquet")
    scored = manifests["clip_score"].drop_nulls()
    assert result.stats["kept"] == manifests["kept"].sum() == int(np.ceil(0.3 * scored.len()))


# --- encoding once, loading once, and the GPU path's choices (exercised on CPU) ---------------------------------


def test_captioner_encodes_each_image_once_and_writes_what_generate_writes(tiny):
    """The vision tower sees each image once, however many captions it gets; the captions are those of BLIP's own
    ``generate`` fed one repeated pixel row per caption (the same per-row seeds)."""
    import torch
    from transformers import LogitsProcessorList

    from models.blip import BlipCaptioner, PerRowNucleusSampler

    photos, _ = real_photos(require(FLICKR / "flickr8k-00002.tar"), 5)
    images = [decode_square(data, 32) for data in photos]
    captioner = BlipCaptioner(tiny["blip"]["captioner"], max_length=12)
    encoded = []
    hook = captioner.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    seeds = [101, 202, 303, 404, 505]
    captions = captioner.caption(images, 3, seeds)
    hook.remove()
    assert encoded == [5]  # one pass over the five images, not fifteen rows

    inputs = captioner.processor(images=images, text=[captioner.prompt] * 5, return_tensors="pt")
    sampler = PerRowNucleusSampler([seed * 1_000 + copy for seed in seeds for copy in range(3)], top_p=0.9)
    with torch.inference_mode():
        output = captioner.model.generate(
            pixel_values=inputs["pixel_values"].repeat_interleave(3, dim=0),
            input_ids=inputs["input_ids"].repeat_interleave(3, dim=0), do_sample=False,
            logits_processor=LogitsProcessorList([sampler]), repetition_penalty=1.1, min_length=5, max_length=12)
    texts = [captioner.strip_prompt(t) for t in captioner.processor.batch_decode(output, skip_special_tokens=True)]
    assert captions == [texts[i * 3:(i + 1) * 3] for i in range(5)]
    assert len({text for group in captions for text in group}) > 5  # real, varied samples were compared
    # An image's captions do not depend on its batch.
    assert captioner.caption(images[2:4], 3, seeds[2:4]) == captions[2:4]


def test_clip_checkpoint_becomes_the_parameters_without_a_random_copy(tiny, monkeypatch):
    import open_clip
    import torch

    from models.clip import load_open_clip

    initialised = []
    for name in ("normal_", "kaiming_uniform_", "uniform_", "zeros_", "ones_", "trunc_normal_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor, *args, _original=original, **kwargs):
            initialised.append(tensor.is_meta)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    model, preprocess, _ = load_open_clip(TINY_CLIP, tiny["clip"]["checkpoint"], tiny["clip"]["model_config"])
    assert initialised and all(initialised)  # every initialiser ran on meta tensors: no memory, no work
    monkeypatch.undo()
    checkpoint = torch.load(tiny["clip"]["checkpoint"], weights_only=True)["state_dict"]
    state = model.state_dict()
    assert set(state) == set(checkpoint) and all(torch.equal(state[k], checkpoint[k]) for k in checkpoint)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    reference, _, reference_preprocess = open_clip.create_model_and_transforms(
        TINY_CLIP, pretrained=tiny["clip"]["checkpoint"])
    assert torch.equal(model.attn_mask, reference.attn_mask)  # buffers outside the checkpoint are built as usual
    assert repr(preprocess) == repr(reference_preprocess)


def test_clip_checkpoint_missing_weights_is_a_load_error(tiny, tmp_path):
    import torch

    from models.clip import ClipLoadError, load_open_clip

    state = torch.load(tiny["clip"]["checkpoint"], weights_only=True)["state_dict"]
    state.pop("text_projection")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ClipLoadError, match="text_projection"):
        load_open_clip(TINY_CLIP, str(tmp_path / "partial.pt"), tiny["clip"]["model_config"])


class FakeCudaMemory:
    """CUDA memory figures for ForwardBatchSizer: a model of ``weights`` bytes, ``per_image`` bytes per image in
    a forward pass, on a device with ``total`` bytes of which others use ``others``."""

    def __init__(self, total, weights, per_image, others=0):
        self.total, self.weights, self.per_image, self.others = total, weights, per_image, others
        self.running = 0

    def free_and_total(self):
        return self.total - self.others - self.weights, self.total

    def allocated(self):
        return self.weights

    def reserved(self):
        return self.weights

    def reset_peak(self):
        self.running = 0

    def peak(self):
        return self.weights + self.running * self.per_image


def run_sizer(sizer, memory, images):
    sizes = []
    while images:
        size = sizer.next_size(images)
        with sizer.measure(size):
            if memory is not None:
                memory.running = size
        sizes.append(size)
        images -= size
    return sizes


def test_forward_batch_sizes_fill_the_free_gpu_memory_and_nothing_else_changes_on_cpu():
    from models.devices import ForwardBatchSizer, activation_budget, batch_size_for_memory, is_cuda

    gib = 2**30
    assert is_cuda("cuda") and is_cuda("cuda:1") and not is_cuda("cpu") and not is_cuda("mps")
    assert run_sizer(ForwardBatchSizer(0, 32, "cpu"), None, 70) == [32, 32, 6]  # batch_size, as before
    assert run_sizer(ForwardBatchSizer(10, 32, "cuda"), None, 25) == [10, 10, 5]
    assert run_sizer(ForwardBatchSizer("auto", 32, "cpu"), None, 40) == [32, 8]  # no GPU: no probing
    # 80 GiB device, 2 GiB of weights, 0.25 GiB per image: 0.8 x 78 GiB / 0.25 GiB = 249 images per pass.
    memory = FakeCudaMemory(80 * gib, 2 * gib, gib // 4)
    sizer = ForwardBatchSizer("auto", 4096, "cuda", memory=memory)
    assert run_sizer(sizer, memory, 1000) == [8, 249, 249, 249, 245]  # a probe of 8, then as many as fit
    assert sizer.bytes_per_image == gib // 4
    capped = ForwardBatchSizer("auto", 64, "cuda", memory=memory)
    assert run_sizer(capped, memory, 200) == [8, 64, 64, 64]  # never more than Ray's batch_size
    # Half a GPU: half the device less the weights; memory others hold is not ours either.
    assert activation_budget(free=78 * gib, total=80 * gib, reserved_unused=0, allocated=2 * gib, share=0.5,
                             fraction=1.0) == 38 * gib
    assert activation_budget(free=10 * gib, total=80 * gib, reserved_unused=gib, allocated=2 * gib, share=1.0,
                             fraction=0.5) == 5.5 * gib
    assert batch_size_for_memory(gib, 3 * gib, 64) == 1  # one image always goes through
    crowded = FakeCudaMemory(80 * gib, 2 * gib, gib // 4, others=70 * gib)
    assert run_sizer(ForwardBatchSizer("auto", 4096, "cuda", memory=crowded), crowded, 100) == [8, 25, 25, 25, 17]


def test_forward_batch_settings_are_checked_in_the_recipe(tiny):
    entry = clip_entry(tiny, resources={"num_gpus": 0, "forward_batch": "auto", "batch_size": 512})
    stage = parse_config({"stages": [entry]}, []).stages[0].build()
    assert stage.resources.forward_batch == "auto" and stage.batch_sizer().next_size(600) == 512  # CPU: batch_size
    for wrong in ({"forward_batch": "max"}, {"forward_batch": -1}, {"memory_fraction": 1.5}):
        with pytest.raises(ConfigError, match="forward_batch|memory_fraction"):
            parse_config({"stages": [clip_entry(tiny, resources={"num_gpus": 0, **wrong})]}, [])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_device_decode_falls_back_to_the_cpu_per_image():
    import torch

    from models.imaging import ImageTooLarge, decode_on_device

    photos, _ = real_photos(require(FLICKR / "flickr8k-00002.tar"), 4)
    png = io.BytesIO()
    Image.open(io.BytesIO(photos[3])).save(png, format="PNG")
    bomb = io.BytesIO()
    Image.new("RGB", (400, 300)).save(bomb, format="JPEG")
    datas = [photos[0], photos[1], png.getvalue(), photos[2], bomb.getvalue()]
    calls, fallbacks = [], []

    def device_decoder(batch, device):  # refuses any batch holding photos[1], as nvJPEG refuses a CMYK stream
        calls.append(len(batch))
        if any(bytes(t.numpy()) == photos[1] for t in batch):
            raise RuntimeError("nvjpeg: unsupported stream")
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    def fallback(data, size):
        fallbacks.append(datas.index(data))
        return decode_square(data, size, max_pixels=100_000)

    with pytest.raises(ImageTooLarge):  # the bomb reaches the CPU decoder, which refuses it: the sample's error
        decode_on_device(datas, 48, "cpu", fallback, max_pixels=100_000, decoder=device_decoder)
    assert calls == [3, 1, 1, 1]  # JPEGs within max_pixels, batched; then one by one after the failure
    assert fallbacks == [1, 2, 4]  # the refused JPEG, the PNG, the bomb
    calls.clear(), fallbacks.clear()
    decoded = decode_on_device(datas[:4], 48, "cpu", fallback, decoder=device_decoder)
    assert fallbacks == [1, 2] and [tuple(t.shape) for t in decoded] == [(3, 48, 48)] * 4
    for data, tensor in zip(datas, decoded):  # the device decode is the same picture as PIL's
        expected = torch.from_numpy(np.array(decode_square(data, 48))).permute(2, 0, 1)
        assert tensor.dtype == torch.uint8 and (tensor.float() - expected.float()).abs().mean() < 3.0


@pytest.mark.parametrize("with_decode_stage", [True, False])
def test_cuda_branch_computes_what_the_cpu_branch_computes(tiny, monkeypatch, with_decode_stage):
    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 5)
    entries = ([{"stage": "decode", "size": 32}] if with_decode_stage else []) + [
        clip_entry(tiny, image_size=32), capfilt_entry(tiny, itm_threshold=0.0)]
    on_cpu = curate(entries, captions, photos)
    from stages.model_scores import ModelStage

    monkeypatch.setattr(ModelStage, "on_cuda", property(lambda self: True))
    on_device = curate(entries, captions, photos)
    assert all(row.get("error_stage") is None for row in on_device), [r.get("error_message") for r in on_device]
    # From the decode stage's pixels the inputs are the same numbers; decoded on the device, the same pictures.
    tolerance = 1e-4 if with_decode_stage else 0.05
    for cpu, device in zip(on_cpu, on_device):
        assert device["clip_score"] == pytest.approx(cpu["clip_score"], abs=tolerance)
        assert device["capfilt_web_itm"] == pytest.approx(cpu["capfilt_web_itm"], abs=tolerance)
        assert len(device["capfilt_synthetic"]) == 2
    if with_decode_stage:
        assert [r["capfilt_synthetic"] for r in on_device] == [r["capfilt_synthetic"] for r in on_cpu]


def test_channels_last_only_on_cuda(tiny):
    import torch

    from models.blip import on_device
    from models.imaging import normalized_pixels
    from stages.model_scores import model_input

    def channels_last(tensor):
        return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()

    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(tiny["blip"]["captioner"])
    patch = model.vision_model.embeddings.patch_embedding
    assert not channels_last(on_device(model, "cpu").vision_model.embeddings.patch_embedding.weight)
    assert channels_last(on_device(model, "cuda:0").vision_model.embeddings.patch_embedding.weight)  # layout only
    assert patch.weight.device.type == "cpu"
    images = [torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8) for _ in range(2)]
    settings = (32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    on_cpu, on_cuda = model_input(images, settings, "cpu"), model_input(images, settings, "cuda")
    assert on_cpu.shape == on_cuda.shape == (2, 3, 32, 32) and torch.equal(on_cpu, on_cuda)  # same numbers
    assert channels_last(on_cuda) and not channels_last(on_cpu)
    expected = (images[0].float() / 255 - 0.5) / 0.25
    assert torch.allclose(normalized_pixels(images[0][None], 48, *settings[1:])[0], expected, atol=1e-6)


# --- the decode stage on the device, and forward passes that run out of device memory (exercised on CPU) --------


def model_steps(stages, plan, captions, photos):
    """The model steps of a recipe on in-memory samples, the way the model actors run them (``pipeline.steps``):
    each step gets the image bytes, as the carry file hands them; returns the finished rows."""
    from helpers import sample_table
    from pipeline.curate import annotate_batch, finish_batch
    from pipeline.steps import StageTimer, annotate_in_actor

    table = sample_table(captions, photos)
    for position in plan.source:
        table, _ = annotate_batch(table, stages[position], stages[:position])
    images = table.column("image")
    for index in plan.models:
        if "image" not in table.column_names:
            table = table.append_column("image", images)
        table = annotate_in_actor(table, stages, plan, index, StageTimer())
    table = table.drop_columns([c for c in table.column_names if c.startswith("seconds:")])
    return finish_batch(table, stages).to_pylist()


def build_steps(entries):
    from pipeline.steps import StepPlan

    specs = parse_config({"stages": entries}, []).enabled_stages
    return [spec.build() for spec in specs], StepPlan.of(specs)


def hostile_images(photos):
    """Real photos, and what a device JPEG decoder must not or cannot take: a PNG, a CMYK JPEG, a progressive
    JPEG, a JPEG whose body is damaged, and a JPEG declaring more pixels than the decode stage allows."""
    def encoded(image, **options):
        buffer = io.BytesIO()
        image.save(buffer, **options)
        return buffer.getvalue()

    photo = Image.open(io.BytesIO(photos[3]))
    damaged = bytearray(photos[4])
    damaged[len(damaged) // 3:] = b"\x00" * (len(damaged) - len(damaged) // 3)
    return {
        "photo0": photos[0], "photo1": photos[1], "photo2": photos[2],
        "png": encoded(photo, format="PNG"),
        "cmyk": encoded(photo.convert("CMYK"), format="JPEG", quality=90),
        "progressive": encoded(photo, format="JPEG", quality=90, progressive=True),
        "damaged": bytes(damaged),
        "bomb": encoded(Image.new("RGB", (1200, 1000)), format="JPEG"),
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_decode_stage_decodes_on_the_device_and_keeps_cpu_verdicts_for_what_it_refuses(tiny, monkeypatch):
    import models.imaging
    from stages.image_decode import HELD_PIXELS
    from stages.model_scores import ModelStage

    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 5)
    images = hostile_images(photos)
    names, datas = list(images), list(images.values())
    captions = (captions * 2)[:len(datas)]
    refused = {images["progressive"], images["damaged"]}  # as nvJPEG refuses some streams
    seen = []

    def device_decoder(batch, device):
        from torchvision.io import ImageReadMode, decode_jpeg

        streams = [bytes(t.numpy()) for t in batch]
        seen.extend(streams)
        if refused & set(streams):
            raise RuntimeError("nvjpeg: unsupported stream")
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    monkeypatch.setattr(models.imaging, "_device_jpeg_decoder", device_decoder)

    def entries(on_device=True):
        return [{"stage": "decode", "size": 32, "max_pixels": 1_000_000, "resources": {"on_device": on_device}},
                clip_entry(tiny, image_size=32), capfilt_entry(tiny, itm_threshold=0.0)]

    on_cpu = model_steps(*build_steps(entries()), captions, datas)
    assert not seen  # on CPU the decode stage is what it always was
    assert on_cpu == curate(entries(), captions, datas)
    monkeypatch.setattr(ModelStage, "on_cuda", property(lambda self: True))
    copied = model_steps(*build_steps(entries(on_device=False)), captions, datas)  # CPU decode, pixels copied
    assert not seen
    on_device = model_steps(*build_steps(entries()), captions, datas)
    assert len(HELD_PIXELS) == 0  # released once the actor's batch is scored
    # Headers are checked first: the bomb, the PNG and the CMYK JPEG never reach the device decoder.
    assert set(seen) == {images[n] for n in ("photo0", "photo1", "photo2", "progressive", "damaged")}
    verdicts = ["decode_error", "decode_size", "drop_reason", "error_stage"]
    for cpu, device in zip(on_cpu, on_device):
        assert {k: device.get(k) for k in verdicts} == {k: cpu.get(k) for k in verdicts}
    by_name = dict(zip(names, on_device))
    assert by_name["bomb"]["drop_reason"] == "decode:too_many_pixels"
    assert by_name["damaged"]["drop_reason"] == "decode:undecodable_image"
    scores = ["clip_score", "capfilt_web_itm", "capfilt_synthetic", "capfilt_synthetic_itm"]
    for name, device, cpu_pixels in zip(names, on_device, copied):
        if name in ("png", "cmyk", "progressive", "damaged", "bomb"):  # decoded by PIL: the CPU's very pixels
            assert {k: device[k] for k in scores} == {k: cpu_pixels[k] for k in scores}, name
        else:  # decoded on the device: the same pictures, resampled differently
            assert device["clip_score"] == pytest.approx(cpu_pixels["clip_score"], abs=0.05)
            assert device["capfilt_web_itm"] == pytest.approx(cpu_pixels["capfilt_web_itm"], abs=0.05)
    seen.clear()
    refused.update(images.values())  # a decoder that refuses everything: exactly the CPU decode's results
    assert model_steps(*build_steps(entries()), captions, datas) == copied
    assert seen


def test_device_decode_chunks_bound_the_full_size_decodes(monkeypatch):
    import torch

    import models.imaging
    from models.imaging import decode_jpegs_on_device

    photos, _ = real_photos(require(FLICKR / "flickr8k-00002.tar"), 5)
    calls = []

    def device_decoder(batch, device):
        calls.append(len(batch))
        return [torch.zeros((3, *Image.open(io.BytesIO(bytes(t.numpy()))).size[::-1]), dtype=torch.uint8)
                for t in batch]

    monkeypatch.setattr(models.imaging, "DEVICE_CHUNK_IMAGES", 2)
    decoded = decode_jpegs_on_device(photos, 16, "cpu", decoder=device_decoder)
    assert calls == [2, 2, 1] and all(tuple(t.shape) == (3, 16, 16) for t in decoded)
    calls.clear()
    monkeypatch.setattr(models.imaging, "DEVICE_CHUNK_PIXELS", 1)  # one image per call, however small
    decode_jpegs_on_device(photos, 16, "cpu", decoder=device_decoder)
    assert calls == [1] * 5

    def wrong_size(batch, device):  # a decode that disagrees with the header is not trusted
        return [torch.zeros((3, 8, 8), dtype=torch.uint8) for _ in batch]

    assert decode_jpegs_on_device(photos, 16, "cpu", decoder=wrong_size) == [None] * 5


def annotate_twice(stages, captions, photos):
    """Two batches through the same stage objects (one actor's life): the finished rows of each."""
    from helpers import sample_table
    from pipeline.curate import annotate_batch, finish_batch

    rows = []
    for half in (slice(0, 7), slice(7, None)):
        table = sample_table(captions[half], photos[half])
        for position, stage in enumerate(stages):
            table, _ = annotate_batch(table, stage, stages[:position])
        rows.append(finish_batch(table, stages).drop_columns(["image"]).to_pylist())
    return rows


def test_a_forward_pass_out_of_memory_is_run_again_at_half_the_size(tiny, monkeypatch, caplog):
    import logging

    import torch

    from models.blip import BlipCaptioner
    from models.clip import ClipScorer

    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 12)
    resources = {"num_gpus": 0, "batch_size": 8}
    entries = [{"stage": "decode", "size": 32}, clip_entry(tiny, image_size=32, resources=resources),
               capfilt_entry(tiny, itm_threshold=0.0, resources=resources)]
    reference = annotate_twice(build_steps(entries)[0], captions, photos)
    sizes = {"clip": [], "captioner": []}
    limits = {"clip": 5, "captioner": 2}

    def limited(method, name):
        def run(self, images, *args):
            sizes[name].append(len(images))
            if len(images) > limits[name]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return method(self, images, *args)
        return run

    monkeypatch.setattr(ClipScorer, "score_and_embed", limited(ClipScorer.score_and_embed, "clip"))
    monkeypatch.setattr(BlipCaptioner, "caption", limited(BlipCaptioner.caption, "captioner"))
    stages = build_steps(entries)[0]
    with caplog.at_level(logging.WARNING, logger="stages.model_scores"):
        retried = annotate_twice(stages, captions, photos)
    # The same captions and verdicts; the scores to float32 rounding (a matrix product's sum order depends on how
    # many rows it has, on CPU and GPU alike, and the passes hold fewer rows after the retry).
    scores = ("clip_score", "capfilt_web_itm", "capfilt_synthetic_itm")
    for retried_rows, reference_rows in zip(retried, reference):
        for row, expected in zip(retried_rows, reference_rows):
            for name in scores:
                assert row[name] == pytest.approx(expected[name], abs=1e-6), name
            assert {**row, **dict.fromkeys(scores)} == {**expected, **dict.fromkeys(scores)}
    # 7 images: 7 fails, then passes of 3 (7 // 2); the second batch starts at the smaller size.
    assert sizes["clip"] == [7, 3, 3, 1, 3, 2]
    assert sizes["captioner"] == [7, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # halved twice: 7, 3, then 1
    warnings = [r.getMessage() for r in caplog.records if "out of device memory" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0].startswith("clip_score: out of device memory with 7 images")
    assert [stage.batch_sizer().ceiling for stage in stages[1:]] == [3, 1]

    limits["clip"] = 0  # not even one image fits: each sample fails alone, as any error in a model stage does
    rows = annotate_twice(build_steps(entries)[0], captions, photos)[0]
    assert all(row["error_stage"] == "clip_score" and row["drop_reason"] == "clip_score:error" for row in rows)
    assert "OutOfMemoryError" in rows[0]["error_message"]


def test_a_smaller_forward_batch_after_running_out_of_memory_caps_the_adaptive_size():
    from models.devices import ForwardBatchSizer

    gib = 2**30
    memory = FakeCudaMemory(80 * gib, 2 * gib, gib // 4)
    sizer = ForwardBatchSizer("auto", 4096, "cuda", memory=memory)
    assert run_sizer(sizer, memory, 300) == [8, 249, 43]
    assert sizer.shrink(249) == 124
    assert run_sizer(sizer, memory, 300) == [124, 124, 52]  # the measured budget would allow 249
    assert sizer.shrink(200) == 100 and sizer.shrink(124) == 62  # the smallest ceiling holds
    with pytest.raises(ValueError):
        sizer.shrink(1)


class MultinomialPerRow:
    """Nucleus sampling one row at a time with ``torch.multinomial`` and each row's generator: what the
    captioner's sampler must draw, token for token."""

    def __init__(self, seeds, top_p):
        import torch

        self.generators = [torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF) for seed in seeds]
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        probabilities = scores.float().softmax(dim=-1).cpu()
        sorted_probs, order = probabilities.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        sorted_probs = sorted_probs * ((cumulative - sorted_probs) < self.top_p)
        tokens = torch.cat([order[row, torch.multinomial(sorted_probs[row], 1, generator=generator)]
                            for row, generator in enumerate(self.generators[:scores.shape[0]])])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, tokens.unsqueeze(1), 0.0)


def test_sampler_draws_what_multinomial_draws_row_by_row(tiny, monkeypatch):
    import torch

    import models.blip
    from models.blip import BlipCaptioner, PerRowNucleusSampler

    generator = torch.Generator().manual_seed(7)
    steps = {"candidates": 0, "full_sort": 0}
    for vocabulary, rows, sharpness in [(100, 6, 1.0), (100, 6, 8.0), (30524, 9, 1.0), (30524, 9, 9.0)]:
        for top_p in (0.5, 0.9, 1.0):
            seeds = [1_000 * vocabulary + row for row in range(rows)]
            expected, sampler = MultinomialPerRow(seeds, top_p), PerRowNucleusSampler(seeds, top_p)
            for step in range(5):  # the generators stay in step over a whole caption
                scores = torch.randn(rows, vocabulary, generator=generator) * sharpness
                if step == 2:
                    scores[:, :4] = scores.max() + 1.0  # ties at the top: their order is the sort's
                assert torch.equal(sampler(None, scores), expected(None, scores)), (vocabulary, sharpness, top_p)
            steps = {way: steps[way] + count for way, count in sampler.steps.items()}
    assert steps["candidates"] >= 20 and steps["full_sort"] >= 20  # both ways were compared

    photos, _ = real_photos(require(FLICKR / "flickr8k-00002.tar"), 4)
    images = [decode_square(data, 32) for data in photos]
    captioner = BlipCaptioner(tiny["blip"]["captioner"], max_length=12)
    captions = captioner.caption(images, 3, [11, 22, 33, 44])
    monkeypatch.setattr(models.blip, "PerRowNucleusSampler", MultinomialPerRow)
    assert captioner.caption(images, 3, [11, 22, 33, 44]) == captions
