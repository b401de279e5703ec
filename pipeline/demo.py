"""`vlcurate demo`: BLIP's bootstrapping loop end to end, offline, on a laptop.

synthesize a noisy dataset -> curate it with the rules -> train a tiny CLIP, BLIP captioner and ITM filter on the
rule-cleaned data -> re-curate with the CLIP score and CapFilt using those checkpoints -> train a tiny diffusion
model on the final data -> sample images -> write the report, and print the curation quality figures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from models.training.loop import run_training
from pipeline.config import load_config
from pipeline.quality import caption_truth, drop_quality, format_quality, joined
from pipeline.report import write_report
from pipeline.raystart import init_ray
from pipeline.run import run_curation
from pipeline.synth import SynthOptions, default_noise, write_synth

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["a large red circle on the left of a blue background", "a small yellow square at the top of a black background",
           "a large green triangle on the centre of a white background", "a large purple cross on the right of a orange background"]


@dataclasses.dataclass
class DemoSize:
    samples: int
    shard_size: int
    clip_steps: int
    blip_steps: int
    itm_steps: int
    diffusion_steps: int


FULL = DemoSize(samples=3000, shard_size=500, clip_steps=150, blip_steps=150, itm_steps=300, diffusion_steps=200)
QUICK = DemoSize(samples=800, shard_size=200, clip_steps=40, blip_steps=30, itm_steps=150, diffusion_steps=20)


def step(message: str) -> float:
    print(f"\n== {message}", flush=True)
    return time.perf_counter()


def run_demo(output: str, quick: bool = False, address: str | None = None) -> dict:
    size = QUICK if quick else FULL
    root = Path(output).resolve()
    data, rules_out, final_out = root / "data", root / "curated-rules", root / "curated"
    started = time.perf_counter()
    init_ray(address)

    step(f"1/7 synthesizing {size.samples} noisy image-text pairs into {data}")
    write_synth(data, SynthOptions(samples=size.samples, seed=0, size=64, shard_size=size.shard_size, chinese=0.1,
                                   noise=default_noise(0.45)))

    step("2/7 curating with the Qwen-VL rules")
    rules = load_config(CONFIGS / "demo.yaml", ["decode.enabled=false", "clip_score.enabled=false",
                                                  "capfilt.enabled=false", "name=demo-rules"])
    run_curation(rules, [str(data)], str(rules_out), progress=True)

    trained = {}
    for number, (task, steps, extra) in enumerate([("clip", size.clip_steps, []),
                                                    ("blip-captioner", size.blip_steps, []),
                                                    ("blip-itm", size.itm_steps, [])], start=3):
        step(f"{number}/7 training the {task} on the rule-cleaned shards ({steps} steps)")
        folder = root / "train" / task
        run_training(task, str(CONFIGS / f"train-{task}-tiny.yaml"), str(rules_out / "shards"), str(folder),
                     [f"train.max_steps={steps}", f"train.checkpoint_every={max(10, steps // 2)}",
                      f"train.warmup_steps={min(10, steps // 2)}", *extra])
        trained[task] = folder

    step("6/7 re-curating with the CLIP score and CapFilt, using the checkpoints just trained")
    itm_final = json.loads((trained["blip-itm"] / "metrics.jsonl").read_text().splitlines()[-1])
    itm_threshold = itm_final.get("itm_best_threshold", 0.5)  # per dataset, from the filter's held-out pairs
    print(f"ITM filter: held-out AUC {itm_final.get('itm_auc', float('nan')):.3f}, threshold {itm_threshold:.3f}")
    final = load_config(CONFIGS / "demo.yaml", [f"capfilt.itm_threshold={itm_threshold}",
        f"clip_score.model=local-dir:{trained['clip'] / 'export'}", "clip_score.pretrained=''",
        f"capfilt.captioner={trained['blip-captioner'] / 'export'}",
        f"capfilt.filter={trained['blip-itm'] / 'export'}"])
    result = run_curation(final, [str(data)], str(final_out), progress=True)
    if result.stats["kept"] == 0:
        raise RuntimeError("the re-curation kept no sample: the tiny models are undertrained; run without --quick")

    step(f"7/7 training the diffusion model on the final data ({size.diffusion_steps} steps), sampling, reporting")
    diffusion = root / "train" / "diffusion"
    run_training("diffusion", str(CONFIGS / "train-diffusion-tiny.yaml"), str(final_out / "shards"), str(diffusion),
                 [f"model.text_encoder={trained['clip'] / 'export'}", f"train.max_steps={size.diffusion_steps}",
                  f"train.checkpoint_every={max(10, size.diffusion_steps // 2)}"])
    from models.diffusion import sample_images

    samples = root / "samples"
    samples.mkdir(exist_ok=True)
    for index, (prompt, image) in enumerate(zip(PROMPTS, sample_images(str(diffusion / "export"), PROMPTS, steps=25))):
        image.resize((128, 128)).save(samples / f"sample-{index:03d}.png")
        (samples / f"sample-{index:03d}.txt").write_text(prompt)
    report = write_report(str(final_out), [str(trained[t]) for t in trained] + [str(diffusion)], str(samples))

    rules_frame, final_frame = joined(str(rules_out), str(data)), joined(str(final_out), str(data))
    quality = {"rules": drop_quality(rules_frame), "final": drop_quality(final_frame),
               "caption_truth_rules": caption_truth(rules_frame), "caption_truth_final": caption_truth(final_frame),
               "minutes": (time.perf_counter() - started) / 60}
    (root / "quality.json").write_text(json.dumps(quality, indent=2))
    print("\n== curation quality (ground truth from vlcurate synth), after the rules and the model stages:")
    print(format_quality(quality["final"], quality["caption_truth_rules"], quality["caption_truth_final"]))
    print(f"\noutputs: {final_out}\nreport:  {report}\ndiffusion samples: {samples}\n"
          f"done in {quality['minutes']:.1f} minutes")
    return quality
